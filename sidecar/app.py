"""Composition root: builds the sidecar from its config and owns start and stop order.

Start: raise the open-file limit → bind every listener → log each address → start
Consul registration and discovery → ready (once registered and every upstream has its
first answer).
Stop (SIGTERM/SIGINT): not ready → deregister from Consul → keep serving for
`shutdown.drain` → stop accepting → finish in-flight requests until
`shutdown.grace` (counted from the signal) → stop evaluating alerts (their queued
events still reach the relay) → close everything → exit 0.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric

from sidecar import __version__
from sidecar.admin import AdminAPI, AdminServer
from sidecar.config import Address, Config, UpstreamConfig
from sidecar.discovery.base import Endpoint, Listener, Resolver
from sidecar.discovery.static import StaticResolver
from sidecar.errors import ConsulError, ErrorCode, ProxyError
from sidecar.lifecycle import Lifecycle
from sidecar.limits import LOW_OPEN_FILES, open_file_limit, raise_open_file_limit
from sidecar.proxy.server import Proxy, hot_path_build
from sidecar.proxy.upstream import Upstream
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from sidecar.discovery.consul import ConsulResolver, DynamicServices
    from sidecar.discovery.consul_client import ConsulClient
    from sidecar.discovery.registration import Registrar
    from sidecar.events.publisher import EventRelay
    from sidecar.events.subscriber import Subscriptions
    from sidecar.telemetry.alerts import Alerts
    from sidecar.telemetry.tracing import Tracer

log = get_logger("sidecar.app")

EXIT_OK = 0
EXIT_FAILURE = 1
#: How long the requests aborted at the end of the grace get to wind down (their
#: connections' `connection_lost`, their tasks' cancellation): their spans end then.
ABORTED_SETTLE_S = 1.0


class StartupError(Exception):
    """The sidecar could not start (a port in use, say); the message says what."""


_DYNAMIC_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,251}[a-z0-9])?")


def build_resolver(config: Config, name: str, client: ConsulClient | None) -> Resolver:
    """The discovery source of one upstream: its static list, else a Consul watch."""
    upstream = config.upstreams[name]
    if upstream.endpoints or client is None:
        return StaticResolver([Endpoint(a.host, a.port) for a in upstream.endpoints])
    from sidecar.discovery.consul import ConsulResolver  # noqa: PLC0415 - Consul only

    return ConsulResolver(client, upstream.service, upstream.tags, upstream=name)


class Sidecar:
    """One running sidecar: listeners, upstreams, admin API and their order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        self.consul: ConsulClient | None = None
        if config.consul.enabled:
            # Imported only with Consul on: without it the sidecar does not load the client.
            from sidecar.discovery.consul import DynamicServices  # noqa: PLC0415
            from sidecar.discovery.consul_client import ConsulClient  # noqa: PLC0415

            errors = self.metrics.consul_errors
            self.consul = ConsulClient(config.consul, on_error=lambda op: errors.labels(op).inc())
        self.upstreams: dict[str, Upstream] = {
            name: Upstream(cfg, build_resolver(config, name, self.consul), self.metrics)
            for name, cfg in config.upstreams.items()
        }
        self.proxy = Proxy(self.upstreams, self.metrics, config.app_connections)
        self.registrar: Registrar | None = None
        self.dynamic: DynamicServices | None = None
        if self.consul is not None and config.discovery.allow_any_service:
            self.dynamic = DynamicServices(
                self.consul,
                self._dynamic_upstream,
                self._retire_dynamic,
                max_services=config.discovery.max_services,
                idle_after=config.discovery.idle_after,
            )
            self.proxy.lookup = self._lookup
        self.events: EventRelay | None = None
        if config.events.enabled:
            from sidecar.events.publisher import EventRelay  # noqa: PLC0415 - events only

            self.events = EventRelay(config, self.metrics)
            self.proxy.events = self.events
        self.subscriptions: Subscriptions | None = None
        if config.events.enabled and config.events.subscriptions:
            from sidecar.events.subscriber import Subscriptions  # noqa: PLC0415 - events only

            self.subscriptions = Subscriptions(config, self.metrics)
        self.tracer: Tracer | None = None
        if config.telemetry.tracing.enabled:
            # Imported only with tracing on: the SDK and exporters cost startup time.
            from sidecar.telemetry.tracing import Tracer  # noqa: PLC0415

            self.tracer = Tracer(config)
            self.proxy.tracer = self.tracer
            if self.events is not None:
                self.events.tracer = self.tracer
            if self.subscriptions is not None:
                self.subscriptions.tracer = self.tracer
            self.metrics.add_live(self.tracer.collect)
        self.metrics.add_live(self._live_gauges)
        self.alerts: Alerts | None = None
        if config.alerts.rules:
            self.alerts = self._build_alerts()
            self.metrics.add_live(self.alerts.collect)
        self._servers: list[asyncio.Server] = []
        self._admin: AdminServer | None = None
        self.addresses: dict[str, str] = {}
        self.started = False

    def all_upstreams(self) -> dict[str, Upstream]:
        """Configured upstreams plus those `allow_any_service` made on demand."""
        if self.dynamic is None:
            return self.upstreams
        made = {name: up for name, (up, _) in self.dynamic.watches.items()}
        return {**made, **self.upstreams}

    def _dynamic_upstream(self, name: str, resolver: ConsulResolver) -> Upstream:
        return Upstream(UpstreamConfig(name=name), resolver, self.metrics)

    def _retire_dynamic(self, name: str, upstream: Upstream) -> None:
        self.proxy.by_name.pop(name.encode(), None)
        upstream.retire()

    async def _lookup(self, name: str) -> Upstream | None:
        if self.dynamic is None or not _DYNAMIC_NAME.fullmatch(name):
            return None
        try:
            upstream: Upstream | None = await self.dynamic.lookup(name)
            if upstream is not None:  # later requests find it with a dict lookup
                self.proxy.by_name[name.encode()] = upstream
        except ConsulError as exc:
            raise ProxyError(
                ErrorCode.NO_HEALTHY_ENDPOINTS,
                f"cannot ask Consul whether service {name!r} exists: {exc.message}",
                name,
            ) from None
        return upstream

    def _live_gauges(self) -> Iterator[Metric]:
        circuit = GaugeMetricFamily(
            "sidecar_circuit_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
            labels=["upstream"],
        )
        endpoints = GaugeMetricFamily(
            "sidecar_upstream_endpoints",
            "Endpoints known per upstream, by state.",
            labels=["upstream", "state"],
        )
        in_flight = GaugeMetricFamily(
            "sidecar_upstream_in_flight", "Requests in flight per upstream.", labels=["upstream"]
        )
        registered = GaugeMetricFamily(
            "sidecar_consul_registered",
            "1 while this instance is registered in Consul, else 0.",
        )
        registered.add_metric([], 1.0 if self.registrar and self.registrar.registered else 0.0)
        yield registered
        connections = GaugeMetricFamily(
            "sidecar_app_connections",
            "The app's connections to the sidecar open now, WebSocket tunnels included.",
        )
        connections.add_metric([], float(len(self.proxy.connections) + len(self.proxy.tunnels)))
        yield connections
        files = GaugeMetricFamily(
            "sidecar_open_files_limit",
            "The soft open-file limit: an app connection holds one descriptor, a request "
            "in flight one more.",
        )
        files.add_metric([], float(open_file_limit()))
        yield files
        if self.events is not None:
            depth = GaugeMetricFamily(
                "sidecar_events_spool_depth", "Events in the local spool, not yet confirmed."
            )
            depth.add_metric([], float(self.events.spool.depth))
            yield depth
            connected = GaugeMetricFamily(
                "sidecar_events_broker_connected", "1 while the publisher is connected to RabbitMQ."
            )
            connected.add_metric([], 1.0 if self.events.state == "connected" else 0.0)
            yield connected
        for name, up in self.all_upstreams().items():
            circuit.add_metric([name], up.breaker.state_code())
            healthy, ejected = up.balancer.counts()
            endpoints.add_metric([name, "healthy"], healthy)
            endpoints.add_metric([name, "ejected"], ejected)
            in_flight.add_metric([name], up.inflight)
        yield circuit
        yield endpoints
        yield in_flight

    async def _bind(self, role: str, address: Address, upstream: Upstream | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: self.proxy.protocol(upstream),
                address.host,
                address.port,
                reuse_address=True,
                backlog=1024,
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {address} for {role}: {exc.strerror}") from exc
        self._servers.append(server)
        self._log_bound(role, server)

    def _log_bound(self, role: str, server: Any) -> None:
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.addresses[role] = shown
            log.info("listening", role=role, address=shown)

    async def start(self) -> None:
        """Bind every listener and start discovery; raise StartupError on failure."""
        config = self.config
        readiness = self.lifecycle.readiness
        bound = readiness.require("listeners", "listeners not bound yet")
        latches = {
            name: readiness.require(
                f"discovery:{name}", f"upstream {name!r}: no discovery answer yet"
            )
            for name in self.upstreams
        }
        before, open_files = raise_open_file_limit()
        if open_files < LOW_OPEN_FILES:
            log.warning(
                "open_file_limit_low",
                limit=open_files,
                raised_from=before,
                fix="raise the hard RLIMIT_NOFILE (ulimit -Hn) of the sidecar's container",
            )
        self.proxy.start_sweeping()
        if self.events is not None:
            # Before the app listener: a publish must find the spool open (its sequence
            # numbers continue the file's) or it could overwrite a spooled event.
            from sidecar.events.spool import SpoolError  # noqa: PLC0415 - events only

            events = self.events
            try:
                await events.start()
            except SpoolError as exc:
                raise StartupError(f"events: {exc}") from exc
            readiness.watch(
                lambda: (
                    None
                    if events.spool.writable
                    else f"events: spool not writable: {events.spool.error}"
                )
            )
        await self._bind("app", config.listen, None)
        for name, up in self.upstreams.items():
            if up.config.listen is not None:
                await self._bind(f"upstream:{name}", up.config.listen, up)
        api = AdminAPI(
            config,
            readiness,
            self.all_upstreams,
            self.metrics,
            consul_status=self._consul_status,
            events_status=self._events_status,
            alerts_status=self._alerts_status,
            request_shutdown=self.lifecycle.request_shutdown,
        )
        self._admin = AdminServer(api)
        try:
            server = await self._admin.start(config.admin.listen)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {config.admin.listen} for admin: {exc.strerror}"
            ) from exc
        self._log_bound("admin", server)
        bound()
        if self.tracer is not None:
            self.tracer.start()
            tracing = config.telemetry.tracing
            log.info(
                "tracing_started",
                exporter=tracing.exporter,
                endpoint=tracing.endpoint,
                protocol=tracing.protocol,
                sampler=tracing.sampler,
                ratio=tracing.sampler_ratio,
                service_name=tracing.service_name,
            )
        if self.subscriptions is not None:
            await self.subscriptions.start()
        if self.consul is not None:
            from sidecar.discovery.registration import Registrar  # noqa: PLC0415 - Consul only

            latch = "consul:registration"
            registered = readiness.require(
                latch, f"consul: {config.service.name!r} not registered yet"
            )
            self.registrar = Registrar(
                config,
                self.consul,
                on_registered=registered,
                explain=lambda reason: readiness.explain(latch, reason),
            )
            self.registrar.start()
        for name, up in self.upstreams.items():
            up.resolver.subscribe(_once_answered(latches[name]))
            await up.resolver.start()
        if self.alerts is not None:  # after the relay and Consul: it watches both
            self.alerts.start()
        self.started = True
        log.info(
            "started",
            version=__version__,
            service=config.service.name,
            upstreams=sorted(self.upstreams),
            ready=readiness.ready,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            hot_path=hot_path_build(),
            open_files=open_files,
        )

    async def _unless_forced(self, work: Coroutine[Any, Any, None], within: float) -> None:
        """Wait for `work` up to `within` seconds, or until a second signal forces the
        stop; then cancel it."""
        waiter = asyncio.ensure_future(work)
        hurry = asyncio.ensure_future(self.lifecycle.force.wait())
        await asyncio.wait((waiter, hurry), timeout=max(within, 0), return_when="FIRST_COMPLETED")
        waiter.cancel()
        hurry.cancel()

    async def shutdown(self) -> None:
        """The ordered, time-boxed stop; safe to call after a failed start."""
        loop = asyncio.get_running_loop()
        config = self.config.shutdown
        began = loop.time()
        lifecycle = self.lifecycle
        lifecycle.readiness.draining = True
        log.info(
            "shutdown_started",
            reason=lifecycle.reason or "startup failed",
            drain_s=config.drain,
            grace_s=config.grace,
            in_flight=self.proxy.active,
        )
        deliveries = None
        if self.subscriptions is not None:  # no new deliveries; those in flight get `grace`
            deliveries = asyncio.ensure_future(self.subscriptions.stop(config.grace))
        if self.registrar is not None:  # first, so callers stop choosing this instance
            await self.registrar.deregister()
        if self.started:  # a failed start has nobody to keep serving
            log.info("draining", drain_s=config.drain, in_flight=self.proxy.active)
            await lifecycle.sleep_unless_forced(
                min(config.drain, max(0.0, config.grace - (loop.time() - began)))
            )
        for server in self._servers:
            server.close()
        self.proxy.start_closing()
        remaining = config.grace - (loop.time() - began)
        if self.proxy.active and not lifecycle.force.is_set():
            await self._unless_forced(self.proxy.wait_idle(), remaining)
        if self.proxy.active:
            forced = lifecycle.force.is_set()
            event = "shutdown_forced_abort" if forced else "shutdown_grace_exceeded"
            log.warning(event, aborted_requests=self.proxy.active)
        elif self.proxy.ending() and not lifecycle.force.is_set():
            # Answers made but not yet written to apps that read slowly, and lingering
            # closes: they end within the grace, not cut off by the aborts below.
            remaining = config.grace - (loop.time() - began)
            await self._unless_forced(self.proxy.wait_ended(), remaining)
            if cut := self.proxy.ending():
                log.warning("shutdown_connections_cut", connections=cut)
            if self.proxy.active:  # not expected: nothing is served once closing
                log.warning("shutdown_grace_exceeded", aborted_requests=self.proxy.active)
        self.proxy.abort_all()
        if self.proxy.active:
            # Aborting only schedules their ends: let the loop run them, so that their
            # spans are queued before the tracing flush below (and nothing after this
            # point sees a request half torn down).
            try:
                await asyncio.wait_for(self.proxy.wait_idle(), ABORTED_SETTLE_S)
            except TimeoutError:
                log.warning("aborted_requests_not_ended", requests=self.proxy.active)
        if self.alerts is not None:
            # Evaluation ends before requests are torn down (no alert about this sidecar
            # going away); queued alert events reach the relay before it closes below.
            await self.alerts.stop(within=max(1.0, min(5.0, config.grace - (loop.time() - began))))
        for up in self.upstreams.values():
            await up.resolver.stop()
        if deliveries is not None:
            await deliveries
        if self.events is not None:  # after the last publish: the spool keeps the rest
            await self.events.stop()
        if self.dynamic is not None:
            await self.dynamic.stop()
        if self.consul is not None:
            await self.consul.close()
        if self._admin is not None:
            await self._admin.close()
        for server in self._servers:
            await server.wait_closed()
        if self.tracer is not None:  # last: the spans of everything above are in
            # Within what is left of the grace (a moment at least, to hand over a batch).
            left = max(0.1, config.grace - (loop.time() - began))
            await asyncio.to_thread(self.tracer.shutdown, left)
        log.info("shutdown_complete", took_s=round(loop.time() - began, 3))

    async def run(self) -> int:
        """Start, serve until asked to stop, stop; return the exit code."""
        self.lifecycle.install_signal_handlers()
        try:
            try:
                await self.start()
            except StartupError as exc:
                log.error("startup_failed", error=str(exc))
                await self.shutdown()
                return EXIT_FAILURE
            await self.lifecycle.stop.wait()
            await self.shutdown()
            return EXIT_OK
        finally:
            self.lifecycle.remove_signal_handlers()

    def _events_status(self) -> dict[str, object]:
        if self.events is None:
            return {"enabled": False}
        status: dict[str, object] = {"enabled": True, **self.events.status()}
        if self.subscriptions is not None:
            deliveries = self.subscriptions.status()
            status["subscriber"] = deliveries["broker"]
            status["subscriptions"] = deliveries["subscriptions"]
        return status

    def _build_alerts(self) -> Alerts:
        from sidecar.telemetry.alerts import (  # noqa: PLC0415 - alerts only
            Alerts,
            AlertSources,
            upstream_traffic,
        )

        upstreams = self.upstreams
        events = self.events
        sources = AlertSources(
            traffic=lambda: upstream_traffic(self.metrics),
            circuit=lambda name: upstreams[name].breaker.state_code(),
            spool_depth=(lambda: events.spool.depth) if events is not None else lambda: None,
            broker_reachable=self._broker_reachable,
            consul_reachable=self._consul_reachable,
        )
        return Alerts(self.config, sources, publish=None if events is None else events.publish)

    def _broker_reachable(self) -> bool | None:
        """None until the relay's first connection attempt ended: not unreachable yet."""
        events = self.events
        if events is None:
            return None
        if events.state == "connected":
            return True
        tried = events.connected_since is not None or events.last_error is not None
        return False if tried else None

    def _consul_reachable(self) -> bool | None:
        """False while the registration's last call or any upstream's watch fails."""
        if self.consul is None:
            return None
        if self.registrar is not None and self.registrar.failing:
            return False
        return not any(getattr(up.resolver, "stale", False) for up in self.all_upstreams().values())

    def _alerts_status(self) -> dict[str, object]:
        if self.alerts is None:
            return {"rules": 0, "firing": [], "pending": [], "alertmanager": None}
        return self.alerts.status()

    def _consul_status(self) -> dict[str, object]:
        consul = self.consul
        if consul is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "address": consul.address,
            "last_contact": consul.last_contact_iso(),
            "registration": None if self.registrar is None else self.registrar.status(),
            "dynamic_services": None if self.dynamic is None else sorted(self.dynamic.watches),
        }

    def __repr__(self) -> str:
        return f"<Sidecar {self.config.service.name} upstreams={sorted(self.upstreams)}>"


def _once_answered(done: Callable[[], None]) -> Listener:
    """A resolver listener that sets a readiness latch on the first answer."""

    def listener(_: Sequence[Endpoint]) -> None:
        done()

    return listener


def _loop_factory() -> Any:
    if sys.platform == "linux":
        import uvloop  # noqa: PLC0415  (Linux-only dependency)

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_app(config: Config) -> int:
    """Run the sidecar in a fresh event loop (uvloop on Linux); return the exit code."""
    with asyncio.Runner(loop_factory=_loop_factory) as runner:
        return runner.run(Sidecar(config).run())
