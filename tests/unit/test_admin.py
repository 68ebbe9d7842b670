"""Admin API handlers that integration tests can't reach from loopback, and readiness latches."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import structlog

from sidecar.admin import AdminAPI, AdminServer, Answer
from sidecar.config import Address, config_from_mapping
from sidecar.discovery.base import Endpoint
from sidecar.discovery.static import StaticResolver
from sidecar.lifecycle import Readiness
from sidecar.proxy.upstream import Upstream
from sidecar.telemetry.logging import configure_logging, current_log_level, set_log_level
from sidecar.telemetry.metrics import Metrics

CONFIG = config_from_mapping(
    {
        "service": {"name": "unit"},
        "consul": {"enabled": False},
        "upstreams": {"billing": {"endpoints": ["127.0.0.1:9"]}},
    },
    {},
)


def _app() -> tuple[AdminAPI, Upstream]:
    metrics = Metrics()
    upstream = Upstream(
        CONFIG.upstreams["billing"], StaticResolver([Endpoint("127.0.0.1", 9)]), metrics
    )
    return AdminAPI(CONFIG, Readiness(), {"billing": upstream}, metrics), upstream


async def _call(app: AdminAPI, method: str, path: str, peer: str) -> Answer:
    """The answer to a request from `peer` (an address no test could connect from)."""
    return await app.handle(method, path, peer)


@asynccontextmanager
async def _client(app: AdminAPI) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A client session and the base URL of `app` served on a free loopback port."""
    server = AdminServer(app)
    listening = await server.start(Address("127.0.0.1", 0))
    port = listening.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{port}"
    finally:
        await server.close()


class TestShutdown:
    def app(self, requests: list[str]) -> AdminAPI:
        metrics = Metrics()
        return AdminAPI(CONFIG, Readiness(), {}, metrics, request_shutdown=requests.append)

    async def test_from_a_non_loopback_client_is_forbidden(self) -> None:
        """POST /v1/shutdown from 10.0.0.7: 403 FORBIDDEN and nothing is asked to stop."""
        requests: list[str] = []
        response = await _call(self.app(requests), "POST", "/v1/shutdown", "10.0.0.7")
        assert (403, []) == (response.status, requests)

    async def test_from_loopback_starts_the_shutdown(self) -> None:
        """From 127.0.0.1 (and ::1): 202, the SIGTERM path is asked to start, /ready
        turns 503 at once; a second call says it forces the stop."""
        requests: list[str] = []
        app = self.app(requests)
        first = await _call(app, "POST", "/v1/shutdown", "127.0.0.1")
        second = await _call(app, "POST", "/v1/shutdown", "::1")
        assert (202, False, 202, True) == (
            first.status,
            json.loads(first.body)["forced"],
            second.status,
            json.loads(second.body)["forced"],
        )
        assert requests == ["POST /v1/shutdown", "POST /v1/shutdown"]
        ready = await _call(app, "GET", "/ready", "127.0.0.1")
        assert ready.status == 503


class TestBreakerReset:
    async def test_reset_from_a_non_loopback_client_is_forbidden(self) -> None:
        """A breaker reset from 10.0.0.7 gets 403 and leaves the circuit as it was."""
        app, upstream = _app()
        for _ in range(5):
            upstream.breaker.admit()
            upstream.breaker.failure(False)
        response = await _call(app, "POST", "/v1/breakers/billing/reset", "10.0.0.7")
        assert 403 == response.status
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


@pytest.fixture
def json_logging() -> Iterator[None]:
    """JSON logs at info for the test; the logging setup and level it found afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("json", "info")
    yield
    structlog.reset_defaults()
    set_log_level("info")
    root.handlers[:] = handlers
    root.setLevel(level)


async def put_level(app: AdminAPI, body: Any) -> tuple[int, Any]:
    """PUT /v1/log-level from 127.0.0.1: a dict is sent as JSON, anything else as is."""
    async with _client(app) as (client, base):
        sent = {"json": body} if isinstance(body, dict) else {"data": body}
        async with client.put(f"{base}/v1/log-level", **sent) as resp:
            return resp.status, await resp.json()


@pytest.mark.usefixtures("json_logging")
class TestLogLevel:
    async def test_from_a_non_loopback_client_is_forbidden(self) -> None:
        """A level change from 10.0.0.7 gets 403 FORBIDDEN and the level stays."""
        app, _ = _app()
        response = await _call(app, "PUT", "/v1/log-level", "10.0.0.7")
        assert (403, "FORBIDDEN", "info") == (
            response.status,
            json.loads(bytes(response.body))["error"]["code"],
            current_log_level(),
        )

    async def test_a_json_body_sets_the_level(self) -> None:
        """`{"level": "debug"}` switches to debug; the answer names the new and old level."""
        app, _ = _app()
        answer = await put_level(app, {"level": "debug"})
        assert ((200, {"level": "debug", "previous": "info"}), "debug") == (
            answer,
            current_log_level(),
        )

    @pytest.mark.parametrize("body", [b"warning", b"WARNING\n", b'"warning"'])
    async def test_a_plain_text_body_sets_the_level(self, body: bytes) -> None:
        """The bare name (`curl -X PUT --data warning`), in any case and with a trailing
        newline, or as a JSON string, works too."""
        app, _ = _app()
        assert (200, {"level": "warning", "previous": "info"}) == await put_level(app, body)

    @pytest.mark.parametrize(
        "body",
        [b"verbose", b"", b"\xff", b'{"level": 10}', b'{"lvl": "debug"}', b"{debug", b"[]"],
    )
    async def test_anything_else_is_400_naming_the_levels(self, body: bytes) -> None:
        """Another level, no level or a body that is not one: 400 BAD_REQUEST whose message
        names the accepted levels; the level stays."""
        app, _ = _app()
        status, answer = await put_level(app, body)
        assert (400, "BAD_REQUEST", "info") == (
            status,
            answer["error"]["code"],
            current_log_level(),
        )
        assert "debug, info, warning, error" in answer["error"]["message"]

    @pytest.mark.parametrize("new", ["error", "debug"])
    async def test_the_change_is_logged_once_either_way(
        self, capsys: pytest.CaptureFixture[str], new: str
    ) -> None:
        """One `log_level_changed` line with old, new and remote, whether the new level is
        quieter (logged before the switch) or more verbose (logged after it)."""
        app, _ = _app()
        capsys.readouterr()
        await put_level(app, new.encode())
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        changed = [line for line in lines if line["event"] == "log_level_changed"]
        assert [("info", new, "127.0.0.1")] == [(c["old"], c["new"], c["remote"]) for c in changed]


class TestUnknownRequests:
    async def test_unknown_path_and_wrong_method_answer_json(self) -> None:
        """404 and 405 come in the same JSON shape as every admin answer."""
        app, _ = _app()
        async with _client(app) as (client, base):
            missing = await client.get(f"{base}/nope")
            wrong = await client.get(f"{base}/v1/breakers/billing/reset")
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
