"""A WebSocket service to tunnel to, and a WebSocket client whose handshake can be sent
in absolute form, for the WebSocket integration tests.

Everything binds 127.0.0.1 on ephemeral ports and is closed by whoever opened it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.uri import parse_uri

from tests.integration.harness import serve

#: What `WsUpstream`'s `/flood` sends per message.
MIB = 1024 * 1024


class WsUpstream:
    """An aiohttp app that plays a WebSocket service.

    Routes: `/ws` echoes every text and binary message; `/flood?mib=N` sends N binary
    messages of 1 MiB as soon as it is connected (`flood_sent` counts the bytes it
    got rid of) and then waits for the close; `/drop` accepts the handshake and then
    drops its TCP connection without a close frame; `/forbidden` answers a handshake
    403 (and a request that is no handshake 400, as a WebSocket-only endpoint does);
    `/plain` answers 200 `plain`.
    `handshakes` holds (request-target, Host) of each upgrade request received; `open`
    counts the WebSockets open now.
    """

    def __init__(self) -> None:
        self.port = 0
        self.handshakes: list[tuple[str, str]] = []
        self.open = 0
        self.flood_sent = 0
        self._transports: set[asyncio.Transport] = set()
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _accept(self, request: web.Request) -> web.WebSocketResponse:
        # No compression, so what crosses the tunnel is as big as the messages.
        ws = web.WebSocketResponse(compress=False, max_msg_size=8 * MIB)
        await ws.prepare(request)  # 400 to a request that is no WebSocket handshake
        self.handshakes.append((request.raw_path, request.headers.get("Host", "")))
        self.open += 1
        assert request.transport is not None
        self._transports.add(request.transport)
        return ws

    def _closed(self, request: web.Request) -> None:
        self.open -= 1
        if request.transport is not None:
            self._transports.discard(request.transport)

    def _app(self) -> web.Application:
        app = web.Application()

        async def echo(request: web.Request) -> web.WebSocketResponse:
            ws = await self._accept(request)
            try:
                async for msg in ws:
                    if msg.type == WSMsgType.TEXT:
                        await ws.send_str(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        await ws.send_bytes(msg.data)
            finally:
                self._closed(request)
            return ws

        async def flood(request: web.Request) -> web.WebSocketResponse:
            ws = await self._accept(request)
            block = bytes(range(256)) * (MIB // 256)
            try:
                for _ in range(int(request.query["mib"])):
                    await ws.send_bytes(block)  # waits while the tunnel pushes back
                    self.flood_sent += len(block)
                await ws.receive()
            finally:
                self._closed(request)
            return ws

        async def drop(request: web.Request) -> web.WebSocketResponse:
            ws = await self._accept(request)
            assert request.transport is not None
            request.transport.abort()
            self._closed(request)
            return ws

        async def forbidden(request: web.Request) -> web.Response:
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return web.json_response({"error": "not a WebSocket handshake"}, status=400)
            self.handshakes.append((request.raw_path, request.headers.get("Host", "")))
            return web.json_response({"error": "origin not allowed"}, status=403)

        async def plain(request: web.Request) -> web.Response:
            return web.Response(text="plain")

        app.router.add_get("/ws", echo)
        app.router.add_get("/flood", flood)
        app.router.add_get("/drop", drop)
        app.router.add_get("/forbidden", forbidden)
        app.router.add_get("/plain", plain)
        return app

    async def start(self) -> WsUpstream:
        self._runner, self.port = await serve(self._app())
        return self

    async def stop(self) -> None:
        """Drop every WebSocket still open (a handler blocked sending to a peer that
        does not read would otherwise hold the shutdown), then stop the server."""
        for transport in list(self._transports):
            transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.asynccontextmanager
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """A started `WsUpstream`, stopped on exit."""
    upstream = await WsUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.stop()


class SansIoClient:
    """A WebSocket client: websockets' sans-I/O `ClientProtocol` driven over a plain TCP
    connection, so the handshake's request-target can be rewritten.

    An app behind `HTTP_PROXY` that sends a WebSocket handshake as a plain proxied
    request (`GET http://billing/ws HTTP/1.1`) needs this: aiohttp's proxy mode sends
    `GET ws://billing/ws`, and websockets' own client asks the proxy for CONNECT.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: ClientProtocol
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol
        self._events: list[Frame | Request | Response] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int, uri: str, target: str) -> AsyncIterator[SansIoClient]:
        """Handshake for `uri` with 127.0.0.1:`port`, its request line naming `target`;
        yields the open client and closes it on exit."""
        protocol = ClientProtocol(parse_uri(uri), max_size=None)
        request = protocol.connect()
        request.path = target
        protocol.send_request(request)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer, protocol)
        try:
            client._flush()
            response = await client._next_event()
            if protocol.handshake_exc is not None:
                raise protocol.handshake_exc
            assert isinstance(response, Response)
            yield client
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.writer.write(data)
            elif self.writer.can_write_eof():
                self.writer.write_eof()

    async def _next_event(self) -> Frame | Request | Response:
        while not self._events:
            data = await asyncio.wait_for(self.reader.read(1 << 16), 5)
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            self._events.extend(self.protocol.events_received())
            self._flush()  # pongs and the reply to a close
            if not data and not self._events:
                raise ConnectionError("the connection closed")
        return self._events.pop(0)

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.protocol.send_text(message.encode())
        else:
            self.protocol.send_binary(message)
        self._flush()
        await self.writer.drain()

    async def recv(self) -> str | bytes:
        """The next whole text or binary message."""
        parts: list[bytes] = []
        opcode: Opcode | None = None
        while True:
            event = await self._next_event()
            if not isinstance(event, Frame) or event.opcode in (Opcode.PING, Opcode.PONG):
                continue
            if event.opcode == Opcode.CLOSE:
                raise ConnectionError("the server closed the WebSocket")
            opcode = opcode or event.opcode
            parts.append(bytes(event.data))
            if event.fin:
                data = b"".join(parts)
                return data.decode() if opcode == Opcode.TEXT else data
