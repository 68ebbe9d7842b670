"""Composition root: builds the sidecar from its config and owns start and stop order.

Start: bind every listener → log each address → start discovery → ready.
Stop (SIGTERM/SIGINT): not ready → keep serving for `shutdown.drain` → stop
accepting → finish in-flight requests until `shutdown.grace` (counted from the
signal) → close everything → exit 0.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric

from sidecar import __version__
from sidecar.admin import build_admin_app
from sidecar.config import Address, Config
from sidecar.discovery.base import Endpoint, Listener, Resolver
from sidecar.discovery.static import StaticResolver
from sidecar.lifecycle import Lifecycle
from sidecar.proxy.server import Proxy
from sidecar.proxy.upstream import Upstream
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.metrics import Metrics

log = get_logger("sidecar.app")

EXIT_OK = 0
EXIT_FAILURE = 1


class StartupError(Exception):
    """The sidecar could not start (a port in use, say); the message says what."""


def build_resolver(config: Config, name: str) -> Resolver:
    """The discovery source of one upstream (static lists only in this build)."""
    upstream = config.upstreams[name]
    return StaticResolver([Endpoint(a.host, a.port) for a in upstream.endpoints])


class Sidecar:
    """One running sidecar: listeners, upstreams, admin API and their order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        self.upstreams: dict[str, Upstream] = {
            name: Upstream(cfg, build_resolver(config, name), self.metrics)
            for name, cfg in config.upstreams.items()
        }
        self.proxy = Proxy(self.upstreams, self.metrics, config.app_connections)
        self.metrics.add_live(self._live_gauges)
        self._servers: list[asyncio.Server] = []
        self._admin: web.AppRunner | None = None
        self.addresses: dict[str, str] = {}
        self.started = False

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
        for name, up in self.upstreams.items():
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
        self.proxy.start_sweeping()
        await self._bind("app", config.listen, None)
        for name, up in self.upstreams.items():
            if up.config.listen is not None:
                await self._bind(f"upstream:{name}", up.config.listen, up)
        app = build_admin_app(config, readiness, self.upstreams, self.metrics)
        self._admin = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._admin.setup()
        site = web.TCPSite(self._admin, config.admin.listen.host, config.admin.listen.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {config.admin.listen} for admin: {exc.strerror}"
            ) from exc
        self._log_bound("admin", site._server)
        bound()
        for name, up in self.upstreams.items():
            up.resolver.subscribe(_once_answered(latches[name]))
            await up.resolver.start()
        self.started = True
        log.info(
            "started",
            version=__version__,
            service=config.service.name,
            upstreams=sorted(self.upstreams),
            ready=readiness.ready,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )

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
        if self.started:  # a failed start has nobody to keep serving
            await lifecycle.sleep_unless_forced(min(config.drain, config.grace))
        for server in self._servers:
            server.close()
        self.proxy.start_closing()
        remaining = config.grace - (loop.time() - began)
        if self.proxy.active and not lifecycle.force.is_set():
            waiter = asyncio.ensure_future(self.proxy.wait_idle())
            hurry = asyncio.ensure_future(lifecycle.force.wait())
            await asyncio.wait(
                (waiter, hurry), timeout=max(remaining, 0), return_when="FIRST_COMPLETED"
            )
            waiter.cancel()
            hurry.cancel()
        if self.proxy.active:
            forced = lifecycle.force.is_set()
            event = "shutdown_forced_abort" if forced else "shutdown_grace_exceeded"
            log.warning(event, aborted_requests=self.proxy.active)
        self.proxy.abort_all()
        for up in self.upstreams.values():
            await up.resolver.stop()
        if self._admin is not None:
            await self._admin.cleanup()
        for server in self._servers:
            await server.wait_closed()
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
