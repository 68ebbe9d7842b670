"""WebSocket handshakes are tunnelled after a relayed 101 (SPEC §4), by every routing
form, with real clients: aiohttp and websockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    Sidecar,
    free_port,
    poll_json,
    raw_responses,
    running_sidecar,
)
from tests.integration.ws_upstream import MIB, SansIoClient, WsUpstream, ws_upstream

BLOB = os.urandom(MIB)
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
#: What a WebSocket client that was tunnelled gets back for "hello" and `BLOB`.
ECHOED = ("hello", BLOB_SHA)
_CLOSED = {WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR}


def _handshake(target: str, host: str = "app") -> bytes:
    """A WebSocket handshake as a browser or client library sends it."""
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()


@pytest.fixture
async def ws_service() -> AsyncIterator[WsUpstream]:
    """A WebSocket service on an ephemeral port; stopped afterwards."""
    async with ws_upstream() as upstream:
        yield upstream


@contextlib.asynccontextmanager
async def _sidecar(
    tmp: Path, endpoint: str, listen: int | None = None, **extra: Any
) -> AsyncIterator[Sidecar]:
    """A sidecar whose one upstream, `billing`, is `endpoint`; with `listen`, billing
    also has that dedicated port. `extra` are top-level config sections."""
    billing: dict[str, Any] = {"endpoints": [endpoint]}
    if listen is not None:
        billing["listen"] = f"127.0.0.1:{listen}"
    async with running_sidecar(tmp, {"billing": billing}, **extra) as sc:
        yield sc


async def _end(ws: aiohttp.ClientWebSocketResponse[bool], timeout: float) -> str:
    """How a WebSocket ends: 'closed', or the message it got instead, or that it is
    still open after `timeout` seconds."""
    try:
        msg = await ws.receive(timeout=timeout)
    except TimeoutError:
        return f"still open after {timeout} s"
    return _kind(msg.type, msg.data)


def _kind(msg_type: WSMsgType, data: object) -> str:
    """'closed' for a message saying the WebSocket ended, else the message itself."""
    return "closed" if msg_type in _CLOSED else f"{msg_type.name}: {data!r}"


async def _echo_aiohttp(ws: aiohttp.ClientWebSocketResponse[bool]) -> tuple[str, str]:
    """Send "hello" and `BLOB`; what came back (the binary as its sha256)."""
    await ws.send_str("hello")
    text = await ws.receive(timeout=5)
    await ws.send_bytes(BLOB)
    binary = await ws.receive(timeout=5)
    return (
        text.data if text.type == WSMsgType.TEXT else _kind(text.type, text.data),
        hashlib.sha256(binary.data).hexdigest()
        if binary.type == WSMsgType.BINARY
        else _kind(binary.type, binary.data),
    )


async def _echo_websockets(ws: ClientConnection | SansIoClient) -> tuple[str, str]:
    await ws.send("hello")
    text = await asyncio.wait_for(ws.recv(), 5)
    await ws.send(BLOB)
    binary = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(binary, bytes)
    return str(text), hashlib.sha256(binary).hexdigest()


async def _outcome(attempt: Callable[[], Awaitable[tuple[str, str]]]) -> tuple[str, str] | str:
    """What one client got through one routing form, or how it failed: so that one
    assertion shows every form's result."""
    try:
        return await attempt()
    except aiohttp.WSServerHandshakeError as exc:
        return f"handshake answered {exc.status}"
    except InvalidStatus as exc:
        return f"handshake answered {exc.response.status_code}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _websockets(uri: str, **kwargs: Any) -> connect:
    """websockets' client with no proxy from the environment, no compression (the
    bytes crossing the tunnel are the messages) and room for `BLOB`."""
    return connect(uri, proxy=None, compression=None, max_size=2 * MIB, **kwargs)


class TestRoutingForms:
    async def test_aiohttp_client_echoes_through_every_routing_form(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """aiohttp's WebSocket client gets a text and a 1 MiB binary message echoed
        through /v1/invoke/billing/ws, `Host: billing`, its HTTP proxy mode
        (`ws_connect("ws://billing/ws", proxy=...)`) and billing's dedicated port."""
        dedicated = free_port()
        async with (
            _sidecar(tmp_path, ws_service.endpoint, listen=dedicated) as sc,
            aiohttp.ClientSession() as session,
        ):
            app = f"ws://127.0.0.1:{sc.app_port}"
            forms: dict[str, tuple[str, dict[str, Any]]] = {
                "path": (f"{app}/v1/invoke/billing/ws", {}),
                "host": (f"{app}/ws", {"headers": {"Host": "billing"}}),
                "absolute": ("ws://billing/ws", {"proxy": sc.url}),
                "dedicated": (f"ws://127.0.0.1:{dedicated}/ws", {}),
            }
            results = {}
            for form, (url, kwargs) in forms.items():

                async def attempt(url: str = url, kwargs: dict[str, Any] = kwargs) -> Any:
                    async with session.ws_connect(url, max_msg_size=2 * MIB, **kwargs) as ws:
                        return await _echo_aiohttp(ws)

                results[form] = await _outcome(attempt)
        assert dict.fromkeys(forms, ECHOED) == results
        assert [f"127.0.0.1:{sc.app_port}", "billing", "billing", f"127.0.0.1:{dedicated}"] == [
            host for _, host in ws_service.handshakes
        ]

    async def test_aiohttp_proxy_mode_handshake_reaches_the_service_in_origin_form(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """aiohttp behind an HTTP proxy sends its handshake as `GET ws://billing/ws
        HTTP/1.1` (a `ws` URI in absolute form, not `http`): the service gets it as
        `GET /ws` with `Host: billing`, as for an `http://` absolute-form target."""
        async with (
            _sidecar(tmp_path, ws_service.endpoint) as sc,
            aiohttp.ClientSession() as session,
            session.ws_connect("ws://billing/ws", proxy=sc.url) as ws,
        ):
            await ws.send_str("hello")
            msg = await ws.receive(timeout=5)
        assert "hello" == msg.data
        assert [("/ws", "billing")] == ws_service.handshakes

    async def test_websockets_client_echoes_through_every_routing_form(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """The websockets library gets a text and a 1 MiB binary message echoed through
        /v1/invoke/billing/ws, `Host: billing` (`ws://billing/ws` connected to the
        sidecar's address), billing's dedicated port, and - its sans-I/O protocol, as
        its own client only proxies through CONNECT - an absolute-form handshake
        `GET http://billing/ws HTTP/1.1`."""
        dedicated = free_port()
        async with _sidecar(tmp_path, ws_service.endpoint, listen=dedicated) as sc:
            app = f"ws://127.0.0.1:{sc.app_port}"
            clients: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[Any]]] = {
                "path": lambda: _websockets(f"{app}/v1/invoke/billing/ws"),
                "host": lambda: _websockets("ws://billing/ws", host="127.0.0.1", port=sc.app_port),
                "absolute": lambda: SansIoClient.connect(
                    sc.app_port, "ws://billing/ws", "http://billing/ws"
                ),
                "dedicated": lambda: _websockets(f"ws://127.0.0.1:{dedicated}/ws"),
            }
            results = {}
            for form, client in clients.items():

                async def attempt(client: Callable[[], Any] = client) -> tuple[str, str]:
                    async with client() as ws:
                        return await _echo_websockets(ws)

                results[form] = await _outcome(attempt)
        assert dict.fromkeys(clients, ECHOED) == results
        assert [
            ("/ws", f"127.0.0.1:{sc.app_port}"),
            ("/ws", "billing"),
            ("/ws", "billing"),
            ("/ws", f"127.0.0.1:{dedicated}"),
        ] == ws_service.handshakes


class TestTimers:
    async def test_tunnel_idle_longer_than_timeout_still_carries_data(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """With `timeout: 1s, per_try_timeout: 500ms`, a tunnel left idle for 1.5 s
        after its handshake was sent still echoes: those timers end at the 101."""
        upstream = {
            "endpoints": [ws_service.endpoint],
            "timeout": "1s",
            "per_try_timeout": "500ms",
        }
        async with (
            running_sidecar(tmp_path, {"billing": upstream}) as sc,
            aiohttp.ClientSession() as session,
        ):
            began = time.monotonic()  # before the sidecar can have started any timer

            async def attempt() -> tuple[str, str]:
                async with session.ws_connect(
                    f"ws://127.0.0.1:{sc.app_port}/v1/invoke/billing/ws", max_msg_size=2 * MIB
                ) as ws:
                    await asyncio.sleep(began + 1.5 - time.monotonic())
                    return await _echo_aiohttp(ws)

            result = await _outcome(attempt)
            idle = time.monotonic() - began
        assert ECHOED == result
        assert idle >= 1.5

    async def test_idle_timeout_closes_a_quiet_tunnel_but_not_a_busy_one(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """With `app_connections.idle_timeout: 2s`, a tunnel with no bytes either way is
        closed (the client sees its connection end), while one with a message every
        300 ms for 3 s stays open (1.7 s of slack for a descheduled test process)."""
        async with (
            _sidecar(tmp_path, ws_service.endpoint, app_connections={"idle_timeout": "2s"}) as sc,
            aiohttp.ClientSession() as session,
        ):
            url = f"ws://127.0.0.1:{sc.app_port}/v1/invoke/billing/ws"

            async def quiet() -> tuple[str, float]:
                began = time.monotonic()  # before the tunnel exists, so before its clock
                async with session.ws_connect(url) as ws:
                    end = await _end(ws, 10)
                return end, time.monotonic() - began

            async def busy() -> list[str]:
                echoes = []
                async with session.ws_connect(url) as ws:
                    began = time.monotonic()
                    with contextlib.suppress(aiohttp.ClientError):  # closed under it
                        while time.monotonic() - began < 3.0:
                            await asyncio.sleep(0.3)
                            await ws.send_str("ping")
                            msg = await ws.receive(timeout=5)
                            text = msg.data if msg.type == WSMsgType.TEXT else None
                            echoes.append(text or _kind(msg.type, msg.data))
                    echoes.append(f"open: {not ws.closed}")
                return echoes

            (quiet_end, quiet_after), echoes = await asyncio.gather(quiet(), busy())
        assert "closed" == quiet_end
        assert quiet_after >= 2.0
        assert [*["ping"] * (len(echoes) - 1), "open: True"] == echoes
        assert len(echoes) >= 2


class TestAccounting:
    async def test_tunnel_is_in_flight_until_closed_and_counted_under_101(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """An open tunnel is in flight for billing in /v1/status; once the client closes
        it, in-flight is back to 0 and the service's side is closed too; /metrics
        counts it once, under code 101."""
        async with (
            _sidecar(tmp_path, ws_service.endpoint) as sc,
            aiohttp.ClientSession() as session,
        ):
            status_url = f"{sc.admin}/v1/status"

            def in_flight(count: int) -> Callable[[int, Any], bool]:
                return lambda _, status: status["upstreams"]["billing"]["in_flight"] == count

            async with session.ws_connect(
                f"ws://127.0.0.1:{sc.app_port}/v1/invoke/billing/ws", max_msg_size=2 * MIB
            ) as ws:
                _, while_open = await poll_json(session, status_url, in_flight(1))
                echoed = await _echo_aiohttp(ws)
            _, after_close = await poll_json(session, status_url, in_flight(0))
            await _until(lambda: ws_service.open == 0)
            async with session.get(f"{sc.admin}/metrics") as resp:
                metrics = await resp.text()
        assert ECHOED == echoed
        assert 1 == while_open["upstreams"]["billing"]["in_flight"]
        assert 0 == after_close["upstreams"]["billing"]["in_flight"]
        assert 0 == ws_service.open
        assert {"101": 1.0} == _requests_total(metrics, "billing")


class TestTunnelEnds:
    async def test_a_side_that_drops_its_connection_gets_the_other_side_closed(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """A service that drops its TCP connection without a close frame: the app's
        connection is closed. An app that drops its connection: the service's is
        closed and the tunnel is no longer in flight."""
        async with (
            _sidecar(tmp_path, ws_service.endpoint) as sc,
            aiohttp.ClientSession() as session,
        ):
            async with session.ws_connect(
                f"ws://127.0.0.1:{sc.app_port}/v1/invoke/billing/drop"
            ) as ws:
                app_saw = await _end(ws, 5)

            reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
            try:
                writer.write(_handshake("/v1/invoke/billing/ws"))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                await _until(lambda: ws_service.open == 1)
            finally:
                writer.transport.abort()
            await _until(lambda: ws_service.open == 0)
            _, status = await poll_json(
                session,
                f"{sc.admin}/v1/status",
                lambda _, status: status["upstreams"]["billing"]["in_flight"] == 0,
            )
        assert "closed" == app_saw
        assert head.startswith(b"HTTP/1.1 101"), head
        assert 0 == ws_service.open
        assert 0 == status["upstreams"]["billing"]["in_flight"]


class TestBackPressure:
    async def test_app_that_stops_reading_holds_the_service_not_the_sidecars_memory(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """A service sending 64 MiB into a tunnel whose app reads nothing after the 101:
        the service is held back, and the sidecar's RSS grows by less than 32 MiB."""
        total = 64 * MIB
        async with _sidecar(tmp_path, ws_service.endpoint) as sc:
            before = sc.rss_kib()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_connect(sock, ("127.0.0.1", sc.app_port))
                await loop.sock_sendall(sock, _handshake("/v1/invoke/billing/flood?mib=64"))
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)
                    assert chunk, head
                    head += chunk
                # Reading stops here. Wait until the service is held (no progress for
                # half a second) or has sent everything.
                sent, still_since = ws_service.flood_sent, time.monotonic()
                while ws_service.flood_sent < total and time.monotonic() - still_since < 0.5:
                    await asyncio.sleep(0.05)
                    if ws_service.flood_sent != sent:
                        sent, still_since = ws_service.flood_sent, time.monotonic()
                growth_mib = (sc.rss_kib() - before) / 1024
                held_at = ws_service.flood_sent
            finally:
                sock.close()
        assert head.startswith(b"HTTP/1.1 101"), head
        assert held_at < total, "the sidecar took all 64 MiB from the service"
        assert growth_mib < 32, f"sidecar RSS grew {growth_mib:.1f} MiB"


class TestHandshakeAnswers:
    async def test_dead_upstream_gets_the_usual_502(self, tmp_path: Path) -> None:
        """A handshake to an endpoint where nothing listens gets 502 with the JSON error
        and `x-sidecar-error: UPSTREAM_CONNECT_FAILED`."""
        async with _sidecar(tmp_path, f"127.0.0.1:{free_port()}") as sc:
            [(head, body)] = await raw_responses(sc.app_port, _handshake("/v1/invoke/billing/ws"))
        assert head.startswith(b"HTTP/1.1 502"), head
        assert b"x-sidecar-error: UPSTREAM_CONNECT_FAILED" in head
        error = json.loads(body)["error"]
        assert ("UPSTREAM_CONNECT_FAILED", "billing") == (error["code"], error["upstream"])

    async def test_refused_handshake_is_relayed_and_the_connection_carries_on(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """A service that answers a handshake 403 instead of 101: the app gets that 403
        as a normal response, and a request sent right after the handshake on the same
        connection is then served."""
        async with _sidecar(tmp_path, ws_service.endpoint) as sc:
            (refused, refusal), (plain, text) = await raw_responses(
                sc.app_port,
                _handshake("/v1/invoke/billing/forbidden")
                + b"GET /v1/invoke/billing/plain HTTP/1.1\r\nHost: app\r\n\r\n",
                count=2,
            )
        assert refused.startswith(b"HTTP/1.1 403"), refused
        assert {"error": "origin not allowed"} == json.loads(refusal)
        assert b"x-sidecar-error" not in refused.lower()
        assert plain.startswith(b"HTTP/1.1 200"), plain
        assert b"plain" == text
        assert [("/forbidden", "app")] == ws_service.handshakes


class TestOtherUpgrades:
    async def test_h2c_upgrade_is_not_tunnelled(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`Upgrade: h2c` is dropped: the upstream gets no Upgrade, Connection or
        HTTP2-Settings, its 200 reaches the app as HTTP/1.1, and the connection
        carries the next request."""
        billing = await upstreams("billing")
        async with _sidecar(tmp_path, billing.endpoint) as sc:
            (head, body), (next_head, _) = await raw_responses(
                sc.app_port,
                b"GET /v1/invoke/billing/echo/h2c HTTP/1.1\r\nHost: app\r\n"
                b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                b"GET /v1/invoke/billing/echo/next HTTP/1.1\r\nHost: app\r\n\r\n",
                count=2,
            )
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"upgrade" not in head.lower()
        received = {name.lower() for name, _ in json.loads(body)["headers"]}
        assert set() == received & {"upgrade", "connection", "http2-settings"}
        assert next_head.startswith(b"HTTP/1.1 200"), next_head
        assert 2 == billing.hits


class TestShutdown:
    async def test_tunnel_works_through_grace_and_is_closed_at_its_end(
        self, tmp_path: Path, ws_service: WsUpstream
    ) -> None:
        """SIGTERM with a tunnel open (`drain: 0s, grace: 2s`): the tunnel still echoes
        after the signal was handled, is closed once grace is over (not before), and
        the sidecar exits 0."""
        async with (
            _sidecar(tmp_path, ws_service.endpoint, shutdown={"drain": "0s", "grace": "2s"}) as sc,
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"ws://127.0.0.1:{sc.app_port}/v1/invoke/billing/ws", max_msg_size=2 * MIB
            ) as ws,
        ):
            signalled = time.monotonic()  # before the sidecar's grace can start
            sc.signal(signal.SIGTERM)
            ready, _ = await poll_json(session, f"{sc.admin}/ready", lambda s, _: s != 200)
            during_grace = await _outcome(lambda: _echo_aiohttp(ws))
            end = await _end(ws, 10)
            closed_after = time.monotonic() - signalled
            code = await sc.wait_exit(10)
        assert 503 == ready
        assert ECHOED == during_grace
        assert "closed" == end
        assert closed_after >= 2.0
        assert 0 == code, sc.logs()


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for state held in this process (a test server's) to change."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


_SAMPLE = re.compile(r"^sidecar_upstream_requests_total\{([^}]*)\} (\S+)$", re.MULTILINE)


def _requests_total(metrics: str, upstream: str) -> dict[str, float]:
    """`sidecar_upstream_requests_total` for one upstream from a /metrics page, by code."""
    counts = {}
    for labels, value in _SAMPLE.findall(metrics):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if pairs.get("upstream") == upstream:
            counts[pairs["code"]] = float(value)
    return counts
