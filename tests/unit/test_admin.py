"""Admin API handlers that integration tests can't reach from loopback, and readiness latches."""

from __future__ import annotations

import json
from unittest import mock

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from sidecar.admin import build_admin_app
from sidecar.config import Address, config_from_mapping
from sidecar.discovery.base import Endpoint
from sidecar.discovery.static import StaticResolver
from sidecar.lifecycle import Readiness
from sidecar.proxy.upstream import Upstream
from sidecar.telemetry.metrics import Metrics

CONFIG = config_from_mapping(
    {
        "service": {"name": "unit"},
        "consul": {"enabled": False},
        "upstreams": {"billing": {"endpoints": ["127.0.0.1:9"]}},
    },
    {},
)


def _app() -> tuple[web.Application, Upstream]:
    metrics = Metrics()
    upstream = Upstream(
        CONFIG.upstreams["billing"], StaticResolver([Endpoint("127.0.0.1", 9)]), metrics
    )
    return build_admin_app(CONFIG, Readiness(), {"billing": upstream}, metrics), upstream


async def _call(app: web.Application, method: str, path: str, peer: str) -> web.StreamResponse:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (
        (peer, 40000) if key == "peername" else default
    )
    request = make_mocked_request(method, path, app=app, transport=transport)
    match = await app.router.resolve(request)
    request._match_info = match  # what aiohttp's handler does before calling the route
    match.add_app(app)
    response: web.StreamResponse = await match.handler(request)
    return response


class TestBreakerReset:
    async def test_reset_from_a_non_loopback_client_is_forbidden(self) -> None:
        """A breaker reset from 10.0.0.7 gets 403 and leaves the circuit as it was."""
        app, upstream = _app()
        for _ in range(5):
            upstream.breaker.admit()
            upstream.breaker.failure(False)
        response = await _call(app, "POST", "/v1/breakers/billing/reset", "10.0.0.7")
        assert 403 == response.status
        assert isinstance(response, web.Response)
        assert isinstance(response.body, bytes)
        assert "FORBIDDEN" == json.loads(bytes(response.body))["error"]["code"]
        assert "open" == upstream.breaker.state

    async def test_reset_from_ipv6_loopback_is_allowed(self) -> None:
        """::1 counts as loopback."""
        app, upstream = _app()
        response = await _call(app, "POST", "/v1/breakers/billing/reset", "::1")
        assert 200 == response.status
        assert "closed" == upstream.breaker.state

    async def test_ipv4_mapped_loopback_is_allowed_and_mapped_others_are_not(self) -> None:
        """On a dual-stack socket 127.0.0.1 arrives as ::ffff:127.0.0.1."""
        app, _ = _app()
        forbidden = await _call(app, "POST", "/v1/breakers/billing/reset", "::ffff:10.0.0.7")
        allowed = await _call(app, "POST", "/v1/breakers/billing/reset", "::ffff:127.0.0.1")
        assert (403, 200) == (forbidden.status, allowed.status)


class TestUnknownRequests:
    async def test_unknown_path_and_wrong_method_answer_json(self) -> None:
        """aiohttp's own 404 and 405 come in the same JSON shape as every admin answer."""
        app, _ = _app()
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            missing = await client.get("/nope")
            wrong = await client.get("/v1/breakers/billing/reset")
            answers = [
                (r.status, r.content_type, (await r.json())["error"]["code"])
                for r in (missing, wrong)
            ]
            allow = wrong.headers["Allow"]
        assert [
            (404, "application/json", "NOT_FOUND"),
            (405, "application/json", "METHOD_NOT_ALLOWED"),
        ] == answers
        assert "POST" == allow


class TestReadiness:
    def test_ready_only_when_every_latch_is_set(self) -> None:
        """Each unmet latch is a reason; setting them all makes the sidecar ready."""
        readiness = Readiness()
        bound = readiness.require("listeners", "listeners not bound yet")
        found = readiness.require("discovery:billing", "upstream 'billing': no answer yet")
        assert ["listeners not bound yet", "upstream 'billing': no answer yet"] == (
            readiness.reasons()
        )
        bound()
        found()
        assert (True, []) == (readiness.ready, readiness.reasons())

    def test_a_watched_condition_is_asked_each_time(self) -> None:
        """A watch (the spool's writability) turns readiness off while it has a reason."""
        readiness = Readiness()
        problem: list[str] = []
        readiness.watch(lambda: problem[0] if problem else None)
        assert (True, []) == (readiness.ready, readiness.reasons())
        problem.append("events: spool not writable: disk full")
        assert (False, ["events: spool not writable: disk full"]) == (
            readiness.ready,
            readiness.reasons(),
        )
        problem.clear()
        assert readiness.ready

    def test_draining_is_never_ready(self) -> None:
        """Once draining, readiness stays off with the reason 'shutting down'."""
        readiness = Readiness()
        readiness.draining = True
        assert (False, ["shutting down"]) == (readiness.ready, readiness.reasons())


def test_address_type_is_what_the_admin_listener_uses() -> None:
    """The default admin listener is 0.0.0.0:9902 (SPEC §7)."""
    assert Address("0.0.0.0", 9902) == CONFIG.admin.listen
