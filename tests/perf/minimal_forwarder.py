"""The Python ceiling for bench_proxy.py: a minimal keep-alive HTTP/1.1 forwarder.

uvloop + httptools, the same building blocks as the sidecar, and nothing else: each
app connection gets one kept-alive upstream connection; a request is parsed, its
head written again (method, target, headers, Content-Length framing) and sent; the
response is parsed and its head and body written back. No routing, balancing,
retries, timeouts, breakers, metrics, tracing or header hygiene. It handles what
wrk sends (bodiless GETs, keep-alive); it is a measuring stick, not a proxy.

Usage: python tests/perf/minimal_forwarder.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, cast

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """The upstream half: parses responses and writes them to the app's transport."""

    def __init__(self, down: asyncio.Transport) -> None:
        self.down = down
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.out: list[bytes] = []
        self.waiting: list[bytes] = []  # requests sent before the connection was up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        for head in self.waiting:
            self.transport.write(head)
        self.waiting = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.out.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.out.insert(0, b"HTTP/1.1 %d OK\r\n" % status)
        self.out.append(b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def on_message_complete(self) -> None:
        self.down.writelines(self.out)
        self.out = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.close()


class Downstream(asyncio.Protocol):
    """The app's half: parses requests and sends them on the upstream connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.up: Upstream | None = None
        self.connecting: asyncio.Task[Any] | None = None
        self.url = b""
        self.headers: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        up = self.up = Upstream(self.transport)
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(
            loop.create_connection(lambda: up, "127.0.0.1", self.upstream_port)
        )

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        head = b"%s %s HTTP/1.1\r\n%s\r\n" % (method, self.url, b"".join(self.headers))
        up = self.up
        assert up is not None
        if up.transport is None:
            up.waiting.append(head)
        else:
            up.transport.write(head)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def serve(listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Downstream(upstream), "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
