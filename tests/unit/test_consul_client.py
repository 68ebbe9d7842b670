"""The Consul client: one pooled session, its own timeouts, the token in a header only,
Consul's plain-text errors mapped into the sidecar's exception tree, TLS with a CA file;
the app probe's notes; the catalog heartbeat's format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.config import ConsulConfig, HealthConfig
from sidecar.discovery import consul_client
from sidecar.discovery.consul_client import ConsulClient
from sidecar.discovery.health import AppProbe
from sidecar.discovery.heartbeat import HEARTBEAT_CHECK_PREFIX, heartbeat_deadline, heartbeat_line
from sidecar.errors import (
    ConsulBadRequest,
    ConsulError,
    ConsulHTTPError,
    ConsulNotFound,
    ConsulPermissionDenied,
    ConsulUnreachable,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def server(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """An aiohttp server on 127.0.0.1 answering every path with `handler`; its base URL
    and the requests it saw."""
    seen: list[web.Request] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "https" if ssl_context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def client_for(address: str, token: str | None = None, **fields: Any) -> ConsulClient:
    return ConsulClient(ConsulConfig(address=address, token=token, **fields))


async def empty(_: web.Request) -> web.Response:
    return web.Response()


class TestTransport:
    async def test_token_goes_in_the_header_and_nowhere_else(self) -> None:
        """X-Consul-Token carries the token; it is not in the URL or the body."""
        async with server(empty) as (url, seen):
            client = client_for(url, token="s3cret-token")
            try:
                await client.agent_check("service:web-1", "passing", "ok")
            finally:
                await client.close()
        (request,) = seen
        assert "s3cret-token" == request.headers["X-Consul-Token"]
        assert "s3cret-token" not in str(request.rel_url)
        assert "s3cret-token" not in repr(client)

    async def test_one_session_serves_every_call_and_closes(self) -> None:
        """Calls reuse one pooled session (one TCP connection here); close() closes it."""
        peers: set[object] = set()

        async def note_peer(request: web.Request) -> web.Response:
            assert request.transport is not None
            peers.add(request.transport.get_extra_info("peername"))
            return web.Response()

        async with server(note_peer) as (url, _):
            client = client_for(url)
            for _ in range(5):
                await client.agent_check("service:web-1", "passing", "ok")
            session = client.session()
            await client.close()
        assert 1 == len(peers)
        assert session.closed

    async def test_a_call_is_bounded_by_its_own_timeout(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A Consul that never answers fails the call after CALL_TIMEOUT, as unreachable."""
        monkeypatch.setattr(consul_client, "CALL_TIMEOUT", 0.2)
        never = asyncio.Event()

        async def hang(_: web.Request) -> web.Response:
            await never.wait()
            return web.Response()

        async with server(hang) as (url, _):
            client = client_for(url)
            began = time.monotonic()
            with pytest.raises(ConsulUnreachable) as info:
                await client.agent_deregister("web-1")
            await client.close()
            never.set()
        assert time.monotonic() - began < 5
        assert "deregister: no answer within 0.2s" == str(info.value)

    async def test_a_blocking_query_gets_its_wait_plus_jitter_and_margin(self) -> None:
        """The query's timeout is wait * 17/16 + margin, sent as a Go duration."""

        async def answer(request: web.Request) -> web.Response:
            return web.json_response([], headers={"X-Consul-Index": "7"})

        async with server(answer) as (url, seen):
            client = client_for(url, datacenter="dc2")
            try:
                index, entries = await client.health_service("billing", index=3, wait=2.5)
            finally:
                await client.close()
        assert (7, []) == (index, entries)
        query = seen[0].query
        assert ("3", "2500ms", "1", "dc2") == (
            query["index"],
            query["wait"],
            query["passing"],
            query["dc"],
        )

    async def test_connection_refused_is_unreachable_naming_the_address(self) -> None:
        """Nothing listening: ConsulUnreachable with the address and the OS reason."""
        async with server(empty) as (url, _):
            pass  # the port is free again now
        client = client_for(url)
        with pytest.raises(ConsulUnreachable) as info:
            await client.agent_deregister("web-1")
        await client.close()
        port = url.rsplit(":", 1)[1]
        assert f"deregister: cannot connect to 127.0.0.1:{port}: Connection refused" == str(
            info.value
        )


class TestErrorMapping:
    @pytest.mark.parametrize(
        ("status", "body", "kind"),
        [
            (400, "Invalid Service Meta: Key contains invalid characters", ConsulBadRequest),
            (403, "ACL not found", ConsulPermissionDenied),
            (
                404,
                'Unknown check ID "service:x". Ensure that the check ID is passed',
                ConsulNotFound,
            ),
            (405, "method GET not allowed", ConsulHTTPError),
            (500, "rpc error making call: No cluster leader", ConsulHTTPError),
        ],
    )
    async def test_plain_text_errors_keep_status_and_message(
        self, status: int, body: str, kind: type[ConsulHTTPError]
    ) -> None:
        """Consul's plain-text error becomes the sidecar's exception with both parts."""

        async def fail(_: web.Request) -> web.Response:
            return web.Response(status=status, text=body)

        async with server(fail) as (url, _):
            client = client_for(url, token="tok")
            with pytest.raises(ConsulHTTPError) as info:
                await client.agent_check("service:x", "critical", "down")
            await client.close()
        assert kind is type(info.value)
        assert (status, body) == (info.value.status, info.value.reason)
        assert f"check_update: Consul answered {status}: {body}" == str(info.value)

    async def test_errors_are_counted_by_operation(self) -> None:
        """on_error hears the operation of each failed call, without the service name."""
        counted: list[str] = []

        async def fail(_: web.Request) -> web.Response:
            return web.Response(status=500, text="boom")

        async with server(fail) as (url, _):
            client = ConsulClient(ConsulConfig(address=url), on_error=counted.append)
            for call in (
                client.agent_deregister("a"),
                client.health_service("billing", index=0, wait=1),
            ):
                with pytest.raises(ConsulHTTPError):
                    await call
            await client.close()
        assert ["deregister", "watch"] == counted

    async def test_a_missing_index_header_is_an_error_not_a_crash(self) -> None:
        """A 200 without X-Consul-Index (not Consul) is reported as an unreadable answer."""

        async def no_index(_: web.Request) -> web.Response:
            return web.json_response([])

        async with server(no_index) as (url, _):
            client = client_for(url)
            with pytest.raises(ConsulError) as info:
                await client.health_service("billing", index=0, wait=1)
            await client.close()
        assert "unreadable answer from Consul" in str(info.value)


def _make_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it (openssl CLI)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return tmp / "ca.pem", tmp / "srv.pem", tmp / "srv.key"


class TestTLS:
    async def test_https_with_the_ca_file_and_without(self, tmp_path: Path) -> None:
        """https:// with CONSUL_CACERT's CA verifies the server; without it, a clear error."""
        ca, cert, key = _make_ca(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        async with server(empty, context) as (url, seen):
            trusted = client_for(url, ca_file=str(ca))
            await trusted.agent_deregister("web-1")
            await trusted.close()
            untrusted = client_for(url)
            with pytest.raises(ConsulUnreachable) as info:
                await untrusted.agent_deregister("web-1")
            await untrusted.close()
        assert 1 == len(seen)
        assert "certificate" in str(info.value).lower()


class TestAppProbe:
    async def test_http_probe_notes_status_and_latency(self) -> None:
        """2xx passing, 429 warning, others critical; the note names target and status."""
        statuses = iter([200, 429, 503])

        async def health(_: web.Request) -> web.Response:
            return web.Response(status=next(statuses))

        async with server(health) as (url, _):
            port = int(url.rsplit(":", 1)[1])
            probe = AppProbe(port, HealthConfig(path="/healthz", timeout=2))
            results = [await probe.check() for _ in range(3)]
        assert ["passing", "warning", "critical"] == [r.status for r in results]
        assert results[2].note.startswith(f"HTTP GET http://127.0.0.1:{port}/healthz: 503 in ")
        assert results[2].note.endswith(" ms")

    async def test_tcp_probe_reports_the_connect_error(self) -> None:
        """No path: a TCP connect; refused is critical with the OS's reason."""
        async with server(empty) as (url, _):
            port = int(url.rsplit(":", 1)[1])
            up = await AppProbe(port, HealthConfig()).check()
        down = await AppProbe(port, HealthConfig()).check()
        assert "passing" == up.status
        assert ("critical", f"TCP connect 127.0.0.1:{port}: Connection refused") == down

    async def test_a_slow_app_is_critical_after_the_timeout(self) -> None:
        """An app that does not answer within health.timeout is critical, saying so."""
        never = asyncio.Event()

        async def hang(_: web.Request) -> web.Response:
            await never.wait()
            return web.Response()

        async with server(hang) as (url, _):
            port = int(url.rsplit(":", 1)[1])
            result = await AppProbe(port, HealthConfig(path="/h", timeout=0.1)).check()
            never.set()
        assert ("critical", f"HTTP GET http://127.0.0.1:{port}/h: no answer within 0.1s") == result


class TestHeartbeat:
    def test_a_heartbeat_round_trips_through_the_check_output(self) -> None:
        """The line a catalog-mode sidecar writes gives the time it goes stale: 3 intervals."""
        now = 1_800_000_000.25
        entry = {
            "Checks": [
                {"CheckID": "serfHealth", "Output": "Agent alive"},
                {
                    "CheckID": f"{HEARTBEAT_CHECK_PREFIX}web-1",
                    "Output": f"TCP connect ok\n{heartbeat_line(now, 10)}",
                },
            ]
        }
        assert now + 30 == pytest.approx(heartbeat_deadline(entry))

    def test_instances_without_a_sidecar_heartbeat_have_none(self) -> None:
        """Agent-mode instances and other tools' registrations are never judged stale."""
        entry = {"Checks": [{"CheckID": "service:web-1", "Output": json.dumps({"x": 1})}]}
        assert None is heartbeat_deadline(entry)
