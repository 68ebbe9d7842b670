"""The admin API (SPEC §7), served by aiohttp on `admin.listen`.

Endpoints:
  GET  /live                          200 while the event loop runs
  GET  /ready                         200 when every readiness latch is set,
                                      503 + JSON reasons otherwise (and while shutting down)
  GET  /metrics                       Prometheus text format 0.0.4
  GET  /v1/status                     JSON: service, readiness, and per upstream its
                                      endpoints, circuit state and requests in flight;
                                      events; firing and pending alerts
  POST /v1/breakers/{upstream}/reset  closes that circuit; loopback clients only (403 otherwise)
  PUT  /v1/log-level                  sets the log level of every logger now; body JSON
                                      {"level": "debug"} or the bare name (debug, info, warning,
                                      error); 200 {"level", "previous"}, 400 for another value;
                                      loopback clients only (403 otherwise)
  POST /v1/shutdown                   starts the SIGTERM sequence (a Job's app ends its legacy
                                      sidecar this way); 202, a second call cuts the drain
                                      short; loopback clients only (403 otherwise)
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from sidecar import __version__
from sidecar.config import Config
from sidecar.lifecycle import Readiness
from sidecar.proxy.upstream import Upstream
from sidecar.telemetry.logging import LEVELS, current_log_level, get_logger, set_log_level
from sidecar.telemetry.metrics import Metrics

log = get_logger("sidecar.admin")


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback  # 127.0.0.1 on a dual-stack socket
    return address.is_loopback


_LEVEL_NAMES = ", ".join(LEVELS)


def _requested_level(body: bytes) -> str | None:
    """The level a `PUT /v1/log-level` body names, lower-cased, or None if it names none.

    JSON `{"level": "debug"}` (or a JSON string), else the body as plain text, so
    `curl -X PUT --data debug` works as well as a JSON client.
    """
    try:
        text = body.decode().strip()
    except UnicodeDecodeError:
        return None
    if text.startswith(("{", '"')):
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        if isinstance(parsed, dict):
            parsed = parsed.get("level")
        text = parsed if isinstance(parsed, str) else ""
    level = text.strip().lower()
    return level if level in LEVELS else None


def _registration_state(consul: Mapping[str, Any]) -> str:
    if not consul.get("enabled"):
        return "disabled"
    registration = consul.get("registration")
    return str(registration["state"]) if isinstance(registration, Mapping) else "pending"


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own 404 and 405 as JSON too, like every other admin answer."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPNotFound:
        return _error(404, "NOT_FOUND", f"no admin endpoint at {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = _error(
            405, "METHOD_NOT_ALLOWED", f"{request.method} {request.path}: use {allowed}"
        )
        response.headers["Allow"] = allowed
        return response
    return response


def build_admin_app(
    config: Config,
    readiness: Readiness,
    upstreams: Mapping[str, Upstream] | Callable[[], Mapping[str, Upstream]],
    metrics: Metrics,
    *,
    consul_status: Callable[[], Mapping[str, Any]] | None = None,
    events_status: Callable[[], Mapping[str, Any]] | None = None,
    alerts_status: Callable[[], Mapping[str, Any]] | None = None,
    request_shutdown: Callable[[str], None] | None = None,
) -> web.Application:
    """The aiohttp application behind the admin listener.

    `upstreams` may be a callable: the set grows when `allow_any_service` makes one.
    """
    current = upstreams if callable(upstreams) else (lambda: upstreams)

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(_: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reasons": readiness.reasons()}, status=503)

    async def metrics_endpoint(_: web.Request) -> web.Response:
        # The classic 0.0.4 text format: every Prometheus 2.x scraper parses it.
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def status(_: web.Request) -> web.Response:
        consul = dict(consul_status()) if consul_status else {"enabled": config.consul.enabled}
        body: dict[str, Any] = {
            "version": __version__,
            "service": {
                "name": config.service.name,
                "id": config.service.id,
                "address": config.service.address,
                "port": config.service.port,
                "registration": _registration_state(consul),
            },
            "consul": consul,
            "events": dict(events_status()) if events_status else {"enabled": False},
            "ready": readiness.ready,
            "not_ready_reasons": readiness.reasons(),
            "upstreams": {name: up.status() for name, up in current().items()},
            "alerts": dict(alerts_status()) if alerts_status else {"firing": [], "pending": []},
        }
        return web.json_response(body)

    async def reset_breaker(request: web.Request) -> web.Response:
        if not _is_loopback(request.remote):
            return _error(403, "FORBIDDEN", "breaker reset is allowed from loopback clients only")
        name = request.match_info["upstream"]
        upstream = current().get(name)
        if upstream is None:
            return _error(404, "NO_ROUTE", f"no upstream named {name!r} is configured")
        before = upstream.breaker.state
        upstream.breaker.reset()
        log.info("circuit_reset", upstream=name, before=before, remote=request.remote)
        return web.json_response({"upstream": name, "before": before, "circuit": "closed"})

    async def put_log_level(request: web.Request) -> web.Response:
        if not _is_loopback(request.remote):
            return _error(
                403, "FORBIDDEN", "log level changes are allowed from loopback clients only"
            )
        level = _requested_level(await request.read())
        if level is None:
            return _error(
                400,
                "BAD_REQUEST",
                f"the body must name a log level, one of {_LEVEL_NAMES}: "
                'JSON {"level": "debug"} or the bare name',
            )
        previous = current_log_level()
        # Logged while the more verbose of the two levels is in force, so the change shows
        # whenever either level shows info.
        if LEVELS[level] >= LEVELS[previous]:
            log.info("log_level_changed", old=previous, new=level, remote=request.remote)
            set_log_level(level)
        else:
            set_log_level(level)
            log.info("log_level_changed", old=previous, new=level, remote=request.remote)
        return web.json_response({"level": level, "previous": previous})

    async def shutdown(request: web.Request) -> web.Response:
        if not _is_loopback(request.remote):
            return _error(403, "FORBIDDEN", "shutdown is allowed from loopback clients only")
        if request_shutdown is None:
            return _error(404, "NOT_FOUND", "shutdown is not available here")
        again = readiness.draining
        log.info("shutdown_requested", remote=request.remote, again=again)
        # The same path as SIGTERM (a second request cuts the drain short, as a second
        # signal does); the answer goes out before the admin listener closes.
        request_shutdown("POST /v1/shutdown")
        readiness.draining = True
        return web.json_response(
            {
                "shutting_down": True,
                "forced": again,
                "drain_s": config.shutdown.drain,
                "grace_s": config.shutdown.grace,
            },
            status=202,
        )

    app = web.Application(middlewares=[_json_errors])
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/breakers/{upstream}/reset", reset_breaker)
    app.router.add_post("/v1/shutdown", shutdown)
    app.router.add_put("/v1/log-level", put_log_level)
    return app
