"""Configuration model, parsing helpers and validation (SPEC §3)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import config as config_module
from sidecar.cli import main
from sidecar.config import (
    ENV_VARS,
    Address,
    Config,
    FallbackConfig,
    RetryConfig,
    UpstreamConfig,
    config_from_mapping,
    load_config,
    parse_duration,
    parse_size,
)
from sidecar.errors import ConfigError

PORT_MESSAGE = (
    "service.port: required when consul.enabled is true (registered and probed; "
    "SIDECAR_SERVICE_PORT)"
)


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in recursively."""
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        both = isinstance(old, Mapping) and isinstance(value, Mapping)
        merged[key] = merge(old, value) if both else value  # type: ignore[arg-type]
    return merged


BASE: dict[str, Any] = {
    "service": {"name": "permits", "address": "10.1.2.3"},
    "consul": {"enabled": False},
}


def build(
    extra: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    return config_from_mapping(merge(BASE, extra or {}), environ or {})


def problems(
    extra: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] = BASE,
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(merge(base, extra or {}), environ or {})
    return info.value.problems


def upstream(**fields: Any) -> dict[str, Any]:
    return {"upstreams": {"billing": {"endpoints": ["10.0.0.1:8080"], **fields}}}


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("500ms", 0.5),
            ("10s", 10.0),
            ("1m", 60.0),
            ("1m30s", 90.0),
            ("2h", 7200.0),
            ("1.5s", 1.5),
            ("5", 5.0),
            (7, 7.0),
            (0.25, 0.25),
            (" 3s ", 3.0),
        ],
    )
    def test_accepts_units_and_plain_seconds(self, text: str | float, expected: float) -> None:
        """ms, s, m, h, combinations of them and bare numbers are seconds as float."""
        assert expected == parse_duration(text)

    @pytest.mark.parametrize("value", ["ten", "", "5x", "-1s", "1s2", "ms", -1, True, None, [1]])
    def test_rejects_anything_else(self, value: object) -> None:
        """A value that is not a non-negative duration raises ValueError naming it (or
        its kind, for a container)."""
        with pytest.raises(ValueError, match="invalid duration") as info:
            parse_duration(value)
        shown = "list" if isinstance(value, list) else repr(value)
        assert f"invalid duration {shown}" == str(info.value)

    @given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["s", "m", "h"]))
    def test_whole_units_round_trip(self, amount: int, unit: str) -> None:
        """`<n><unit>` is n times the unit's length in seconds."""
        assert amount * {"s": 1, "m": 60, "h": 3600}[unit] == parse_duration(f"{amount}{unit}")

    @given(st.integers(min_value=0, max_value=10**9))
    def test_milliseconds_round_trip(self, millis: int) -> None:
        """`<n>ms` is n / 1000 seconds."""
        assert millis / 1000 == parse_duration(f"{millis}ms")

    @given(
        st.integers(min_value=0, max_value=99),
        st.integers(min_value=0, max_value=59),
        st.integers(min_value=0, max_value=59),
    )
    def test_combined_units_add_up(self, hours: int, minutes: int, seconds: int) -> None:
        """`1h2m3s` is the sum of its parts."""
        text = f"{hours}h{minutes}m{seconds}s"
        assert hours * 3600 + minutes * 60 + seconds == parse_duration(text)

    @given(st.floats(min_value=0, max_value=1e12, allow_nan=False))
    def test_numbers_are_seconds(self, seconds: float) -> None:
        """A number is taken as seconds unchanged."""
        assert seconds == parse_duration(seconds)


class TestParseSize:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("512MiB", 512 * 1024**2),
            ("1KB", 1000),
            ("1kB", 1000),
            ("1KiB", 1024),
            ("2GB", 2 * 10**9),
            ("1TiB", 1024**4),
            ("100B", 100),
            ("100", 100),
            ("1.5KiB", 1536),
            (4096, 4096),
        ],
    )
    def test_accepts_decimal_and_binary_units(self, text: str | int, expected: int) -> None:
        """KB/MB/GB/TB are powers of 1000, KiB..TiB powers of 1024, a bare number is bytes."""
        assert expected == parse_size(text)

    @pytest.mark.parametrize("value", ["big", "", "1 XB", "-1KB", -1, 1.5, True, None])
    def test_rejects_anything_else(self, value: object) -> None:
        """A value that is not a non-negative size raises ValueError naming it."""
        with pytest.raises(ValueError, match="invalid size") as info:
            parse_size(value)
        assert f"invalid size {value!r}" == str(info.value)

    @given(
        st.integers(min_value=0, max_value=10**6),
        st.sampled_from(["B", "KB", "MB", "GB", "KiB", "MiB", "GiB", "TiB"]),
    )
    def test_units_round_trip(self, amount: int, unit: str) -> None:
        """`<n><unit>` is n times the unit's size in bytes."""
        factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}.get(unit)
        expected = amount * (factor or 1024 ** ("KMGT".index(unit[0]) + 1))
        assert expected == parse_size(f"{amount}{unit}")

    @given(st.integers(min_value=0))
    def test_integers_are_bytes(self, amount: int) -> None:
        """An int is taken as bytes unchanged."""
        assert amount == parse_size(amount)


class TestAddress:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1:4001", Address("127.0.0.1", 4001)),
            ("0.0.0.0:0", Address("0.0.0.0", 0)),
            ("[::1]:9902", Address("::1", 9902)),
            ("billing.internal:80", Address("billing.internal", 80)),
        ],
    )
    def test_parses_host_and_port(self, text: str, expected: Address) -> None:
        """host:port and [v6]:port parse to host and int port, without brackets."""
        assert expected == Address.parse(text)

    @given(
        st.one_of(
            st.ip_addresses().map(str),
            st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
        ),
        st.integers(min_value=0, max_value=65535),
    )
    def test_str_round_trips(self, host: str, port: int) -> None:
        """str(Address) is host:port ([v6]:port) and parses back to the same Address."""
        address = Address(host, port)
        assert address == Address.parse(str(address))

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("127.0.0.1", "expected host:port"),
            ("::1:80", "expected host:port"),
            ("host:", "expected host:port"),
            ("a b:80", "expected host:port"),
            ("[1::2::3]:80", "bad IPv6 literal"),
            ("host:65536", "port must be 0-65535"),
        ],
    )
    def test_rejects_malformed_addresses(self, text: str, reason: str) -> None:
        """A malformed address raises ValueError quoting it and saying what is wrong."""
        with pytest.raises(ValueError, match="invalid address") as info:
            Address.parse(text)
        assert f"invalid address {text!r} ({reason})" == str(info.value)


class TestDefaults:
    def test_minimal_config_gets_documented_defaults(self) -> None:
        """A config naming only the service gets SPEC §3's defaults everywhere."""
        config = build()
        assert Address("127.0.0.1", 4001) == config.listen
        assert Address("0.0.0.0", 9902) == config.admin.listen
        assert f"permits-{socket.gethostname()}" == config.service.id
        assert (None, 10.0, 2.0, 60.0) == (
            config.service.health.path,
            config.service.health.interval,
            config.service.health.timeout,
            config.service.health.deregister_critical_after,
        )
        assert ("json", "info") == (config.telemetry.log_format, config.telemetry.log_level)
        assert (5.0, 20.0) == (config.shutdown.drain, config.shutdown.grace)
        assert (300.0, 30.0, 65536) == (
            config.app_connections.idle_timeout,
            config.app_connections.header_timeout,
            config.app_connections.max_header_bytes,
        )
        assert "http://127.0.0.1:8500" == config.consul.address
        assert {} == dict(config.upstreams)

    def test_upstream_defaults(self) -> None:
        """An upstream with only endpoints gets the documented timeouts, retries and limits."""
        billing = build(upstream()).upstreams["billing"]
        expected = UpstreamConfig(name="billing", endpoints=(Address("10.0.0.1", 8080),))
        assert expected == billing
        assert "billing" == billing.service
        assert RetryConfig() == billing.retries
        assert frozenset({502, 503, 504}) == billing.retries.on_statuses
        assert (True, False, False) == (
            billing.retries.on_connect_failure,
            billing.retries.on_timeout,
            billing.retries.on_reset,
        )

    def test_service_address_defaults_to_first_non_loopback_ipv4(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without service.address, the host's first non-loopback IPv4 address is used."""
        answers = [(socket.AF_INET, 1, 6, "", (ip, 0)) for ip in ("127.0.1.1", "10.9.8.7")]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *_: answers)
        config = config_from_mapping({"service": {"name": "a"}, "consul": {"enabled": False}}, {})
        assert "10.9.8.7" == config.service.address

    @pytest.mark.parametrize("failure", [True, False])
    def test_service_address_falls_back_to_loopback(
        self, monkeypatch: pytest.MonkeyPatch, failure: bool
    ) -> None:
        """With no non-loopback address (or a resolver error) the default is 127.0.0.1."""

        def getaddrinfo(*_: object) -> list[tuple[Any, ...]]:
            if failure:
                raise socket.gaierror("no such host")
            return [(socket.AF_INET, 1, 6, "", ("127.0.0.1", 0))]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        config = config_from_mapping({"service": {"name": "a"}, "consul": {"enabled": False}}, {})
        assert "127.0.0.1" == config.service.address

    def test_config_is_frozen(self) -> None:
        """Config objects are inert values: assigning to a field fails."""
        config = build()
        with pytest.raises(AttributeError):
            config.listen = Address("127.0.0.1", 1)  # type: ignore[misc]
        with pytest.raises(TypeError):
            config.upstreams["x"] = config.upstreams.get("x")  # type: ignore[index]


class TestService:
    def test_name_is_required(self) -> None:
        """A config without service.name reports it as required."""
        assert ["service.name: required"] == problems(base={"consul": {"enabled": False}})

    def test_name_must_look_like_a_dns_label(self) -> None:
        """A service name with spaces or a leading dash is rejected."""
        assert [
            "service.name: invalid name '-bad name' (expected letters, digits, '.', '_' or '-')"
        ] == problems({"service": {"name": "-bad name"}})

    def test_fields_are_read(self) -> None:
        """id, address, port, tags, meta and health come from the file."""
        service = build(
            {
                "service": {
                    "id": "permits-1",
                    "port": 8080,
                    "tags": ["v1", "blue"],
                    "meta": {"version": "1.4.2"},
                    "health": {"path": "/healthz", "interval": "5s", "timeout": "500ms"},
                }
            }
        ).service
        assert ("permits-1", "10.1.2.3", 8080) == (service.id, service.address, service.port)
        assert ("v1", "blue") == service.tags
        assert {"version": "1.4.2"} == dict(service.meta)
        assert ("/healthz", 5.0, 0.5) == (
            service.health.path,
            service.health.interval,
            service.health.timeout,
        )

    def test_wrong_types_are_reported_with_their_path(self) -> None:
        """Each mistyped value is reported at its own path."""
        assert [
            "service.port: must be between 1 and 65535, got 70000",
            "service.tags[1]: expected a string, got integer",
            "service.meta.version: expected a string, got number",
            "service.health.path: invalid path 'healthz' (expected an absolute path like /healthz)",
            "service.health.interval: invalid duration 'often'",
        ] == problems(
            {
                "service": {
                    "port": 70000,
                    "tags": ["v1", 2],
                    "meta": {"version": 1.4},
                    "health": {"path": "healthz", "interval": "often"},
                }
            }
        )


class TestUpstreams:
    def test_names_are_stored_lower_case(self) -> None:
        """Upstream names are Host names: `Billing` is stored as `billing`."""
        config = build({"upstreams": {"Billing": {"endpoints": ["10.0.0.1:80"]}}})
        assert ["billing"] == list(config.upstreams)
        assert "billing" == config.upstreams["billing"].name

    @pytest.mark.parametrize("name", ["bad name", "-billing", "billing-", "bill/ing", "a" * 254])
    def test_rejects_names_unusable_as_host(self, name: str) -> None:
        """A name that cannot be a Host header value is rejected."""
        assert [
            f"upstreams.{name}: invalid upstream name (expected lower-case letters, digits, "
            "'.', '_' or '-', usable as a Host header)"
        ] == problems({"upstreams": {name: {"endpoints": ["10.0.0.1:80"]}}})

    def test_names_differing_only_in_case_collide(self) -> None:
        """`Billing` and `billing` are the same upstream, so the second is reported."""
        endpoints = {"endpoints": ["10.0.0.1:80"]}
        assert ["upstreams.billing: duplicates upstream 'billing' (names ignore case)"] == problems(
            {"upstreams": {"Billing": endpoints, "billing": endpoints}}
        )

    def test_fields_are_read(self) -> None:
        """Every upstream field is parsed into the model."""
        billing = build(
            upstream(
                service="billing-v2",
                tags=["blue"],
                listen="127.0.0.1:9191",
                timeout="5s",
                per_try_timeout="1s",
                retries={
                    "max": 3,
                    "on": ["timeout", "reset", 500, "503"],
                    "budget_ratio": 0.5,
                    "min_retries_per_second": 1,
                },
                circuit_breaker={"failure_threshold": 3, "open_for": "10s", "half_open_probes": 2},
                outlier={"consecutive_failures": 2, "base_ejection": "1s", "max_ejection": "1m"},
                max_concurrent_requests=10,
                balancer="least_request",
            )
        ).upstreams["billing"]
        assert ("billing-v2", ("blue",)) == (billing.service, billing.tags)
        assert Address("127.0.0.1", 9191) == billing.listen
        assert (5.0, 1.0) == (billing.timeout, billing.per_try_timeout)
        assert RetryConfig(3, False, True, True, frozenset({500, 503}), 0.5, 1.0) == billing.retries
        assert (3, 10.0, 2) == (
            billing.circuit_breaker.failure_threshold,
            billing.circuit_breaker.open_for,
            billing.circuit_breaker.half_open_probes,
        )
        assert (2, 1.0, 60.0, 50) == (
            billing.outlier.consecutive_failures,
            billing.outlier.base_ejection,
            billing.outlier.max_ejection,
            billing.outlier.max_ejection_percent,
        )
        assert (10, "least_request") == (billing.max_concurrent_requests, billing.balancer)

    def test_5xx_expands_to_every_server_error(self) -> None:
        """`5xx` in retries.on means every status 500-599."""
        retries = build(upstream(retries={"on": ["5xx"]})).upstreams["billing"].retries
        assert frozenset(range(500, 600)) == retries.on_statuses
        assert False is retries.on_connect_failure

    def test_unknown_retry_condition_is_reported_at_its_index(self) -> None:
        """An unknown condition names its list index and the accepted ones."""
        assert [
            "upstreams.billing.retries.on[2]: unknown condition 'teapot' (expected "
            "connect-failure, timeout, reset, 5xx or a status 500-599)",
            "upstreams.billing.retries.on[3]: unknown condition 418 (expected "
            "connect-failure, timeout, reset, 5xx or a status 500-599)",
        ] == problems(upstream(retries={"on": ["connect-failure", 502, "teapot", 418]}))

    def test_per_try_timeout_defaults_within_timeout(self) -> None:
        """A short timeout without per_try_timeout caps the per-try default at it."""
        billing = build(upstream(timeout="1s")).upstreams["billing"]
        assert 1.0 == billing.per_try_timeout

    def test_per_try_timeout_must_not_exceed_timeout(self) -> None:
        """per_try_timeout longer than the whole-request timeout is an error."""
        assert [
            "upstreams.billing.per_try_timeout: must not exceed timeout (20s > 10s)"
        ] == problems(upstream(per_try_timeout="20s"))

    def test_invalid_duration_names_the_value(self) -> None:
        """A bad duration quotes the value at its path."""
        assert ["upstreams.billing.timeout: invalid duration 'ten'"] == problems(
            upstream(timeout="ten")
        )

    def test_durations_must_be_positive(self) -> None:
        """Zero is not a timeout; it is reported."""
        assert ["upstreams.billing.timeout: must be greater than 0"] == problems(
            upstream(timeout=0)
        )

    def test_endpoints_need_a_port(self) -> None:
        """Endpoints are host:port with port 1-65535; each bad one is reported at its index."""
        assert [
            "upstreams.billing.endpoints[0]: invalid address '10.0.0.1' (expected host:port)",
            "upstreams.billing.endpoints[1]: invalid address '10.0.0.2:0' (port must be 1-65535)",
        ] == problems(upstream(endpoints=["10.0.0.1", "10.0.0.2:0", "[::1]:80"]))

    def test_invalid_endpoints_are_not_also_reported_missing(self) -> None:
        """When every endpoint is invalid, only the invalid entries are reported."""
        assert [
            "upstreams.billing.endpoints[0]: invalid address 'nowhere' (expected host:port)"
        ] == problems(upstream(endpoints=["nowhere"]))

    def test_endpoints_are_required_without_consul(self) -> None:
        """With Consul disabled, an upstream without endpoints has nowhere to go."""
        assert ["upstreams.billing.endpoints: required when consul.enabled is false"] == problems(
            {"upstreams": {"billing": None}}
        )

    def test_limits_are_checked(self) -> None:
        """Counts and ratios outside their ranges are reported with the range."""
        assert [
            "upstreams.billing.retries.max: must be between 0 and 10, got 11",
            "upstreams.billing.retries.budget_ratio: must be between 0 and 1, got 1.5",
            "upstreams.billing.circuit_breaker.failure_threshold: must be at least 1, got 0",
            "upstreams.billing.outlier.max_ejection_percent: must be between 0 and 100, got 101",
            "upstreams.billing.outlier.max_ejection: must not be less than base_ejection "
            "(10s < 30s)",
            "upstreams.billing.max_concurrent_requests: expected an integer, got string",
            "upstreams.billing.balancer: expected peak_ewma or least_request, got 'random'",
        ] == problems(
            upstream(
                retries={"max": 11, "budget_ratio": 1.5},
                circuit_breaker={"failure_threshold": 0},
                outlier={"max_ejection_percent": 101, "max_ejection": "10s"},
                max_concurrent_requests="many",
                balancer="random",
            )
        )


class TestFallback:
    def test_json_body(self) -> None:
        """`json:` is serialised and served as application/json."""
        fallback = build(upstream(fallback={"status": 200, "json": {"items": []}}))
        assert FallbackConfig(200, b'{"items": []}', "application/json") == (
            fallback.upstreams["billing"].fallback
        )

    def test_text_body_and_headers(self) -> None:
        """`text:` is served as UTF-8 plain text, with any extra headers."""
        fallback = (
            build(
                upstream(
                    fallback={"status": 503, "text": "später", "headers": {"Retry-After": "5"}}
                )
            )
            .upstreams["billing"]
            .fallback
        )
        expected = FallbackConfig(
            503, "später".encode(), "text/plain; charset=utf-8", (("Retry-After", "5"),)
        )
        assert expected == fallback

    def test_problems_are_reported(self) -> None:
        """Missing status, both bodies and a bad header name are each reported."""
        assert [
            "upstreams.billing.fallback.status: required",
            "upstreams.billing.fallback.headers.bad name: invalid header name",
            "upstreams.billing.fallback: json and text are mutually exclusive",
        ] == problems(upstream(fallback={"json": 1, "text": "x", "headers": {"bad name": "v"}}))

    def test_content_type_header_replaces_the_implied_one(self) -> None:
        """A Content-Type among the headers is used instead of text/plain."""
        fallback = (
            build(
                upstream(
                    fallback={
                        "status": 200,
                        "text": "<p>later</p>",
                        "headers": {"Content-Type": "text/html"},
                    }
                )
            )
            .upstreams["billing"]
            .fallback
        )
        assert FallbackConfig(200, b"<p>later</p>", "text/html") == fallback

    def test_framing_headers_are_refused(self) -> None:
        """Content-Length, Transfer-Encoding and Connection are the sidecar's to write."""
        assert [
            "upstreams.billing.fallback.headers.Content-Length: set by the sidecar; remove it",
            "upstreams.billing.fallback.headers.connection: set by the sidecar; remove it",
        ] == problems(
            upstream(
                fallback={"status": 200, "headers": {"Content-Length": "3", "connection": "x"}}
            )
        )


class TestAppConnections:
    def test_fields_are_read(self) -> None:
        config = build(
            {
                "app_connections": {
                    "idle_timeout": "90s",
                    "header_timeout": "500ms",
                    "max_header_bytes": "8KiB",
                }
            }
        )
        assert (90.0, 0.5, 8192) == (
            config.app_connections.idle_timeout,
            config.app_connections.header_timeout,
            config.app_connections.max_header_bytes,
        )

    def test_problems_are_reported_with_their_path(self) -> None:
        assert [
            "app_connections.idle_timeout: must be greater than 0",
            "app_connections.header_timeout: invalid duration 'soon'",
            "app_connections.max_header_bytes: must be between 1024 and 16777216 bytes, got 100",
            "app_connections.keepalive: unknown key",
        ] == problems(
            {
                "app_connections": {
                    "idle_timeout": "0s",
                    "header_timeout": "soon",
                    "max_header_bytes": 100,
                    "keepalive": True,
                }
            }
        )


class TestConsulRegistrationKeys:
    def test_defaults(self) -> None:
        """Agent mode, the host name as node, the local agent's address."""
        consul = build({"consul": {"enabled": True}, "service": {"port": 8080}}).consul
        assert ("agent", "http://127.0.0.1:8500") == (consul.mode, consul.address)
        assert consul.node

    def test_catalog_mode_and_node_from_file_and_env(self) -> None:
        """mode and node come from the file; SIDECAR_CONSUL_MODE/NODE win over it."""
        extra = {"consul": {"mode": "catalog", "node": "pod-a"}}
        assert ("catalog", "pod-a") == (build(extra).consul.mode, build(extra).consul.node)
        env = {"SIDECAR_CONSUL_MODE": "agent", "SIDECAR_CONSUL_NODE": "pod-b"}
        assert ("agent", "pod-b") == (build(extra, env).consul.mode, build(extra, env).consul.node)

    def test_bad_mode_and_node(self) -> None:
        """An unknown mode and a node name Consul would not take are named."""
        assert [
            "consul.mode: expected agent or catalog, got 'mesh'",
            "consul.node: invalid node name 'a b' (letters, digits, '.' and '-', at most 64 "
            "characters)",
        ] == problems({"consul": {"mode": "mesh", "node": "a b"}})

    def test_https_address_without_scheme_and_with(self) -> None:
        """CONSUL_HTTP_ADDR may be host:port or a full http(s) URL; it wins over the file."""
        extra = {"consul": {"address": "http://file:8500"}}
        assert (
            "http://agent:8500" == build(extra, {"CONSUL_HTTP_ADDR": "agent:8500"}).consul.address
        )
        env = {"CONSUL_HTTP_ADDR": "https://consul.example:8501"}
        assert "https://consul.example:8501" == build(extra, env).consul.address

    @pytest.mark.parametrize(
        ("meta", "reason"),
        [
            (
                {"app.version": "1"},
                "key may only hold letters, digits, '_' and '-' (Consul rejects others)",
            ),
            ({"consul-x": "1"}, "key prefix 'consul-' is reserved for Consul's internal use"),
            ({"k" * 129: "1"}, "key is too long (Consul's limit: 128 characters)"),
            ({"v": "x" * 513}, "value is too long (Consul's limit: 512 characters)"),
        ],
    )
    def test_meta_is_held_to_consuls_rules(self, meta: dict[str, str], reason: str) -> None:
        """A meta pair Consul would refuse with 400 at registration fails check-config."""
        (key,) = meta
        assert [f"service.meta.{key}: {reason}"] == problems({"service": {"meta": meta}})

    def test_meta_pair_count_is_limited(self) -> None:
        """More than 64 meta pairs: Consul's limit, reported once."""
        meta = {f"k{i}": "v" for i in range(65)}
        assert ["service.meta: at most 64 pairs (Consul's limit), got 65"] == problems(
            {"service": {"meta": meta}}
        )

    def test_discovery_bounds(self) -> None:
        """allow_any_service's watch bound and idle period are configurable."""
        discovery = build(
            {
                "consul": {"enabled": True},
                "service": {"port": 8080},
                "discovery": {"allow_any_service": True, "max_services": 5, "idle_after": "1m"},
            }
        ).discovery
        assert (True, 5, 60.0) == (
            discovery.allow_any_service,
            discovery.max_services,
            discovery.idle_after,
        )


class TestEvents:
    def test_off_without_a_section_on_with_one(self) -> None:
        """No events section: no relay. An empty one turns it on with the defaults."""
        assert False is build().events.enabled
        events = build({"events": {"exchange": "events"}}).events
        assert (True, "events", 1024 * 1024, 512 * 1024 * 1024) == (
            events.enabled,
            events.exchange,
            events.max_event_bytes,
            events.spool.max_bytes,
        )

    def test_default_spool_path_is_the_users_state_directory(self) -> None:
        """Without a path, the spool lives under XDG_STATE_HOME (a laptop needs no root)."""
        path = build({"events": {"exchange": "events"}}).events.spool.path
        assert path.endswith(".spool.db")
        assert "hms-sidecar" in path

    def test_env_wins_for_url_and_spool_path(self, tmp_path: Path) -> None:
        """SIDECAR_AMQP_URL turns events on; SIDECAR_SPOOL_PATH sets the spool."""
        env = {
            "SIDECAR_AMQP_URL": "amqp://u:p@rabbit:5672/vh",
            "SIDECAR_SPOOL_PATH": str(tmp_path / "s.db"),
        }
        events = build(environ=env).events
        assert (True, "amqp://u:p@rabbit:5672/vh", str(tmp_path / "s.db")) == (
            events.enabled,
            events.amqp_url,
            events.spool.path,
        )
        assert "u:p@" not in repr(events)

    def test_a_raw_slash_in_the_password_is_refused(self) -> None:
        """`amqp://app:4321/pw@host/` would parse as host `app` and show the password."""
        assert [
            "events.amqp_url: invalid URL: percent-encode '/', '?', '#' and '@' in the user "
            "name and password"
        ] == problems({"events": {"amqp_url": "amqp://app:4321/Secr3t@127.0.0.1:5672/"}})

    def test_url_from_a_secret_file(self, tmp_path: Path) -> None:
        """SIDECAR_AMQP_URL_FILE holds the URL (a Kubernetes Secret mounted as a file)."""
        secret = tmp_path / "amqp"
        secret.write_text("amqp://svc:s3cret@rabbit:5672/\n")
        events = build(environ={"SIDECAR_AMQP_URL_FILE": str(secret)}).events
        assert "amqp://svc:s3cret@rabbit:5672/" == events.amqp_url

    def test_subscriptions_are_validated(self) -> None:
        """Names, topic patterns, paths and limits are checked; a port is required."""
        assert [
            "events.subscriptions[0].topic: invalid topic pattern 'permit..*' (dot-separated "
            "words of letters, digits, '_' or '-', or '*' for one word and '#' for any number)",
            "events.subscriptions[0].path: invalid path 'events' (expected an absolute path "
            "like /healthz)",
            "events.subscriptions[0].prefetch: must be between 1 and 2000, got 5000",
            "events.subscriptions[1].name: duplicates subscription 'a'",
            "events.subscriptions: need service.port: events are POSTed to the app",
        ] == problems(
            {
                "events": {
                    "subscriptions": [
                        {"name": "a", "topic": "permit..*", "path": "events", "prefetch": 5000},
                        {"name": "a", "topic": "permit.#", "path": "/e"},
                    ]
                }
            }
        )

    def test_a_good_subscription(self) -> None:
        """Every key of SPEC §6's example."""
        (sub,) = build(
            {
                "service": {"port": 8080},
                "events": {
                    "subscriptions": [
                        {
                            "name": "permit-updates",
                            "topic": "permit.*",
                            "path": "/events/permits",
                            "max_attempts": 5,
                            "backoff": {"initial": "1s", "max": "60s"},
                            "prefetch": 32,
                        }
                    ]
                },
            }
        ).events.subscriptions
        assert ("permit-updates", "permit.*", "/events/permits", 5, 1.0, 60.0, 32) == (
            sub.name,
            sub.topic,
            sub.path,
            sub.max_attempts,
            sub.backoff_initial,
            sub.backoff_max,
            sub.prefetch,
        )


class TestCrossChecks:
    def test_consul_registration_needs_the_app_port(self) -> None:
        """With Consul on (the default) the app's port is required: it is registered and probed."""
        assert [PORT_MESSAGE] == problems(base={"service": {"name": "permits"}})

    def test_consul_keys_are_validated_even_when_disabled(self, tmp_path: Path) -> None:
        """address, token_file and ca_file are checked whether Consul is on or off."""
        missing = tmp_path / "missing"
        assert [
            "consul.address: invalid URL 'ftp://consul' (expected http://host:port or "
            "https://host:port)",
            f"consul.token_file: cannot read '{missing}' (No such file or directory)",
            f"consul.ca_file: no such file '{missing}'",
        ] == problems(
            {
                "consul": {
                    "address": "ftp://consul",
                    "token_file": str(missing),
                    "ca_file": str(missing),
                }
            }
        )

    def test_token_is_not_accepted_in_the_file(self) -> None:
        """A Consul token written into the config file is refused: it belongs in a secret."""
        assert [
            "consul.token: secrets do not belong in the config file; use token_file or "
            "CONSUL_HTTP_TOKEN"
        ] == problems({"consul": {"token": "s3cr3t"}})

    def test_allow_any_service_needs_consul(self) -> None:
        """Routing any Consul service name makes no sense without Consul."""
        assert ["discovery.allow_any_service: needs consul.enabled"] == problems(
            {"discovery": {"allow_any_service": True}}
        )

    def test_listen_addresses_must_not_collide(self) -> None:
        """The same host and port twice clashes, and so does a wildcard host on that port."""
        assert [
            "admin.listen: 0.0.0.0:4001 clashes with listen (127.0.0.1:4001)",
            "upstreams.billing.listen: 127.0.0.1:4001 clashes with listen (127.0.0.1:4001)",
        ] == problems({"admin": {"listen": "0.0.0.0:4001"}, **upstream(listen="127.0.0.1:4001")})

    def test_different_hosts_may_share_a_port(self) -> None:
        """127.0.0.1:9000 and 127.0.0.2:9000 are different sockets."""
        config = build({"listen": "127.0.0.1:9000", "admin": {"listen": "127.0.0.2:9000"}})
        assert (9000, 9000) == (config.listen.port, config.admin.listen.port)

    def test_port_zero_never_collides(self) -> None:
        """Ephemeral port 0 may be used by several listeners at once."""
        config = build(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": "127.0.0.1:0"},
                **upstream(listen="127.0.0.1:0"),
            }
        )
        assert 0 == config.admin.listen.port


class TestUnknownAndUnsupportedKeys:
    def test_unknown_key_is_reported(self) -> None:
        """A misspelt key is an error, not silently ignored."""
        assert ["upstreams.billing.timout: unknown key"] == problems(upstream(timout="3s"))

    def test_unknown_keys_in_small_sections_are_reported(self) -> None:
        """Typos under shutdown and discovery are errors too."""
        assert [
            "discovery.allow_any: unknown key",
            "shutdown.grace_period: unknown key",
        ] == problems({"discovery": {"allow_any": True}, "shutdown": {"grace_period": "30s"}})

    def test_every_documented_section_is_accepted(self) -> None:
        """Every documented section is accepted; a key no build knows is unknown."""
        assert [
            "surprise: unknown key",
        ] == problems({"events": {}, "alerts": {}, "telemetry": {"tracing": {}}, "surprise": 1})

    def test_sections_must_be_mappings(self) -> None:
        """A section given as a scalar or list is a type error at its path."""
        assert [
            "admin: expected a mapping, got string",
            "upstreams: expected a mapping, got list",
        ] == problems({"admin": "0.0.0.0:9902", "upstreams": ["billing"]})

    def test_every_problem_is_reported_at_once(self) -> None:
        """Problems in different sections are all collected before raising."""
        found = problems(
            {"service": {"port": "x"}, "listen": "nowhere", **upstream(timeout="ten")},
            base={"consul": {"enabled": False}},
        )
        assert [
            "service.name: required",
            "service.port: expected an integer, got string",
            "listen: invalid address 'nowhere' (expected host:port)",
            "upstreams.billing.timeout: invalid duration 'ten'",
        ] == found

    def test_top_level_must_be_a_mapping(self) -> None:
        """A YAML document that is not a mapping is one problem naming the source."""
        with pytest.raises(ConfigError) as info:
            config_from_mapping([1, 2], {}, source="x.yaml")  # type: ignore[arg-type]
        assert ["x.yaml: expected a mapping at the top level, got list"] == info.value.problems


class TestEnvironment:
    def test_overrides_win_over_the_file(self, tmp_path: Path) -> None:
        """Every documented env var replaces the file's value."""
        token_file = tmp_path / "token"
        token_file.write_text("from-file\n")
        ca_file = tmp_path / "ca.pem"
        ca_file.write_text("pem")
        config = build(
            {"listen": "127.0.0.1:1", "telemetry": {"log_format": "json"}},
            environ={
                "SIDECAR_SERVICE_NAME": "orders",
                "SIDECAR_SERVICE_ADDRESS": "10.0.0.9",
                "SIDECAR_SERVICE_PORT": "8081",
                "SIDECAR_LISTEN": "127.0.0.1:4101",
                "SIDECAR_ADMIN_LISTEN": "[::]:9903",
                "SIDECAR_LOG_FORMAT": "console",
                "SIDECAR_LOG_LEVEL": "DEBUG",
                "CONSUL_HTTP_ADDR": "consul.local:8501",
                "CONSUL_HTTP_TOKEN_FILE": str(token_file),
                "CONSUL_CACERT": str(ca_file),
            },
        )
        assert ("orders", "10.0.0.9", 8081) == (
            config.service.name,
            config.service.address,
            config.service.port,
        )
        assert ("127.0.0.1:4101", "[::]:9903") == (str(config.listen), str(config.admin.listen))
        assert ("console", "debug") == (config.telemetry.log_format, config.telemetry.log_level)
        assert ("http://consul.local:8501", "from-file", str(ca_file)) == (
            config.consul.address,
            config.consul.token,
            config.consul.ca_file,
        )

    def test_token_variable_wins_over_token_file(self, tmp_path: Path) -> None:
        """CONSUL_HTTP_TOKEN beats the token file, and neither shows in repr()."""
        token_file = tmp_path / "token"
        token_file.write_text("from-file")
        config = build(
            {"consul": {"token_file": str(token_file)}},
            environ={"CONSUL_HTTP_TOKEN": "from-env"},
        )
        assert "from-env" == config.consul.token
        assert "from-env" not in repr(config)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [("false", False), ("0", False), ("No", False), ("true", True), ("1", True), ("yes", True)],
    )
    def test_consul_enabled_accepts_common_booleans(self, text: str, expected: bool) -> None:
        """SIDECAR_CONSUL_ENABLED takes true/false/1/0/yes/no in any case."""
        environ = {"SIDECAR_CONSUL_ENABLED": text}
        if expected:
            assert [PORT_MESSAGE] == problems(environ=environ)
            assert True is build({"service": {"port": 8080}}, environ).consul.enabled
        else:
            assert False is build({"consul": {"enabled": True}}, environ).consul.enabled

    def test_bad_values_are_reported_under_the_variable_name(self) -> None:
        """A bad override names the env var, not the config path."""
        assert [
            "SIDECAR_SERVICE_PORT: invalid port 'abc'",
            "SIDECAR_LISTEN: invalid address 'localhost' (expected host:port)",
            "SIDECAR_CONSUL_ENABLED: invalid boolean 'maybe' "
            "(expected true, false, 1, 0, yes or no)",
            "SIDECAR_LOG_LEVEL: expected debug, info, warning or error, got 'loud'",
        ] == problems(
            environ={
                "SIDECAR_SERVICE_PORT": "abc",
                "SIDECAR_LISTEN": "localhost",
                "SIDECAR_CONSUL_ENABLED": "maybe",
                "SIDECAR_LOG_LEVEL": "loud",
            }
        )

    def test_empty_variables_count_as_unset(self) -> None:
        """`SIDECAR_LISTEN=` keeps the file's value instead of failing or blanking it."""
        config = build({"listen": "127.0.0.1:4002"}, environ={"SIDECAR_LISTEN": ""})
        assert Address("127.0.0.1", 4002) == config.listen

    def test_service_name_may_come_only_from_env(self) -> None:
        """service.name is satisfied by SIDECAR_SERVICE_NAME alone."""
        config = config_from_mapping(
            {"consul": {"enabled": False}}, {"SIDECAR_SERVICE_NAME": "orders"}
        )
        assert "orders" == config.service.name

    def test_env_var_table_lists_every_constant(self) -> None:
        """ENV_VARS documents each ENV_* constant exactly once."""
        constants = {
            value for name, value in vars(config_module).items() if name.startswith("ENV_")
        } - {ENV_VARS}
        assert sorted(constants) == sorted(var.name for var in ENV_VARS)


class TestLoadConfig:
    def test_reads_the_file_and_applies_env(self, tmp_path: Path) -> None:
        """load_config parses YAML, then env overrides win."""
        path = tmp_path / "sidecar.yaml"
        path.write_text(
            "service: {name: permits, address: 10.0.0.1}\n"
            "consul: {enabled: false}\n"
            "upstreams:\n"
            "  billing:\n"
            "    endpoints: ['10.0.0.2:80']\n"
            "    retries: {on: [reset]}\n"
        )
        config = load_config(str(path), {"SIDECAR_SERVICE_PORT": "9000"})
        assert ("permits", 9000) == (config.service.name, config.service.port)
        assert True is config.upstreams["billing"].retries.on_reset

    def test_path_falls_back_to_sidecar_config(self, tmp_path: Path) -> None:
        """Without a path, $SIDECAR_CONFIG names the file."""
        path = tmp_path / "sidecar.yaml"
        path.write_text("service: {name: from-file, address: 10.0.0.1}\nconsul: {enabled: false}\n")
        assert "from-file" == load_config(None, {"SIDECAR_CONFIG": str(path)}).service.name

    def test_without_a_file_config_comes_from_env(self) -> None:
        """With neither path nor $SIDECAR_CONFIG, env and defaults make the config."""
        environ = {
            "SIDECAR_SERVICE_NAME": "orders",
            "SIDECAR_SERVICE_ADDRESS": "10.0.0.1",
            "SIDECAR_CONSUL_ENABLED": "false",
        }
        assert "orders" == load_config(None, environ).service.name

    def test_missing_file_is_one_problem(self, tmp_path: Path) -> None:
        """An unreadable file is reported once, naming the file."""
        path = tmp_path / "nope.yaml"
        with pytest.raises(ConfigError) as info:
            load_config(str(path), {})
        assert [f"{path}: cannot read config file (No such file or directory)"] == (
            info.value.problems
        )

    def test_yaml_syntax_error_names_the_line(self, tmp_path: Path) -> None:
        """A syntax error is one problem with file, line and column."""
        path = tmp_path / "bad.yaml"
        path.write_text("service:\n  name: a\nlisten: [oops\n")
        with pytest.raises(ConfigError) as info:
            load_config(str(path), {})
        [problem] = info.value.problems
        assert problem.startswith(f"{path}: invalid YAML at line 4, column 1: ")

    def test_duplicate_keys_are_rejected(self, tmp_path: Path) -> None:
        """A key given twice is an error at its second occurrence, not a silent override."""
        path = tmp_path / "dup.yaml"
        path.write_text("service: {name: a}\nlisten: 127.0.0.1:1\nlisten: 127.0.0.1:2\n")
        with pytest.raises(ConfigError) as info:
            load_config(str(path), {})
        assert [f"{path}: invalid YAML at line 3, column 1: duplicate key 'listen'"] == (
            info.value.problems
        )

    def test_merge_keys_may_be_overridden(self, tmp_path: Path) -> None:
        """`<<: *base` then an explicit key is YAML's override, not a duplicate."""
        path = tmp_path / "merge.yaml"
        path.write_text(
            "service: {name: a, address: 10.0.0.1}\nconsul: {enabled: false}\n"
            "base: &base {endpoints: ['10.0.0.1:80'], timeout: 5s}\n"
            "upstreams:\n  b: {<<: *base, timeout: 10s}\n"
        )
        with pytest.raises(ConfigError) as info:
            load_config(str(path), {})
        assert ["base: unknown key"] == info.value.problems  # and nothing about `timeout`

    @pytest.mark.timeout(10)
    @pytest.mark.parametrize(
        ("where", "problem"),
        [
            ("    timeout: *a8\n", "upstreams.billing.timeout: invalid duration list"),
            (
                "    fallback: {status: 200, json: *a8}\n",
                "upstreams.billing.fallback.json: too large: more than 10000 values",
            ),
        ],
    )
    def test_alias_bomb_is_reported_not_expanded(
        self, tmp_path: Path, where: str, problem: str
    ) -> None:
        """Nine levels of nine aliases are 9**9 values if anything walks them: the error
        names the kind, and the fallback body is refused by size."""
        levels = ["x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        levels += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        path = tmp_path / "bomb.yaml"
        path.write_text(
            "service: {name: a, address: 10.0.0.1}\nconsul: {enabled: false}\nbombs:\n"
            + "".join(f"  {line}\n" for line in levels)
            + "upstreams:\n  billing:\n    endpoints: ['10.0.0.1:80']\n"
            + where
        )
        with pytest.raises(ConfigError) as info:
            load_config(str(path), {})
        assert [problem, "bombs: unknown key"] == info.value.problems

    def test_deep_nesting_is_a_config_error(self, tmp_path: Path) -> None:
        path = tmp_path / "deep.yaml"
        path.write_text("x: " + "[" * 20000 + "]" * 20000 + "\n")
        with pytest.raises(ConfigError) as info:
            load_config(str(path), {})
        assert [f"{path}: invalid YAML: nested too deeply"] == info.value.problems

    def test_huge_integers_are_reported_not_crashed_on(self) -> None:
        big = 10**400
        assert [
            "upstreams.billing.timeout: invalid duration a very large integer",
            "upstreams.billing.retries.budget_ratio: must be between 0 and 1, "
            "got a very large integer",
        ] == problems(upstream(timeout=big, retries={"budget_ratio": big}))

    def test_fallback_json_must_be_strict_json(self) -> None:
        """NaN and Infinity are not JSON; a strict client would reject the fallback."""
        [problem] = problems(upstream(fallback={"status": 200, "json": {"r": float("nan")}}))
        assert problem.startswith("upstreams.billing.fallback.json: cannot be encoded as JSON")

    def test_only_true_and_false_are_booleans(self, tmp_path: Path) -> None:
        """YAML 1.1's yes/no/on/off stay strings, so `retries: {on: ...}` keeps its key."""
        path = tmp_path / "sidecar.yaml"
        path.write_text("service: {name: a, address: 10.0.0.1}\nconsul: {enabled: no}\n")
        with pytest.raises(ConfigError) as info:
            load_config(str(path), {})
        assert ["consul.enabled: expected true or false, got string"] == info.value.problems

    def test_empty_file_means_defaults(self, tmp_path: Path) -> None:
        """An empty file is an empty mapping; env can supply the rest."""
        path = tmp_path / "empty.yaml"
        path.write_text("")
        environ = {"SIDECAR_SERVICE_NAME": "a", "SIDECAR_CONSUL_ENABLED": "0"}
        assert Address("127.0.0.1", 4001) == load_config(str(path), environ).listen


class TestBodyTimeout:
    """`app_connections.body_timeout`: how long the app may send no request-body bytes."""

    def test_defaults_to_60s(self) -> None:
        """Without the key, an app may pause its upload for up to a minute."""
        assert 60.0 == build().app_connections.body_timeout

    def test_is_read_as_a_duration(self) -> None:
        """`30s` and `1500ms` are read as seconds."""
        assert [30.0, 1.5] == [
            build({"app_connections": {"body_timeout": text}}).app_connections.body_timeout
            for text in ("30s", "1500ms")
        ]

    def test_problems_are_reported_with_their_path(self) -> None:
        """A value that is no duration, and one that is not positive, name the key."""
        assert [
            "app_connections.body_timeout: invalid duration 'soon'",
            "app_connections.body_timeout: must be greater than 0",
        ] == [
            *problems({"app_connections": {"body_timeout": "soon"}}),
            *problems({"app_connections": {"body_timeout": "0s"}}),
        ]

    @staticmethod
    def _file(tmp: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> Path:
        """A config file with this body_timeout; no SIDECAR_* variable from outside."""
        for var in ENV_VARS:
            monkeypatch.delenv(var.name, raising=False)
        path = tmp / "sidecar.yaml"
        path.write_text(
            "service: {name: permits, address: 10.0.0.1}\nconsul: {enabled: false}\n"
            f"app_connections: {{body_timeout: {value}}}\n"
        )
        return path

    def test_check_config_accepts_a_duration(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`sidecar check-config` with `app_connections.body_timeout: 30s`: OK, exit 0."""
        path = self._file(tmp_path, monkeypatch, "30s")
        assert 0 == main(["check-config", "-c", str(path)])
        captured = capsys.readouterr()
        assert (f"config OK: {path}", "") == (captured.out.splitlines()[0], captured.err)

    def test_check_config_rejects_anything_else(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`sidecar check-config` with `app_connections.body_timeout: soon`: exit 64, and
        the one problem names the key and the value."""
        path = self._file(tmp_path, monkeypatch, "soon")
        assert 64 == main(["check-config", "-c", str(path)])
        assert [
            f"config error: 1 problem(s) in {path}",
            "  app_connections.body_timeout: invalid duration 'soon'",
        ] == capsys.readouterr().err.splitlines()
