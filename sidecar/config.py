"""Configuration: the only reader of the environment and of the YAML file (SPEC §3).

`load_config` returns an inert, frozen `Config` or raises `ConfigError` listing every
problem at once as `path: reason`. Nothing here connects, binds or logs; building live
objects from a `Config` is the app's job.

Environment overrides win over the file. An empty environment variable counts as
unset, so `FOO=` in a pod spec never replaces a file value with nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

import yaml

from sidecar.errors import ConfigError

__all__ = [
    "ALERT_KINDS",
    "ENV_ADMIN_LISTEN",
    "ENV_ALERTMANAGER_URL",
    "ENV_CONFIG",
    "ENV_CONSUL_ADDR",
    "ENV_CONSUL_CACERT",
    "ENV_CONSUL_ENABLED",
    "ENV_CONSUL_TOKEN",
    "ENV_CONSUL_TOKEN_FILE",
    "ENV_LISTEN",
    "ENV_LOG_FORMAT",
    "ENV_LOG_LEVEL",
    "ENV_SERVICE_ADDRESS",
    "ENV_SERVICE_NAME",
    "ENV_SERVICE_PORT",
    "ENV_VARS",
    "Address",
    "AdminConfig",
    "AlertRuleConfig",
    "AlertsConfig",
    "AppConnectionsConfig",
    "BreakerConfig",
    "Config",
    "ConsulConfig",
    "DiscoveryConfig",
    "EnvVar",
    "EventsConfig",
    "FallbackConfig",
    "HealthConfig",
    "OutlierConfig",
    "RetryConfig",
    "ServiceConfig",
    "ShutdownConfig",
    "SpoolConfig",
    "SubscriptionConfig",
    "TelemetryConfig",
    "TracingConfig",
    "UpstreamConfig",
    "config_from_mapping",
    "load_config",
    "parse_duration",
    "parse_size",
    "resolve_config_path",
]

T = TypeVar("T")

ENV_CONFIG = "SIDECAR_CONFIG"
ENV_SERVICE_NAME = "SIDECAR_SERVICE_NAME"
ENV_SERVICE_ADDRESS = "SIDECAR_SERVICE_ADDRESS"
ENV_SERVICE_PORT = "SIDECAR_SERVICE_PORT"
ENV_LISTEN = "SIDECAR_LISTEN"
ENV_ADMIN_LISTEN = "SIDECAR_ADMIN_LISTEN"
ENV_LOG_FORMAT = "SIDECAR_LOG_FORMAT"
ENV_LOG_LEVEL = "SIDECAR_LOG_LEVEL"
ENV_CONSUL_ENABLED = "SIDECAR_CONSUL_ENABLED"
ENV_CONSUL_MODE = "SIDECAR_CONSUL_MODE"
ENV_CONSUL_NODE = "SIDECAR_CONSUL_NODE"
ENV_CONSUL_ADDR = "CONSUL_HTTP_ADDR"
ENV_CONSUL_TOKEN = "CONSUL_HTTP_TOKEN"
ENV_CONSUL_TOKEN_FILE = "CONSUL_HTTP_TOKEN_FILE"
ENV_CONSUL_CACERT = "CONSUL_CACERT"
ENV_AMQP_URL = "SIDECAR_AMQP_URL"
ENV_AMQP_URL_FILE = "SIDECAR_AMQP_URL_FILE"
ENV_SPOOL_PATH = "SIDECAR_SPOOL_PATH"
# OpenTelemetry's own names (the SDK's environment specification); they win over the file.
ENV_OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"
ENV_OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
ENV_OTEL_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
ENV_OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
ENV_OTEL_TRACES_SAMPLER = "OTEL_TRACES_SAMPLER"
ENV_OTEL_TRACES_SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
ENV_OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_OTEL_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ENV_OTEL_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
ENV_OTEL_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
ENV_OTEL_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"
ENV_OTEL_TRACES_HEADERS = "OTEL_EXPORTER_OTLP_TRACES_HEADERS"
ENV_OTEL_COMPRESSION = "OTEL_EXPORTER_OTLP_COMPRESSION"
ENV_OTEL_TRACES_COMPRESSION = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"
ENV_OTEL_TIMEOUT = "OTEL_EXPORTER_OTLP_TIMEOUT"
ENV_OTEL_TRACES_TIMEOUT = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
ENV_OTEL_BSP_MAX_QUEUE = "OTEL_BSP_MAX_QUEUE_SIZE"
ENV_OTEL_BSP_BATCH = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"
ENV_OTEL_BSP_DELAY = "OTEL_BSP_SCHEDULE_DELAY"
ENV_ALERTMANAGER_URL = "SIDECAR_ALERTMANAGER_URL"


class EnvVar(NamedTuple):
    """One environment variable the sidecar reads: its name, the config path it sets, what for."""

    name: str
    path: str
    description: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar(ENV_CONFIG, "-", "path of the YAML config file when `-c` is not given"),
    EnvVar(ENV_SERVICE_NAME, "service.name", "name of the app beside this sidecar"),
    EnvVar(ENV_SERVICE_ADDRESS, "service.address", "address registered for the app"),
    EnvVar(ENV_SERVICE_PORT, "service.port", "the app's own port"),
    EnvVar(ENV_LISTEN, "listen", "app-facing API address, host:port"),
    EnvVar(ENV_ADMIN_LISTEN, "admin.listen", "admin API address, host:port"),
    EnvVar(ENV_LOG_FORMAT, "telemetry.log_format", "json or console"),
    EnvVar(ENV_LOG_LEVEL, "telemetry.log_level", "debug, info, warning or error"),
    EnvVar(ENV_CONSUL_ENABLED, "consul.enabled", "true/false/1/0/yes/no"),
    EnvVar(ENV_CONSUL_MODE, "consul.mode", "agent or catalog"),
    EnvVar(ENV_CONSUL_NODE, "consul.node", "catalog mode: this sidecar's node name"),
    EnvVar(ENV_CONSUL_ADDR, "consul.address", "Consul HTTP API URL (scheme optional)"),
    EnvVar(ENV_CONSUL_TOKEN, "consul.token", "Consul ACL token; wins over the token file"),
    EnvVar(ENV_CONSUL_TOKEN_FILE, "consul.token_file", "file holding the Consul ACL token"),
    EnvVar(ENV_CONSUL_CACERT, "consul.ca_file", "CA bundle for a TLS Consul address"),
    EnvVar(ENV_AMQP_URL, "events.amqp_url", "RabbitMQ URL (a secret: prefer the _FILE form)"),
    EnvVar(ENV_AMQP_URL_FILE, "events.amqp_url", "file holding the RabbitMQ URL"),
    EnvVar(ENV_SPOOL_PATH, "events.spool.path", "SQLite spool file (the container sets it)"),
    EnvVar(ENV_OTEL_SDK_DISABLED, "telemetry.tracing", "true: tracing off"),
    EnvVar(ENV_OTEL_SERVICE_NAME, "-", "service.name of the traces' resource (else service.name)"),
    EnvVar(ENV_OTEL_RESOURCE_ATTRIBUTES, "-", "more resource attributes, key=value,..."),
    EnvVar(ENV_OTEL_TRACES_EXPORTER, "telemetry.tracing.exporter", "otlp, console or none"),
    EnvVar(ENV_OTEL_TRACES_SAMPLER, "telemetry.tracing.sampler", "the sampler's name"),
    EnvVar(ENV_OTEL_TRACES_SAMPLER_ARG, "telemetry.tracing.sampler_ratio", "0.0 to 1.0"),
    EnvVar(ENV_OTEL_ENDPOINT, "telemetry.tracing.otlp_endpoint", "OTLP base URL"),
    EnvVar(ENV_OTEL_TRACES_ENDPOINT, "telemetry.tracing.otlp_endpoint", "OTLP traces URL, as is"),
    EnvVar(ENV_OTEL_PROTOCOL, "telemetry.tracing.protocol", "http/protobuf or grpc"),
    EnvVar(ENV_OTEL_TRACES_PROTOCOL, "telemetry.tracing.protocol", "http/protobuf or grpc"),
    EnvVar(ENV_OTEL_HEADERS, "telemetry.tracing.headers", "key=value,... sent on each export"),
    EnvVar(ENV_OTEL_TRACES_HEADERS, "telemetry.tracing.headers", "as above, traces only"),
    EnvVar(ENV_OTEL_COMPRESSION, "telemetry.tracing.compression", "gzip or none"),
    EnvVar(ENV_OTEL_TRACES_COMPRESSION, "telemetry.tracing.compression", "gzip or none"),
    EnvVar(ENV_OTEL_TIMEOUT, "telemetry.tracing.export_timeout", "milliseconds"),
    EnvVar(ENV_OTEL_TRACES_TIMEOUT, "telemetry.tracing.export_timeout", "milliseconds"),
    EnvVar(ENV_OTEL_BSP_MAX_QUEUE, "telemetry.tracing.max_queue_size", "spans held for export"),
    EnvVar(ENV_OTEL_BSP_BATCH, "telemetry.tracing.max_export_batch_size", "spans per export"),
    EnvVar(ENV_OTEL_BSP_DELAY, "telemetry.tracing.schedule_delay", "milliseconds"),
    EnvVar(ENV_ALERTMANAGER_URL, "alerts.alertmanager_url", "Alertmanager base URL (http/https)"),
)


# --- the model -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """A `host:port` to bind or connect to; IPv6 hosts are stored without brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, min_port: int = 0) -> Address:
        """Parse `host:port` or `[v6]:port`; raises ValueError naming the text."""
        match = _ADDRESS.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"invalid address {text!r} (expected host:port)")
        host, port = match["v6"] or match["host"], int(match["port"])
        if match["v6"] is not None:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"invalid address {text!r} (bad IPv6 literal)") from None
        if not min_port <= port <= 65535:
            raise ValueError(f"invalid address {text!r} (port must be {min_port}-65535)")
        return cls(host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_DEFAULT_LISTEN = Address("127.0.0.1", 4001)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """How the sidecar probes the app: HTTP GET `path`, or a TCP connect when it is None."""

    path: str | None = None
    interval: float = 10.0
    timeout: float = 2.0
    deregister_critical_after: float = 60.0


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The app beside this sidecar, as registered in Consul."""

    name: str
    id: str
    address: str
    port: int | None = None
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    health: HealthConfig = HealthConfig()


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address = Address("0.0.0.0", 9902)  # all interfaces: Prometheus scrapes it


@dataclass(frozen=True, slots=True)
class ConsulConfig:
    """Consul agent access; `token` comes from the environment or `token_file`, never the file."""

    enabled: bool = True
    mode: str = "agent"  # agent: local agent + TTL check; catalog: the servers' catalog API
    node: str = ""  # catalog mode: this sidecar's node name (default: the host or pod name)
    address: str = "http://127.0.0.1:8500"
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    ca_file: str | None = None
    datacenter: str | None = None


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """When a failed attempt is retried; YAML `on:` sets the four `on_*` fields."""

    max: int = 2
    on_connect_failure: bool = True
    on_timeout: bool = False
    on_reset: bool = False
    on_statuses: frozenset[int] = frozenset({502, 503, 504})
    budget_ratio: float = 0.2
    min_retries_per_second: float = 10.0


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 5
    open_for: float = 30.0
    half_open_probes: int = 1


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejection_percent: int = 50


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    """The canned response served while an upstream's circuit is open."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One service the app may call; `service` defaults to `name`."""

    name: str
    service: str = ""
    tags: tuple[str, ...] = ()
    endpoints: tuple[Address, ...] = ()
    listen: Address | None = None
    timeout: float = 10.0
    per_try_timeout: float = 3.0
    retries: RetryConfig = RetryConfig()
    circuit_breaker: BreakerConfig = BreakerConfig()
    outlier: OutlierConfig = OutlierConfig()
    max_concurrent_requests: int = 1024
    fallback: FallbackConfig | None = None
    balancer: str = "peak_ewma"

    def __post_init__(self) -> None:
        if not self.service:
            object.__setattr__(self, "service", self.name)


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    """Events on `topic` (an AMQP pattern) POSTed to the app at `path`."""

    name: str
    topic: str
    path: str
    max_attempts: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    prefetch: int = 32
    timeout: float = 30.0  # one POST to the app


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: str = ""  # "" until resolved: see `default_spool_path`
    max_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """The event relay; `enabled` when an `events` section or SIDECAR_AMQP_URL(_FILE) is set."""

    enabled: bool = False
    amqp_url: str = field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    exchange: str = "events"
    spool: SpoolConfig = SpoolConfig()
    max_event_bytes: int = 1024 * 1024
    confirm_timeout: float = 5.0  # no confirm within this: the event is spooled instead
    subscriptions: tuple[SubscriptionConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    allow_any_service: bool = False  # any Consul service name is routable, not only upstreams
    max_services: int = 64  # bound on the watches allow_any_service may start
    idle_after: float = 600.0  # such a watch stops after this long without a request


#: OTEL_TRACES_SAMPLER values the sidecar implements (the SDK's built-in samplers).
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry tracing; `enabled` when the console exporter or an OTLP endpoint is set."""

    enabled: bool = False
    exporter: str = "otlp"  # otlp | console | none
    endpoint: str | None = None  # the full traces URL (http) or target (grpc)
    protocol: str = "http/protobuf"  # or grpc
    sampler: str = "parentbased_traceidratio"
    sampler_ratio: float = 1.0
    service_name: str = ""  # OTEL_SERVICE_NAME, else service.name
    resource_attributes: tuple[tuple[str, str], ...] = ()  # OTEL_RESOURCE_ATTRIBUTES
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold a token
    compression: str = "none"  # or gzip
    export_timeout: float = 10.0
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay: float = 1.0


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    log_format: str = "json"
    log_level: str = "info"
    tracing: TracingConfig = TracingConfig()


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    drain: float = 5.0
    grace: float = 20.0


@dataclass(frozen=True, slots=True)
class AppConnectionsConfig:
    """Limits on the app's connections to the app-facing listeners."""

    idle_timeout: float = 300.0  # keep-alive with no request: closed after this
    header_timeout: float = 30.0  # a request head must arrive in full within this
    body_timeout: float = 60.0  # no request-body bytes for this long: 408, the app's fault
    max_header_bytes: int = 64 * 1024  # request line plus headers


ALERT_KINDS = (
    "error_rate",
    "latency_p99",
    "circuit_open",
    "spool_depth",
    "consul_unreachable",
    "broker_unreachable",
)
#: Kinds whose rule names one upstream, and kinds measured over a sliding `window`.
UPSTREAM_ALERT_KINDS = frozenset({"error_rate", "latency_p99", "circuit_open"})
WINDOWED_ALERT_KINDS = frozenset({"error_rate", "latency_p99"})


@dataclass(frozen=True, slots=True)
class AlertRuleConfig:
    """One threshold alert; which fields apply depends on `kind` (see docs/alerts.md)."""

    name: str
    kind: str
    upstream: str | None = None
    threshold: float | None = None  # error_rate: ratio; latency_p99: seconds; spool_depth: events
    window: float = 60.0  # error_rate and latency_p99 only
    for_: float = 0.0  # YAML `for`: how long the condition must hold before firing
    severity: str = "warning"
    summary: str = ""  # "" means the kind's default text
    description: str = ""
    min_requests: int = 10  # error_rate and latency_p99: fewer answers in the window, no value


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    alertmanager_url: str | None = None  # base URL; /api/v2/alerts is appended
    evaluation_interval: float = 1.0
    resend_interval: float = 60.0
    rules: tuple[AlertRuleConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration; build one with `load_config` or `config_from_mapping`."""

    service: ServiceConfig
    listen: Address = _DEFAULT_LISTEN
    admin: AdminConfig = AdminConfig()
    consul: ConsulConfig = ConsulConfig()
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=lambda: MappingProxyType({}))
    discovery: DiscoveryConfig = DiscoveryConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    app_connections: AppConnectionsConfig = AppConnectionsConfig()
    events: EventsConfig = EventsConfig()
    alerts: AlertsConfig = AlertsConfig()


# --- public helpers ------------------------------------------------------------------------

_ADDRESS = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SECONDS = {"s": 1, "m": 60, "h": 3600}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|kB|B)?")
_SIZE_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {f"{p}iB": 1024 ** (i + 1) for i, p in enumerate("KMGT")}


def parse_duration(value: object) -> float:
    """`500ms`, `10s`, `1m`, `1m30s`, `2h` or a number of seconds, as float seconds.

    Raises ValueError (`invalid duration '...'`) for anything else, including negatives.
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an int too large for a float
            seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(
                float(n) / 1000 if unit == "ms" else float(n) * _SECONDS[unit]
                for n, unit in _DURATION_PART.findall(text)
            )
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {_shown(value)}")
    return seconds


def parse_size(value: object) -> int:
    """`512MiB`, `1KB` (decimal), `1KiB` (binary), `100B` or an int, as whole bytes.

    Raises ValueError (`invalid size '...'`) for anything else, including negatives.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        return int(Decimal(match[1]) * _SIZE_UNITS[match[2] or "B"])
    raise ValueError(f"invalid size {_shown(value)}")


def resolve_config_path(
    path: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The config file to read: `path`, else `$SIDECAR_CONFIG`, else None (env + defaults)."""
    env = os.environ if environ is None else environ
    return path or env.get(ENV_CONFIG) or None


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (see `resolve_config_path`), apply env overrides, validate.

    Raises ConfigError with every problem found.
    """
    env = os.environ if environ is None else environ
    source = resolve_config_path(path, env)
    data = {} if source is None else _read_yaml(source)
    return config_from_mapping(data, env, source or "(defaults)")


def config_from_mapping(
    data: Mapping[str, Any], environ: Mapping[str, str], source: str = "<config>"
) -> Config:
    """Build a `Config` from already-parsed YAML data plus env overrides.

    Raises ConfigError with every problem found.
    """
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError([f"{source}: expected a mapping at the top level, got {_kind(data)}"])
    ctx = _Context(environ)
    root = _Section(data, "", ctx)
    service = _service(root.section("service"))
    listen = root.get("listen", _address(0), _DEFAULT_LISTEN, env=ENV_LISTEN)
    admin = _admin(root.section("admin"))
    consul = _consul(root.section("consul"))
    upstreams = _upstreams(root.section("upstreams"), consul.enabled)
    discovery_section = root.section("discovery")
    discovery = DiscoveryConfig(
        **discovery_section.take(
            allow_any_service=_boolean,
            max_services=_integer(1, 10_000),
            idle_after=_duration(),
        )
    )
    discovery_section.done()
    telemetry = _telemetry(root.section("telemetry"), service)
    shutdown_section = root.section("shutdown")
    shutdown = ShutdownConfig(
        **shutdown_section.take(drain=_duration(allow_zero=True), grace=_duration())
    )
    shutdown_section.done()
    connections_section = root.section("app_connections")
    app_connections = AppConnectionsConfig(
        **connections_section.take(
            idle_timeout=_duration(),
            header_timeout=_duration(),
            body_timeout=_duration(),
            max_header_bytes=_size(1024, 16 * 1024 * 1024),
        )
    )
    connections_section.done()
    events = _events(root.section("events"), service, ctx)
    alerts = _alerts(root.section("alerts"), upstreams, events.enabled, consul.enabled)
    root.done()

    if discovery.allow_any_service and not consul.enabled:
        ctx.problem("discovery.allow_any_service", "needs consul.enabled")
    enabled_bad = any(
        p.startswith(("consul.enabled:", f"{ENV_CONSUL_ENABLED}:")) for p in ctx.problems
    )
    if consul.enabled and service.port is None and service.name and not enabled_bad:
        ctx.problem(
            "service.port",
            f"required when consul.enabled is true (registered and probed; {ENV_SERVICE_PORT})",
        )
    _check_ports(ctx, listen, admin, upstreams)

    if ctx.problems:
        raise ConfigError(ctx.problems)
    return Config(
        service=service,
        listen=listen,
        admin=admin,
        consul=consul,
        upstreams=MappingProxyType(upstreams),
        discovery=discovery,
        telemetry=telemetry,
        shutdown=shutdown,
        app_connections=app_connections,
        events=events,
        alerts=alerts,
    )


# --- reading the YAML file -----------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans that rejects a duplicate key.

    YAML 1.1 reads `on`, `off`, `yes` and `no` as booleans, which would turn the
    `retries: {on: [...]}` key into `True`; only true/false are booleans here.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Duplicates are looked for among the keys written in this mapping only: keys a
    # merge (`<<: *base`) brings in may be overridden, as YAML intends.
    keys: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        try:
            duplicate = key in keys
            keys.add(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_shown(key)}", key_node.start_mark
            )
    loader.flatten_mapping(node)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return yaml.load(file, Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: invalid YAML{where}: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"]) from None


# --- the validation helper -----------------------------------------------------------------


class _Context:
    """What every section shares while reading: the environment and the problems so far."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(f"{path}: {reason}")

    def env(self, name: str) -> str | None:
        return self.environ.get(name) or None

    def override(self, names: tuple[str, ...], parse: Callable[[Any], T], value: T) -> T:
        """`value`, replaced by each of the env vars `names` that is set and valid, in
        order (the last one set wins: list the general variable before the specific)."""
        for name in names:
            if (text := self.env(name)) is not None:
                value = self.parse(name, parse, text) or value
        return value

    def parse(self, path: str, parse: Callable[[Any], T], value: object) -> T | None:
        """`parse(value)`, or None after recording the ValueError's message at `path`."""
        try:
            return parse(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return None


_UNSET: Any = object()


class _Section:
    """One mapping of the config, read at `path`; every problem is recorded, none raised.

    Keys read through it are remembered, so `done()` can report the rest as unknown.
    """

    def __init__(self, data: object, path: str, ctx: _Context) -> None:
        self.path = path
        self.ctx = ctx
        self.seen: set[object] = set()
        if not isinstance(data, Mapping):
            if data is not None:
                ctx.problem(path, f"expected a mapping, got {_kind(data)}")
            data = {}
        self.data: Mapping[object, Any] = data

    def at(self, key: object) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(
        self,
        key: str,
        parse: Callable[[Any], T],
        default: T,
        *,
        env: str | None = None,
        env_parse: Callable[[str], T] | None = None,
    ) -> T:
        """The value at `key` (or env var `env`, which wins), parsed; `default` if absent or bad."""
        self.seen.add(key)
        text = self.ctx.env(env) if env else None
        if env is not None and text is not None:
            parsed = self.ctx.parse(env, env_parse or parse, text)
        elif self.has(key):
            parsed = self.ctx.parse(self.at(key), parse, self.data[key])
        else:
            return default
        return default if parsed is None else parsed

    def require(
        self, key: str, parse: Callable[[Any], T], placeholder: T, *, env: str | None = None
    ) -> T:
        """Like `get`, but reports `required` when neither the key nor the env var is set."""
        if not self.has(key) and not (env and self.ctx.env(env)):
            self.seen.add(key)
            self.ctx.problem(self.at(key), "required")
            return placeholder
        return self.get(key, parse, placeholder, env=env)

    def take(self, **parsers: Callable[[Any], Any]) -> dict[str, Any]:
        """The parsed value of each key present and valid, so dataclass defaults fill the rest."""
        values = {key: self.get(key, parse, _UNSET) for key, parse in parsers.items()}
        return {key: value for key, value in values.items() if value is not _UNSET}

    def items(self, key: str, parse: Callable[[Any], T]) -> tuple[T, ...] | None:
        """A list at `key`, each element parsed at `key[i]`; None when absent."""
        self.seen.add(key)
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            self.ctx.problem(self.at(key), f"expected a list, got {_kind(value)}")
            return ()
        parsed = (self.ctx.parse(f"{self.at(key)}[{i}]", parse, v) for i, v in enumerate(value))
        return tuple(item for item in parsed if item is not None)

    def mapping(self, key: str, parse: Callable[[Any], T]) -> dict[str, T]:
        """A string-keyed mapping at `key`, each value parsed at `key.name`."""
        section = self.section(key)
        result: dict[str, T] = {}
        for name, value in section.data.items():
            section.seen.add(name)
            if not isinstance(name, str):
                section.ctx.problem(section.at(name), f"expected a string key, got {_kind(name)}")
            elif (parsed := section.ctx.parse(section.at(name), parse, value)) is not None:
                result[name] = parsed
        return result

    def section(self, key: str) -> _Section:
        self.seen.add(key)
        return _Section(self.data.get(key), self.at(key), self.ctx)

    def reject(self, key: str, reason: str) -> None:
        if key in self.data:
            self.seen.add(key)
            self.ctx.problem(self.at(key), reason)

    def done(self, unsupported: Collection[str] = ()) -> None:
        """Report every key not read: later-build sections as such, the rest as unknown."""
        for key in self.data:
            if key not in self.seen:
                known_later = key in unsupported
                reason = "not supported in this build yet" if known_later else "unknown key"
                self.ctx.problem(self.at(key), reason)


# --- value parsers: each raises ValueError whose message is the reason shown -----------------

_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UPSTREAM_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_RETRY_FLAGS = ("connect-failure", "timeout", "reset")
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})
# Headers the sidecar writes itself when it serves a fallback (framing and connection).
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


def _shown(value: object) -> str:
    """`value` for an error message: the repr of a scalar, cut when long; the kind of
    anything else. A container may be a YAML alias bomb whose repr never ends."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a very large integer"
    if isinstance(value, str | int | float | bool) or value is None:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return _kind(value)


def _kind(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}
    names |= {dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _one_of(options: Collection[object]) -> str:
    *head, last = map(str, options)
    return f"{', '.join(head)} or {last}" if head else last


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _env_boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return False
    raise ValueError(f"invalid boolean {text!r} (expected true, false, 1, 0, yes or no)")


def _integer(low: int, high: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_kind(value)}")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bounds}, got {_shown(value)}")
        return value

    return parse


def _number(low: float, high: float | None = None) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {_kind(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if not math.isfinite(number) or number < low or (high is not None and number > high):
            bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise ValueError(f"must be {bounds}, got {_shown(value)}")
        return number

    return parse


def _duration(*, allow_zero: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if seconds == 0 and not allow_zero:
            raise ValueError("must be greater than 0")
        return seconds

    return parse


def _size(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        size = parse_size(value)
        if not low <= size <= high:
            raise ValueError(f"must be between {low} and {high} bytes, got {size}")
        return size

    return parse


def _choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        word = _string(value).strip().lower()
        if word not in options:
            raise ValueError(f"expected {_one_of(options)}, got {_shown(value)}")
        return word

    return parse


def _port(value: object) -> int:
    return _integer(1, 65535)(value)


def _port_text(text: str) -> int:
    if not (text.strip().isascii() and text.strip().isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"invalid port {text!r}")
    return int(text)


def _address(min_port: int) -> Callable[[object], Address]:
    return lambda value: Address.parse(_string(value), min_port=min_port)


def _host(value: object) -> str:
    host = _string(value).strip()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not (_HOST.fullmatch(host) and len(host) <= 253):
            raise ValueError(
                f"invalid host {_shown(value)} (expected an IP address or host name)"
            ) from None
    return host


def _service_name(value: object) -> str:
    name = _string(value)
    if not _SERVICE_NAME.fullmatch(name):
        raise ValueError(f"invalid name {name!r} (expected letters, digits, '.', '_' or '-')")
    return name


_META_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _meta(s: _Section) -> dict[str, str]:
    """`service.meta`, held to Consul's rules so a bad pair fails here, not at registration."""
    meta = s.mapping("meta", _text)
    if len(meta) > 64:
        s.ctx.problem(s.at("meta"), f"at most 64 pairs (Consul's limit), got {len(meta)}")
    for key, value in meta.items():
        path = f"{s.at('meta')}.{key}"
        if not key:
            s.ctx.problem(path, "key cannot be blank")
        elif not _META_KEY.fullmatch(key):
            s.ctx.problem(
                path, "key may only hold letters, digits, '_' and '-' (Consul rejects others)"
            )
        elif len(key) > 128:
            s.ctx.problem(path, "key is too long (Consul's limit: 128 characters)")
        elif key.startswith("consul-"):
            s.ctx.problem(path, "key prefix 'consul-' is reserved for Consul's internal use")
        if len(value) > 512:
            s.ctx.problem(path, "value is too long (Consul's limit: 512 characters)")
    return meta


def _http_path(value: object) -> str:
    path = _string(value)
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise ValueError(f"invalid path {path!r} (expected an absolute path like /healthz)")
    return path


def _url_parts(text: str, schemes: tuple[str, ...] = ("http", "https")) -> SplitResult | None:
    """`text` split into its parts, or None unless it has one of `schemes`, a host and a
    valid port (if any)."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    if parts.scheme not in schemes or not parts.hostname:
        return None
    return parts


def _consul_url(value: object) -> str:
    text = _string(value).strip().rstrip("/")
    url = text if "://" in text else f"http://{text}"  # Consul's CLI accepts a bare host:port
    if _url_parts(url) is None:
        raise ValueError(f"invalid URL {value!r} (expected http://host:port or https://host:port)")
    return url


_NODE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62}[A-Za-z0-9])?")


def _node_name(value: object) -> str:
    name = _string(value)
    if not _NODE_NAME.fullmatch(name):
        raise ValueError(
            f"invalid node name {name!r} (letters, digits, '.' and '-', at most 64 characters)"
        )
    return name


def _secret_file(value: object) -> tuple[str, str]:
    """The path and its stripped contents; the contents are never put in a message."""
    path = _string(value)
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read {path!r} ({reason})") from None
    if not secret:
        raise ValueError(f"{path!r} is empty")
    return path, secret


def _existing_file(value: object) -> str:
    path = _string(value)
    if not os.path.isfile(path):
        raise ValueError(f"no such file {path!r}")
    return path


def _retry_condition(value: object) -> str | frozenset[int]:
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _RETRY_FLAGS:
        return word
    if word == "5xx":
        return frozenset(range(500, 600))
    status = int(word) if word and word.isascii() and word.isdigit() else value
    if isinstance(status, int) and not isinstance(status, bool) and 500 <= status <= 599:
        return frozenset({status})
    raise ValueError(
        f"unknown condition {_shown(value)} "
        "(expected connect-failure, timeout, reset, 5xx or a status 500-599)"
    )


#: A fallback body is a small canned answer; this also stops a YAML alias bomb, whose
#: shared references would otherwise be expanded into gigabytes of JSON.
_MAX_JSON_VALUES = 10_000


def _json_body(value: object) -> bytes:
    pending, seen = [value], 0
    while pending:
        item = pending.pop()
        seen += 1
        if seen > _MAX_JSON_VALUES:
            raise ValueError(f"too large: more than {_MAX_JSON_VALUES} values")
        if isinstance(item, dict):
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    try:
        return json.dumps(value, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"cannot be encoded as JSON ({exc})") from None


def _header_value(value: object) -> str:
    text = _text(value)
    if "\r" in text or "\n" in text:
        raise ValueError("must not contain line breaks")
    return text


# --- sections ------------------------------------------------------------------------------


def _service(s: _Section) -> ServiceConfig:
    name = s.require("name", _service_name, "", env=ENV_SERVICE_NAME)
    service_id = s.get("id", _string, "") or f"{name}-{socket.gethostname()}"
    address = s.get("address", _host, "", env=ENV_SERVICE_ADDRESS) or _default_address()
    port = s.get("port", _port, None, env=ENV_SERVICE_PORT, env_parse=_port_text)
    tags = s.items("tags", _string) or ()
    meta = _meta(s)
    health_section = s.section("health")
    health = HealthConfig(
        **health_section.take(
            path=_http_path,
            interval=_duration(),
            timeout=_duration(),
            deregister_critical_after=_duration(),
        )
    )
    health_section.done()
    s.done()
    return ServiceConfig(
        name=name,
        id=service_id,
        address=address,
        port=port,
        tags=tags,
        meta=MappingProxyType(meta),
        health=health,
    )


def _default_address() -> str:
    """The first non-loopback IPv4 address of this host, from the resolver; no traffic sent."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except (OSError, UnicodeError):
        return "127.0.0.1"
    for *_, sockaddr in infos:
        ip = str(sockaddr[0])
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    return "127.0.0.1"


def _admin(s: _Section) -> AdminConfig:
    admin = AdminConfig(
        listen=s.get("listen", _address(0), AdminConfig().listen, env=ENV_ADMIN_LISTEN)
    )
    s.done()
    return admin


def _consul(s: _Section) -> ConsulConfig:
    defaults = ConsulConfig()
    known = len(s.ctx.problems)
    enabled = s.get(
        "enabled", _boolean, defaults.enabled, env=ENV_CONSUL_ENABLED, env_parse=_env_boolean
    )
    del known
    mode = s.get("mode", _choice("agent", "catalog"), defaults.mode, env=ENV_CONSUL_MODE)
    node = s.get("node", _node_name, "", env=ENV_CONSUL_NODE) or _node_name(socket.gethostname())
    address = s.get("address", _consul_url, defaults.address, env=ENV_CONSUL_ADDR)
    secret = s.get("token_file", _secret_file, None, env=ENV_CONSUL_TOKEN_FILE)
    s.reject(
        "token", f"secrets do not belong in the config file; use token_file or {ENV_CONSUL_TOKEN}"
    )
    consul = ConsulConfig(
        enabled=enabled,
        mode=mode,
        node=node,
        address=address,
        token=s.ctx.env(ENV_CONSUL_TOKEN) or (secret[1] if secret else None),
        token_file=secret[0] if secret else None,
        ca_file=s.get("ca_file", _existing_file, None, env=ENV_CONSUL_CACERT),
        datacenter=s.get("datacenter", _string, None),
    )
    s.done()
    return consul


def _upstreams(s: _Section, consul_enabled: bool) -> dict[str, UpstreamConfig]:
    upstreams: dict[str, UpstreamConfig] = {}
    for key, value in s.data.items():
        s.seen.add(key)
        name = key.lower() if isinstance(key, str) else ""
        if not (_UPSTREAM_NAME.fullmatch(name) and len(name) <= 253):
            s.ctx.problem(
                s.at(key),
                "invalid upstream name (expected lower-case letters, digits, '.', '_' or '-', "
                "usable as a Host header)",
            )
        elif name in upstreams:
            s.ctx.problem(s.at(key), f"duplicates upstream {name!r} (names ignore case)")
        else:
            upstreams[name] = _upstream(name, _Section(value, s.at(key), s.ctx), consul_enabled)
    return upstreams


def _upstream(name: str, s: _Section, consul_enabled: bool) -> UpstreamConfig:
    defaults = UpstreamConfig(name=name)
    known = len(s.ctx.problems)
    endpoints = s.items("endpoints", _address(1))
    if not endpoints and not consul_enabled and len(s.ctx.problems) == known:
        s.ctx.problem(s.at("endpoints"), "required when consul.enabled is false")
    timeout = s.get("timeout", _duration(), defaults.timeout)
    per_try_timeout = s.get("per_try_timeout", _duration(), min(defaults.per_try_timeout, timeout))
    if per_try_timeout > timeout:
        s.ctx.problem(
            s.at("per_try_timeout"),
            f"must not exceed timeout ({per_try_timeout:g}s > {timeout:g}s)",
        )
    breaker, fallback = s.section("circuit_breaker"), s.section("fallback")
    upstream = UpstreamConfig(
        name=name,
        service=s.get("service", _service_name, name),
        tags=s.items("tags", _string) or (),
        endpoints=endpoints or (),
        listen=s.get("listen", _address(0), None),
        timeout=timeout,
        per_try_timeout=per_try_timeout,
        retries=_retries(s.section("retries")),
        circuit_breaker=BreakerConfig(
            **breaker.take(
                failure_threshold=_integer(1), open_for=_duration(), half_open_probes=_integer(1)
            )
        ),
        outlier=_outlier(s.section("outlier")),
        max_concurrent_requests=s.get(
            "max_concurrent_requests", _integer(1), defaults.max_concurrent_requests
        ),
        fallback=_fallback(fallback) if fallback.data else None,
        balancer=s.get("balancer", _choice("peak_ewma", "least_request"), defaults.balancer),
    )
    breaker.done()
    s.done()
    return upstream


def _retries(s: _Section) -> RetryConfig:
    values = s.take(
        max=_integer(0, 10), budget_ratio=_number(0, 1), min_retries_per_second=_number(0)
    )
    conditions = s.items("on", _retry_condition)
    if conditions is not None:
        values["on_connect_failure"] = "connect-failure" in conditions
        values["on_timeout"] = "timeout" in conditions
        values["on_reset"] = "reset" in conditions
        values["on_statuses"] = frozenset[int]().union(
            *(c for c in conditions if isinstance(c, frozenset))
        )
    s.done()
    return RetryConfig(**values)


def _outlier(s: _Section) -> OutlierConfig:
    outlier = OutlierConfig(
        **s.take(
            consecutive_failures=_integer(1),
            base_ejection=_duration(),
            max_ejection=_duration(),
            max_ejection_percent=_integer(0, 100),
        )
    )
    if outlier.max_ejection < outlier.base_ejection:
        s.ctx.problem(
            s.at("max_ejection"),
            f"must not be less than base_ejection ({outlier.max_ejection:g}s < "
            f"{outlier.base_ejection:g}s)",
        )
    s.done()
    return outlier


def _fallback(s: _Section) -> FallbackConfig:
    status = s.require("status", _integer(200, 599), 503)
    body = s.get("json", _json_body, None)
    text = s.get("text", _text, None)
    headers = s.mapping("headers", _header_value)
    for header in headers:
        if not _HEADER_NAME.fullmatch(header):
            s.ctx.problem(s.at(f"headers.{header}"), "invalid header name")
        elif header.lower() in _FRAMING_HEADERS:
            s.ctx.problem(s.at(f"headers.{header}"), "set by the sidecar; remove it")
    if body is not None and text is not None:
        s.ctx.problem(s.path, "json and text are mutually exclusive")
    s.done()
    # A Content-Type among the headers replaces the one implied by json/text.
    content_type = "application/json" if body is not None else "text/plain; charset=utf-8"
    for header in [h for h in headers if h.lower() == "content-type"]:
        content_type = headers.pop(header)
    payload = body if body is not None else (text or "").encode()
    return FallbackConfig(status, payload, content_type, tuple(headers.items()))


def _telemetry(s: _Section, service: ServiceConfig) -> TelemetryConfig:
    defaults = TelemetryConfig()
    telemetry = TelemetryConfig(
        log_format=s.get(
            "log_format", _choice("json", "console"), defaults.log_format, env=ENV_LOG_FORMAT
        ),
        log_level=s.get(
            "log_level",
            _choice("debug", "info", "warning", "error"),
            defaults.log_level,
            env=ENV_LOG_LEVEL,
        ),
        tracing=_tracing(s.section("tracing"), service),
    )
    s.done()
    return telemetry


def _tracing(s: _Section, service: ServiceConfig) -> TracingConfig:
    """`telemetry.tracing`, with OpenTelemetry's standard variables winning over the file.

    `otlp_endpoint` and OTEL_EXPORTER_OTLP_ENDPOINT are base URLs: for http/protobuf
    `/v1/traces` is appended (the SDK's rule); OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used
    as it is. Durations from OTEL_* variables are milliseconds, as the specification says.
    """
    d = TracingConfig()
    ctx = s.ctx
    exporter = s.get(
        "exporter", _choice("otlp", "console", "none"), d.exporter, env=ENV_OTEL_TRACES_EXPORTER
    )
    protocol = s.get("protocol", _choice("http/protobuf", "grpc"), d.protocol)
    protocol = ctx.override(
        (ENV_OTEL_PROTOCOL, ENV_OTEL_TRACES_PROTOCOL), _choice("http/protobuf", "grpc"), protocol
    )
    grpc = protocol == "grpc"
    endpoint_parse = _otlp_grpc_target if grpc else _otlp_url
    base = s.get("otlp_endpoint", endpoint_parse, None, env=ENV_OTEL_ENDPOINT)
    endpoint = None
    if base is not None:
        endpoint = base
        if protocol == "http/protobuf" and not base.endswith("/v1/traces"):
            endpoint = base.rstrip("/") + "/v1/traces"
    endpoint = ctx.override((ENV_OTEL_TRACES_ENDPOINT,), endpoint_parse, endpoint)
    sampler = s.get("sampler", _choice(*SAMPLERS), d.sampler, env=ENV_OTEL_TRACES_SAMPLER)
    ratio = s.get(
        "sampler_ratio",
        _number(0.0, 1.0),
        d.sampler_ratio,
        env=ENV_OTEL_TRACES_SAMPLER_ARG,
        env_parse=lambda text: _number(0.0, 1.0)(_float_text(text)),
    )
    headers = tuple(s.mapping("headers", _text).items())
    headers = ctx.override((ENV_OTEL_HEADERS, ENV_OTEL_TRACES_HEADERS), _key_values, headers)
    compression = s.get("compression", _choice("gzip", "none"), d.compression)
    compression = ctx.override(
        (ENV_OTEL_COMPRESSION, ENV_OTEL_TRACES_COMPRESSION), _choice("gzip", "none"), compression
    )
    timeout = s.get("export_timeout", _duration(), d.export_timeout)
    timeout = ctx.override((ENV_OTEL_TIMEOUT, ENV_OTEL_TRACES_TIMEOUT), _milliseconds, timeout)
    queue = s.get(
        "max_queue_size",
        _integer(1, 1_000_000),
        d.max_queue_size,
        env=ENV_OTEL_BSP_MAX_QUEUE,
        env_parse=lambda text: _integer(1, 1_000_000)(_int_text(text)),
    )
    batch = s.get(
        "max_export_batch_size",
        _integer(1, 100_000),
        d.max_export_batch_size,
        env=ENV_OTEL_BSP_BATCH,
        env_parse=lambda text: _integer(1, 100_000)(_int_text(text)),
    )
    if batch > queue:
        ctx.problem(s.at("max_export_batch_size"), f"must not exceed max_queue_size ({queue})")
    delay = s.get(
        "schedule_delay",
        _duration(),
        d.schedule_delay,
        env=ENV_OTEL_BSP_DELAY,
        env_parse=_milliseconds,
    )
    for key, value in headers:
        problem = _export_header_problem(key, value, grpc)
        if problem:
            where = (
                "headers" if s.has("headers") else f"{ENV_OTEL_HEADERS} / {ENV_OTEL_TRACES_HEADERS}"
            )
            ctx.problem(s.at(where) if where == "headers" else where, f"{key!r}: {problem}")
    s.done()
    disabled = ctx.env(ENV_OTEL_SDK_DISABLED)
    off = disabled is not None and disabled.strip().lower() == "true"
    resource: tuple[tuple[str, str], ...] = ()
    if (text := ctx.env(ENV_OTEL_RESOURCE_ATTRIBUTES)) is not None:
        resource = ctx.parse(ENV_OTEL_RESOURCE_ATTRIBUTES, _key_values, text) or ()
    service_name = ctx.env(ENV_OTEL_SERVICE_NAME) or dict(resource).get("service.name")
    enabled = not off and (exporter == "console" or (exporter == "otlp" and endpoint is not None))
    return TracingConfig(
        enabled=enabled,
        exporter=exporter,
        endpoint=endpoint,
        protocol=protocol,
        sampler=sampler,
        sampler_ratio=ratio,
        service_name=service_name or service.name,
        resource_attributes=resource,
        headers=headers,
        compression=compression,
        export_timeout=timeout,
        max_queue_size=queue,
        max_export_batch_size=batch,
        schedule_delay=delay,
    )


def _otlp_url(value: object) -> str:
    text = _string(value).strip()
    if _url_parts(text) is None:
        raise ValueError(
            f"invalid OTLP endpoint {_shown(value)} (expected http(s)://host:port, e.g. "
            "http://jaeger-collector:4318)"
        )
    host = urlsplit(text).hostname or ""
    try:
        host.encode("idna")  # how the exporter names it on the wire (Host, TLS, DNS)
    except UnicodeError:
        raise ValueError(
            f"invalid OTLP endpoint {_shown(value)}: its host name cannot be written in IDNA"
        ) from None
    return text


def _otlp_grpc_target(value: object) -> str:
    """A gRPC endpoint: a URL, or a bare host:port as the gRPC exporters accept."""
    text = _string(value).strip()
    return _otlp_url(text if "://" in text else f"http://{text}")


_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")


#: Export headers that would break the request's framing: refused at start.
_EXPORTER_FRAMING = frozenset(("content-length", "transfer-encoding", "connection"))


def _export_header_problem(name: str, value: str, grpc: bool) -> str | None:
    """Why a header cannot be sent with an export (checked at start, not at each export)."""
    if not _HEADER_NAME.fullmatch(name):
        return "not a valid header name"
    if not _HEADER_VALUE.fullmatch(value):
        return "the value must be printable ASCII (no line breaks)"
    if grpc and name.lower().endswith("-bin"):
        return "binary (-bin) gRPC metadata is not supported"
    if name.lower() in _EXPORTER_FRAMING:
        return "the exporter sets it itself (it frames the request)"
    return None


def _float_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _int_text(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _milliseconds(text: object) -> float:
    if isinstance(text, str):
        number = _float_text(text)
    elif isinstance(text, int | float) and not isinstance(text, bool):
        number = float(text)
    else:
        raise ValueError(f"expected milliseconds, got {_kind(text)}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a positive number of milliseconds, got {_shown(text)}")
    return number / 1000


def _key_values(text: str) -> tuple[tuple[str, str], ...]:
    """`key=value,key2=value2` (W3C Baggage-like, values percent-decoded), as the OTel
    specification defines OTEL_RESOURCE_ATTRIBUTES and OTEL_EXPORTER_OTLP_HEADERS."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value pairs separated by commas, got {item.strip()!r}")
        pairs.append((key.strip(), unquote(value.strip())))
    return tuple(pairs)


_TOPIC_PATTERN = re.compile(r"(?:[A-Za-z0-9_-]+|\*|#)(?:\.(?:[A-Za-z0-9_-]+|\*|#))*")
_SUBSCRIPTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_EXCHANGE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,255}")


def default_spool_path(service_id: str) -> str:
    """Where the spool lives when neither the file nor SIDECAR_SPOOL_PATH says: the user's
    state directory, so a laptop run works without root (the image sets /var/lib/sidecar)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", service_id) or "sidecar"
    return os.path.join(state, "hms-sidecar", f"{safe}.spool.db")


def _amqp_url(value: object) -> str:
    text = _string(value).strip()
    parts = _url_parts(text, ("amqp", "amqps"))
    if parts is None:
        raise ValueError("invalid URL (expected amqp://user:password@host:port/vhost)")
    if "@" in parts.path + parts.query + parts.fragment:
        # `amqp://app:4321/pw@host/` parses as host "app": the password would be shown.
        raise ValueError(
            "invalid URL: percent-encode '/', '?', '#' and '@' in the user name and password"
        )
    return text


def _topic_pattern(value: object) -> str:
    text = _string(value).strip()
    if len(text) > 255 or not _TOPIC_PATTERN.fullmatch(text):
        raise ValueError(
            f"invalid topic pattern {text!r} (dot-separated words of letters, digits, '_' or "
            "'-', or '*' for one word and '#' for any number)"
        )
    return text


def _events(s: _Section, service: ServiceConfig, ctx: _Context) -> EventsConfig:
    defaults = EventsConfig()
    secret = s.get("amqp_url_file", _secret_file, None, env=ENV_AMQP_URL_FILE)
    enabled = bool(s.data) or bool(ctx.env(ENV_AMQP_URL)) or secret is not None
    url = s.get("amqp_url", _amqp_url, defaults.amqp_url, env=ENV_AMQP_URL)
    if secret is not None and ctx.env(ENV_AMQP_URL) is None:
        parsed = ctx.parse(ENV_AMQP_URL_FILE, _amqp_url, secret[1])
        url = parsed or url
    spool_section = s.section("spool")
    spool = SpoolConfig(
        path=spool_section.get("path", _string, "", env=ENV_SPOOL_PATH)
        or default_spool_path(service.id or service.name or "sidecar"),
        max_bytes=spool_section.get(
            "max_bytes", _size(64 * 1024, 1 << 40), SpoolConfig().max_bytes
        ),
    )
    spool_section.done()
    max_event_bytes = s.get(
        "max_event_bytes", _size(1, 128 * 1024 * 1024), defaults.max_event_bytes
    )
    if max_event_bytes > spool.max_bytes:
        ctx.problem(s.at("max_event_bytes"), "must not exceed spool.max_bytes")
    subscriptions: list[SubscriptionConfig] = []
    raw = s.data.get("subscriptions")
    s.seen.add("subscriptions")
    if raw is not None and not isinstance(raw, list):
        ctx.problem(s.at("subscriptions"), f"expected a list, got {_kind(raw)}")
        raw = []
    names: set[str] = set()
    for i, item in enumerate(raw or ()):
        sub = _Section(item, f"{s.at('subscriptions')}[{i}]", ctx)
        name = sub.require("name", _string, "")
        if name and not _SUBSCRIPTION_NAME.fullmatch(name):
            ctx.problem(sub.at("name"), "letters, digits, '_', '.' or '-', at most 100")
        elif name in names:
            ctx.problem(sub.at("name"), f"duplicates subscription {name!r}")
        names.add(name)
        backoff = sub.section("backoff")
        initial = backoff.get("initial", _duration(), 1.0)
        most = backoff.get("max", _duration(), max(60.0, initial))
        if most < initial:
            ctx.problem(backoff.at("max"), "must not be less than backoff.initial")
        backoff.done()
        subscriptions.append(
            SubscriptionConfig(
                name=name,
                topic=sub.require("topic", _topic_pattern, "#"),
                path=sub.require("path", _http_path, "/"),
                max_attempts=sub.get("max_attempts", _integer(1, 1000), 5),
                backoff_initial=initial,
                backoff_max=most,
                prefetch=sub.get("prefetch", _integer(1, 2000), 32),
                timeout=sub.get("timeout", _duration(), 30.0),
            )
        )
        sub.done()
    if subscriptions and service.port is None and service.name:
        ctx.problem(s.at("subscriptions"), "need service.port: events are POSTed to the app")
    exchange = s.get("exchange", _string, defaults.exchange)
    if not _EXCHANGE_NAME.fullmatch(exchange):
        ctx.problem(s.at("exchange"), "letters, digits, '_', '.', ':' or '-', at most 255")
    events = EventsConfig(
        enabled=enabled,
        amqp_url=url,
        exchange=exchange,
        spool=spool,
        max_event_bytes=max_event_bytes,
        confirm_timeout=s.get("confirm_timeout", _duration(), defaults.confirm_timeout),
        subscriptions=tuple(subscriptions),
    )
    s.done()
    return events


_ALERT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_SEVERITY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A window holds one sample per evaluation; this bounds the memory of one rule.
_MAX_WINDOW_SAMPLES = 10_000


def _alertmanager_url(value: object) -> str:
    text = _string(value).strip().rstrip("/")
    parts = _url_parts(text)
    if parts is None:
        raise ValueError(
            f"invalid URL {_shown(value)} (expected http://host:port or https://host:port)"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise ValueError("expected a base URL without a query or fragment")
    if parts.path.endswith("/api/v2/alerts"):
        raise ValueError("expected the base URL: /api/v2/alerts is appended")
    return text


def _alert_name(value: object) -> str:
    name = _string(value)
    if not _ALERT_NAME.fullmatch(name):
        raise ValueError(
            f"invalid name {_shown(value)} (letters, digits, '_', '.' or '-', at most 100: "
            "it names the event topic alerts.<name>)"
        )
    return name


def _severity(value: object) -> str:
    word = _string(value).strip()
    if not _SEVERITY.fullmatch(word):
        raise ValueError(f"invalid severity {_shown(value)} (letters, digits, '_', '.' or '-')")
    return word


def _ratio(value: object) -> float:
    ratio = _number(0, 1)(value)
    if ratio == 0:
        raise ValueError("must be greater than 0 (a ratio of answers, at most 1)")
    return ratio


def _alerts(
    s: _Section, upstreams: Mapping[str, UpstreamConfig], events_enabled: bool, consul_enabled: bool
) -> AlertsConfig:
    defaults = AlertsConfig()
    url = s.get("alertmanager_url", _alertmanager_url, None, env=ENV_ALERTMANAGER_URL)
    interval = s.get("evaluation_interval", _duration(), defaults.evaluation_interval)
    resend = s.get("resend_interval", _duration(), defaults.resend_interval)
    if resend < interval:
        s.ctx.problem(
            s.at("resend_interval"),
            f"must not be less than evaluation_interval ({resend:g}s < {interval:g}s)",
        )
    raw = s.data.get("rules")
    s.seen.add("rules")
    if raw is not None and not isinstance(raw, list):
        s.ctx.problem(s.at("rules"), f"expected a list, got {_kind(raw)}")
        raw = []
    rules: list[AlertRuleConfig] = []
    names: set[str] = set()
    for i, item in enumerate(raw or ()):
        r = _Section(item, f"{s.at('rules')}[{i}]", s.ctx)
        if not isinstance(item, Mapping):  # reported by _Section; nothing more to say
            continue
        rule = _alert_rule(r, interval, upstreams, events_enabled, consul_enabled)
        if rule.name in names:
            s.ctx.problem(r.at("name"), f"duplicates rule {rule.name!r}")
        elif rule.name:
            names.add(rule.name)
        rules.append(rule)
    s.done()
    return AlertsConfig(
        alertmanager_url=url,
        evaluation_interval=interval,
        resend_interval=resend,
        rules=tuple(rules),
    )


def _alert_rule(
    r: _Section,
    interval: float,
    upstreams: Mapping[str, UpstreamConfig],
    events_enabled: bool,
    consul_enabled: bool,
) -> AlertRuleConfig:
    defaults = AlertRuleConfig(name="", kind="")
    name = r.require("name", _alert_name, "")
    kind = r.require("kind", _choice(*ALERT_KINDS), "")
    upstream: str | None = None
    threshold: float | None = None
    window, min_requests = defaults.window, defaults.min_requests
    if not kind:  # unknown kind: its other fields cannot be judged
        r.seen.update(("upstream", "threshold", "window", "min_requests"))
    if kind in UPSTREAM_ALERT_KINDS:
        upstream = r.require("upstream", _string, "").strip().lower() or None
        if upstream is not None and upstream not in upstreams:
            r.ctx.problem(r.at("upstream"), f"no upstream named {upstream!r} is configured")
    elif kind:
        r.reject("upstream", f"a {kind} rule names no upstream")
    threshold_parsers: dict[str, Callable[[object], float]] = {
        "error_rate": _ratio,
        "latency_p99": _duration(),
        "spool_depth": _integer(1),
    }
    if kind in threshold_parsers:
        threshold = r.require("threshold", threshold_parsers[kind], None)
        threshold = None if threshold is None else float(threshold)
    elif kind:
        r.reject("threshold", f"a {kind} rule has no threshold (it is a yes/no condition)")
    if kind in WINDOWED_ALERT_KINDS:
        window = r.get("window", _duration(), defaults.window)
        if window < interval:
            r.ctx.problem(
                r.at("window"),
                f"must be at least evaluation_interval ({window:g}s < {interval:g}s)",
            )
        elif window / interval > _MAX_WINDOW_SAMPLES:
            r.ctx.problem(
                r.at("window"),
                f"at most {_MAX_WINDOW_SAMPLES} evaluation intervals "
                f"({window:g}s / {interval:g}s); raise evaluation_interval",
            )
        min_requests = r.get("min_requests", _integer(1), defaults.min_requests)
    elif kind:
        r.reject("window", f"a {kind} rule looks at the current state, not a window")
        r.reject("min_requests", "only error_rate and latency_p99 rules count requests")
    if kind in ("spool_depth", "broker_unreachable") and not events_enabled:
        r.ctx.problem(r.at("kind"), f"{kind} watches the event relay: needs an events section")
    if kind == "consul_unreachable" and not consul_enabled:
        r.ctx.problem(r.at("kind"), "consul_unreachable needs consul.enabled")
    rule = AlertRuleConfig(
        name=name,
        kind=kind,
        upstream=upstream,
        threshold=threshold,
        window=window,
        for_=r.get("for", _duration(allow_zero=True), defaults.for_),
        severity=r.get("severity", _severity, defaults.severity),
        summary=r.get("summary", _string, ""),
        description=r.get("description", _string, ""),
        min_requests=min_requests,
    )
    r.done()
    return rule


def _check_ports(
    ctx: _Context, listen: Address, admin: AdminConfig, upstreams: Mapping[str, UpstreamConfig]
) -> None:
    """Two listeners on one address would fail at bind time.

    Addresses clash on the same port when their hosts are equal or one is a wildcard
    (0.0.0.0, ::). Port 0 (ephemeral) never clashes; neither do two different host
    names, which only binding can tell apart.
    """
    listeners = [("listen", listen), ("admin.listen", admin.listen)]
    listeners += [(f"upstreams.{u.name}.listen", u.listen) for u in upstreams.values() if u.listen]
    taken: list[tuple[str, Address]] = []
    for path, address in listeners:
        if address.port == 0:
            continue
        for owner, other in taken:
            if other.port == address.port and (
                other.host == address.host or other.host in _WILDCARDS or address.host in _WILDCARDS
            ):
                ctx.problem(path, f"{address} clashes with {owner} ({other})")
                break
        else:
            taken.append((path, address))
