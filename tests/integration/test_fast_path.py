"""The proxy's task-less fast path, in process: a bodyless request to a configured
upstream with an idle pooled connection is admitted, sent and answered from parser and
response callbacks without an asyncio task; a first attempt that may be retried goes on
in a task (`DownstreamProtocol.resume_in_task`); everything else takes the coroutine
path (`DownstreamProtocol._serve`).

The proxy objects run in the test's own event loop against a scripted raw upstream on
127.0.0.1, so which path served a request is observed by spying on the methods that
start each one, and the counts they must release (in flight, active, outstanding) are
read directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import httptools
import pytest
import structlog
import structlog.testing
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.config import (
    Address,
    BreakerConfig,
    RetryConfig,
    UpstreamConfig,
    config_from_mapping,
)
from sidecar.discovery.base import Endpoint
from sidecar.discovery.static import StaticResolver
from sidecar.proxy.balancer import EndpointStats
from sidecar.proxy.forward import EndpointPool
from sidecar.proxy.server import LINGER, DownstreamProtocol, Exchange, Proxy, Request
from sidecar.proxy.upstream import Upstream
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracer

#: How long any single wait in these tests may take before it fails the test.
PATIENCE = 3.0

# -- the upstream: a raw HTTP/1.1 server that does what its script says ------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the upstream received it: on its `conn`-th connection (from 0), the
    `nth` request on that connection (from 0)."""

    conn: int
    nth: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class Reply:
    """What the upstream does with one request: answer (after `delay`), hang up without
    answering, or stall (say nothing until the connection closes)."""

    status: int = 200
    body: bytes | None = None  # None: the request's target
    delay: float = 0.0
    hang_up: bool = False
    stall: bool = False
    partial: bool = False  # send the head and half the body, then stall


HANG_UP = Reply(hang_up=True)
STALL = Reply(stall=True)

Script = Callable[[Seen], Reply]


def answer_all(_: Seen) -> Reply:
    return Reply()


def second_hangs_up(seen: Seen) -> Reply:
    """The first connection's second request: closed without a byte."""
    return HANG_UP if (seen.conn, seen.nth) == (0, 1) else Reply()


def second_stalls(seen: Seen) -> Reply:
    """A connection's second request: never answered."""
    return STALL if seen.nth == 1 else Reply()


def second_is_503(seen: Seen) -> Reply:
    """A connection's second request: 503 (the test makes it retryable or not)."""
    return Reply(503, b"try again") if seen.nth == 1 else Reply()


class _UpstreamConnection(asyncio.Protocol):
    def __init__(self, server: ScriptedUpstream) -> None:
        self.server = server
        self.no = len(server.connections)
        server.connections.append(self)
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.requests = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:  # Content-Length bodies, or none
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            size = int(length[1]) if length else 0
            if len(rest) < size:
                return  # the rest of the body is still coming
            self.buffer = rest[size:]
            self._handle(head, rest[:size])

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.timeline.append(f"lost {self.no}")

    def _handle(self, head: bytes, body: bytes) -> None:
        line, *fields = head.decode("latin-1").split("\r\n")
        method, target, _ = line.split(" ")
        headers = {}
        for text in fields:
            name, _, value = text.partition(":")
            headers[name.strip().lower()] = value.strip()
        seen = Seen(self.no, self.requests, method, target, headers, body)
        self.requests += 1
        self.server.seen.append(seen)
        self.server.timeline.append(f"recv {target}")
        reply = self.server.script(seen)
        assert self.transport is not None
        if reply.hang_up:
            self.transport.close()
        elif reply.partial:
            self._answer(target, reply.status, reply.body or target.encode(), partial=True)
        elif not reply.stall:
            body = target.encode() if reply.body is None else reply.body
            if reply.delay:
                handle = asyncio.get_running_loop().call_later(
                    reply.delay, self._answer, target, reply.status, body
                )
                self.server.timers.append(handle)
            else:
                self._answer(target, reply.status, body)

    def _answer(self, target: str, status: int, body: bytes, partial: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.server.timeline.append(f"send {target}")
        reason = HTTPStatus(status).phrase
        transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: text/plain\r\nX-Upstream-Conn: {self.no}\r\n\r\n".encode()
            + (body[: len(body) // 2] if partial else body)
        )


class ScriptedUpstream:
    """A raw HTTP/1.1 upstream on 127.0.0.1: every request it receives is recorded and
    handled as `script` says; answers carry `X-Upstream-Conn` (which connection)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections: list[_UpstreamConnection] = []
        self.seen: list[Seen] = []
        self.timeline: list[str] = []  # "recv /x", "send /x", "lost 0", in order
        self.timers: list[asyncio.TimerHandle] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> ScriptedUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _UpstreamConnection(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for timer in self.timers:
            timer.cancel()
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# -- the app's side: raw keep-alive connections ---------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def get(target: str, host: str = "localhost", extra: Sequence[tuple[str, str]] = ()) -> bytes:
    fields = "".join(f"{name}: {value}\r\n" for name, value in ((("Host", host), *extra)))
    return f"GET {target} HTTP/1.1\r\n{fields}\r\n".encode()


def with_body(
    method: str, target: str, body: bytes, extra: Sequence[tuple[str, str]] = ()
) -> tuple[bytes, bytes]:
    """A request's head (with its Content-Length) and its body, to send together or not."""
    fields = "".join(f"{name}: {value}\r\n" for name, value in extra)
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{fields}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode(), body


class AppConnection:
    """One keep-alive connection from the app to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self) -> Answer:
        """The next Content-Length-framed answer."""
        async with asyncio.timeout(PATIENCE):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *fields = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            headers = {}
            for text in fields:
                name, _, value = text.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers["content-length"]))
        return Answer(int(status_line.split(" ")[1]), headers, body)

    async def get(self, target: str, **kw: Any) -> Answer:
        self.send(get(target, **kw))
        return await self.answer()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# -- spies on which path serves a request ---------------------------------------------------------


class Paths:
    """Which path served each request, by the app's request target."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tasks: list[str] = []  # `_serve` started for a new request (the coroutine path)
        self.fast: list[str] = []  # `Exchange.start_fast` took it (task-less)
        self.resumed: list[str] = []  # `resume_in_task`: a task-less attempt goes on in a task
        self.retried: list[str] = []  # `Exchange.retry` ran
        self.served: list[str] = []  # a task-less exchange finished (`served`)
        self.verdicts: list[bool | None] = []  # the breaker's verdict, per request
        serve = DownstreamProtocol._serve
        start_fast = Exchange.start_fast
        resume_in_task = DownstreamProtocol.resume_in_task
        retry = Exchange.retry
        served = DownstreamProtocol.served
        settle = Exchange._settle

        def spy_serve(
            down: DownstreamProtocol, req: Request | None, resumed: Exchange | None = None
        ) -> Coroutine[Any, Any, None]:
            if resumed is None and req is not None:
                self.tasks.append(req.target.decode())
            return serve(down, req, resumed)

        def spy_start_fast(exchange: Exchange) -> bool:
            taken = start_fast(exchange)
            if taken:
                self.fast.append(exchange.req.target.decode())
            return taken

        def spy_resume_in_task(down: DownstreamProtocol, exchange: Exchange) -> None:
            self.resumed.append(exchange.req.target.decode())
            resume_in_task(down, exchange)

        async def spy_retry(exchange: Exchange) -> bool:
            self.retried.append(exchange.req.target.decode())
            return await retry(exchange)

        def spy_served(down: DownstreamProtocol, req: Request, keep: bool) -> None:
            self.served.append(req.target.decode())
            served(down, req, keep)

        def spy_settle(exchange: Exchange, probe: bool, verdict: bool | None, took: float) -> None:
            self.verdicts.append(verdict)
            settle(exchange, probe, verdict, took)

        monkeypatch.setattr(DownstreamProtocol, "_serve", spy_serve)
        monkeypatch.setattr(Exchange, "start_fast", spy_start_fast)
        monkeypatch.setattr(DownstreamProtocol, "resume_in_task", spy_resume_in_task)
        monkeypatch.setattr(Exchange, "retry", spy_retry)
        monkeypatch.setattr(DownstreamProtocol, "served", spy_served)
        monkeypatch.setattr(Exchange, "_settle", spy_settle)


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Paths:
    return Paths(monkeypatch)


# -- the proxy, in process ------------------------------------------------------------------------


async def until(what: str, predicate: Callable[[], bool], timeout: float = PATIENCE) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {timeout}s")
        await asyncio.sleep(0.005)


@dataclass
class Rig:
    """A proxy with one upstream, `billing`, whose only endpoint is `backend`."""

    proxy: Proxy
    upstream: Upstream
    metrics: Metrics
    backend: ScriptedUpstream
    port: int
    downstreams: list[DownstreamProtocol] = field(default_factory=list)
    apps: list[AppConnection] = field(default_factory=list)

    @property
    def stats(self) -> EndpointStats:
        (stats,) = self.upstream.balancer.endpoints
        return stats

    @property
    def pool(self) -> EndpointPool:
        pool = self.stats.pool
        assert isinstance(pool, EndpointPool)
        return pool

    async def connect(self) -> AppConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        app = AppConnection(reader, writer)
        self.apps.append(app)
        return app

    def leaks(self) -> dict[str, int]:
        """What every finished request must have given back; all zero when idle."""
        return {
            "proxy.active": self.proxy.active,
            "upstream.inflight": self.upstream.inflight,
            "endpoint.outstanding": self.stats.outstanding,
            "busy app connections": sum(d.busy for d in self.downstreams),
            "tasks": sum(d.task is not None for d in self.downstreams),
        }

    def without_tasks(self) -> bool:
        return all(d.task is None for d in self.downstreams)

    async def settled(self) -> None:
        """Wait until no request holds anything (the proxy's state, polled)."""
        await until("settled", lambda: not any(self.leaks().values()))

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"upstream": "billing", **labels})
        return 0.0 if value is None else value


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig() -> AsyncIterator[RigFactory]:
    """Start proxies (the app listener, routing by path or Host) in front of scripted
    upstreams; everything is closed afterwards, and the proxy's tasks are waited for."""
    rigs: list[Rig] = []
    servers: list[asyncio.Server] = []

    async def start(
        script: Script = answer_all, *, tracer: Tracer | None = None, **settings: Any
    ) -> Rig:
        """`settings`: `UpstreamConfig` fields for `billing` (retries, per_try_timeout...)."""
        backend = await ScriptedUpstream(script).start()
        metrics = Metrics()
        config = UpstreamConfig(
            name="billing", endpoints=(Address("127.0.0.1", backend.port),), **settings
        )
        resolver = StaticResolver([Endpoint("127.0.0.1", backend.port)])
        upstream = Upstream(config, resolver, metrics)
        await resolver.start()
        proxy = Proxy({"billing": upstream}, metrics)
        proxy.tracer = tracer
        downstreams: list[DownstreamProtocol] = []

        def protocol() -> DownstreamProtocol:
            down = proxy.protocol(None)
            downstreams.append(down)
            return down

        server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
        servers.append(server)
        made = Rig(
            proxy, upstream, metrics, backend, server.sockets[0].getsockname()[1], downstreams
        )
        rigs.append(made)
        return made

    try:
        yield start
    finally:
        for made in rigs:
            for app in made.apps:
                await app.close()
            made.proxy.abort_all()
        for server in servers:
            server.close()
            await server.wait_closed()
        for made in rigs:
            await made.backend.stop()
            await until("without tasks", made.without_tasks)


def conn_of(answer: Answer) -> int:
    """Which upstream connection answered."""
    return int(answer.headers["x-upstream-conn"])


# -- the tests ------------------------------------------------------------------------------------


class TestCommonCase:
    async def test_keep_alive_requests_after_the_first_are_served_without_a_task(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """The first request connects (the coroutine path); the next two, on the pooled
        connection, are sent and answered task-less, routed by path and by Host alike,
        and every count they took is given back; the connection returns to the pool."""
        r = await rig()
        app = await r.connect()

        one = await app.get("/v1/invoke/billing/one")
        two = await app.get("/v1/invoke/billing/two?x=1")
        three = await app.get("/three", host="billing:8080")

        assert [200, 200, 200] == [one.status, two.status, three.status]
        assert [b"/one", b"/two?x=1", b"/three"] == [one.body, two.body, three.body]
        assert ["/v1/invoke/billing/one"] == paths.tasks
        assert ["/v1/invoke/billing/two?x=1", "/three"] == paths.fast
        assert ["/v1/invoke/billing/two?x=1", "/three"] == paths.served
        assert [] == paths.resumed
        assert [0, 0, 0] == [conn_of(one), conn_of(two), conn_of(three)]
        # Forwarded alike on both paths; the app's Host is kept.
        assert r.backend.seen[0].headers == r.backend.seen[1].headers
        assert "billing:8080" == r.backend.seen[2].headers["host"]
        await r.settled()
        (conn,) = r.pool.idle
        assert not conn.closed
        assert 1 == len(r.backend.connections)
        assert 3.0 == r.sample("sidecar_upstream_requests_total", code="200")
        assert 3.0 == r.sample("sidecar_upstream_request_duration_seconds_count")
        assert 0.0 == r.sample("sidecar_retries_total")
        assert [True, True, True] == paths.verdicts
        assert "closed" == r.upstream.breaker.state
        assert 0 == r.upstream.breaker.failure_count
        assert 0 == r.stats.consecutive_failures

    async def test_a_small_body_that_came_with_its_head_is_sent_task_less(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A POST whose Content-Length body arrives in the same read as its head is
        dispatched once the body is in and sent whole, head and body, without a task;
        a GET pipelined behind it in that read waits its turn."""
        r = await rig()
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        head, body = with_body("POST", "/v1/invoke/billing/b", b'{"order": 42}')

        app.send(head + body + get("/v1/invoke/billing/c"))
        posted, after = await app.answer(), await app.answer()

        assert (200, b"/b", 200, b"/c") == (posted.status, posted.body, after.status, after.body)
        assert ["/v1/invoke/billing/a"] == paths.tasks
        assert ["/v1/invoke/billing/b", "/v1/invoke/billing/c"] == paths.fast
        _, seen_b, seen_c = r.backend.seen
        assert ("POST", b'{"order": 42}', "13") == (
            seen_b.method,
            seen_b.body,
            seen_b.headers["content-length"],
        )
        assert ("GET", b"", 0) == (seen_c.method, seen_c.body, seen_c.conn)
        await r.settled()
        assert 3.0 == r.sample("sidecar_upstream_requests_total", code="200")
        assert 1 == len(r.pool.idle)

    async def test_a_body_still_arriving_after_its_head_streams_from_a_task(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """When the read ends before the body does, the request is dispatched at once,
        on the coroutine path, and the rest of its body streams to the upstream as
        it arrives."""
        r = await rig()
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        head, body = with_body("PUT", "/v1/invoke/billing/b", b"x" * 1000)

        app.send(head + body[:10])
        await until("the upstream connection taken", lambda: not r.pool.idle)
        app.send(body[10:])
        put = await app.answer()

        assert (200, b"/b") == (put.status, put.body)
        assert ["/v1/invoke/billing/a", "/v1/invoke/billing/b"] == paths.tasks
        assert [] == paths.fast
        assert (b"x" * 1000, 0) == (r.backend.seen[1].body, r.backend.seen[1].conn)
        await r.settled()

    async def test_a_task_less_body_is_sent_again_on_a_retry(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """The kept-alive connection a PUT was sent on task-less is closed unanswered:
        the retry, in a task, sends the same body on a new connection."""

        r = await rig(second_hangs_up)
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        head, body = with_body("PUT", "/v1/invoke/billing/b", b"payload")

        app.send(head + body)
        put = await app.answer()

        assert (200, b"/b", 1) == (put.status, put.body, conn_of(put))
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert ["/v1/invoke/billing/b"] == paths.retried
        assert [(0, b"payload"), (1, b"payload")] == [(s.conn, s.body) for s in r.backend.seen[1:]]
        await r.settled()

    async def test_a_body_after_a_request_that_ended_the_connection_is_not_sent(
        self, rig: RigFactory, paths: Paths, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A request fails while starting (a bug) and the app's connection is aborted; a
        small POST that came in the same read is dispatched when its body ends, after
        that: it must not reach the upstream (nobody would get its answer)."""
        r = await rig()
        app = await r.connect()
        await app.get("/v1/invoke/billing/w")
        request_head = Exchange._request_head

        def broken(exchange: Exchange) -> bytes:
            if exchange.req.target.endswith(b"/a"):
                raise RuntimeError("injected")
            return request_head(exchange)

        monkeypatch.setattr(Exchange, "_request_head", broken)
        head, body = with_body("POST", "/v1/invoke/billing/b", b"charge-card")

        app.send(get("/v1/invoke/billing/a") + head + body)
        async with asyncio.timeout(PATIENCE):
            assert b"" == await app.reader.read()  # aborted, nothing answered

        await r.settled()
        assert ["/w"] == [s.target for s in r.backend.seen]
        assert [] == paths.fast

    async def test_a_large_body_queued_whole_takes_the_coroutine_path(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A PUT over the replay limit pipelined behind a slow GET is all buffered by its
        turn; it is still sent from a task, which drops the body once sent."""

        def slow_first(seen: Seen) -> Reply:
            return Reply(delay=0.2) if seen.target == "/slow" else Reply()

        r = await rig(slow_first)
        app = await r.connect()
        await app.get("/v1/invoke/billing/w")
        head, body = with_body("PUT", "/v1/invoke/billing/big", b"y" * (100 * 1024))

        app.send(get("/v1/invoke/billing/slow"))
        await until("the slow request sent", lambda: len(r.backend.seen) == 2)
        app.send(head + body)
        slow, big = await app.answer(), await app.answer()

        assert (200, 200) == (slow.status, big.status)
        assert ["/v1/invoke/billing/slow"] == paths.fast
        assert ["/v1/invoke/billing/w", "/v1/invoke/billing/big"] == paths.tasks
        assert b"y" * (100 * 1024) == r.backend.seen[2].body
        await r.settled()

    async def test_expect_continue_keeps_the_coroutine_path(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """With `Expect: 100-continue` the app waits before sending its body: the request
        is dispatched at its head, as before, and the 100 goes out."""
        r = await rig()
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        head, body = with_body(
            "POST", "/v1/invoke/billing/b", b"later", extra=[("Expect", "100-continue")]
        )

        app.send(head)
        async with asyncio.timeout(PATIENCE):
            interim = await app.reader.readuntil(b"\r\n\r\n")
        app.send(body)
        posted = await app.answer()

        assert interim.startswith(b"HTTP/1.1 100 ")
        assert (200, b"later") == (posted.status, r.backend.seen[1].body)
        assert ["/v1/invoke/billing/a", "/v1/invoke/billing/b"] == paths.tasks
        await r.settled()

    async def test_unknown_upstream_is_404_on_the_coroutine_path(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A name no upstream has is not the fast path's: the task answers NO_ROUTE and
        the connection carries the next request, which is task-less again."""
        r = await rig()
        app = await r.connect()
        await app.get("/v1/invoke/billing/warm")

        missing = await app.get("/v1/invoke/nobody/x")
        after = await app.get("/v1/invoke/billing/after")

        assert 404 == missing.status
        assert "NO_ROUTE" == missing.headers["x-sidecar-error"]
        assert 200 == after.status
        assert ["/v1/invoke/billing/warm", "/v1/invoke/nobody/x"] == paths.tasks
        assert ["/v1/invoke/billing/after"] == paths.fast
        await r.settled()


class _Transport:
    """What the proxy writes to an app connection, kept; reading is not paused for real,
    and writes leave at once."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.eof = False  # half-closed
        self.closed = False
        self.aborted = False
        self.sock: socket.socket | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self.sock
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True


@contextlib.contextmanager
def _app_connection(proxy: Proxy) -> Iterator[tuple[DownstreamProtocol, _Transport]]:
    """An app connection of `proxy` on a `_Transport`; lost when the block ends."""
    down = proxy.protocol(None)
    transport = _Transport()
    down.connection_made(cast(asyncio.Transport, transport))
    try:
        yield down, transport
    finally:
        down.connection_lost(None)


async def test_an_app_connection_keeps_its_state_in_slots(rig: RigFactory) -> None:
    """No instance dict: with more than 30 attributes CPython 3.11 stops sharing a dict's
    keys between instances, and every attribute read on the hot path got slower (5 %
    fewer requests/s in plain Python when the class grew to 32)."""
    r = await rig()
    with _app_connection(r.proxy) as (down, _):
        assert not hasattr(down, "__dict__")
    await r.settled()


class _VersionAsked:
    """An app connection's parser that counts its `get_http_version` and
    `should_upgrade` calls."""

    def __init__(self, parser: httptools.HttpRequestParser) -> None:
        self.parser = parser
        self.asked = 0
        self.upgrade_asked = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)

    def get_http_version(self) -> str:
        self.asked += 1
        return str(self.parser.get_http_version())

    def should_upgrade(self) -> bool:
        self.upgrade_asked += 1
        return bool(self.parser.should_upgrade())


class TestRequestVersion:
    def test_llhttp_keeps_alive_by_default_no_version_it_accepts_but_1_1(self) -> None:
        """What the version shortcut in `on_headers_complete` stands on: llhttp parses
        only HTTP/0.9, 1.0, 1.1 and 2.0, and keeps a request without a Connection field
        alive only for 1.1. An httptools that accepted, say, 1.2 would fail here."""

        class Callbacks:
            def on_headers_complete(self) -> None:
                pass

        for version in (b"0.9", b"1.0", b"1.1", b"2.0"):
            parser = httptools.HttpRequestParser(Callbacks())
            parser.feed_data(b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n")
            assert (version == b"1.1") is parser.should_keep_alive(), version
        for version in (b"1.2", b"1.9", b"2.1", b"3.0", b"9.9"):
            parser = httptools.HttpRequestParser(Callbacks())
            with pytest.raises(httptools.HttpParserError, match="Invalid HTTP version"):
                parser.feed_data(b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n")

    async def test_the_parser_is_asked_the_version_unless_keep_alive_gives_it(
        self, rig: RigFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An HTTP/1.1 request without a Connection field (curl's, Go's, wrk's) is known
        to be 1.1 from llhttp's keep-alive alone: `get_http_version`, which formats a
        new str each time, is not called, and neither is `should_upgrade` (llhttp
        upgrades only a request whose Connection lists `upgrade`). Every other request
        asks for its version, and gets it and its keep-alive right."""
        r = await rig()
        seen: list[tuple[str, bool]] = []
        monkeypatch.setattr(
            DownstreamProtocol,
            "_dispatch",
            lambda _, req: seen.append((req.version, req.keep_alive)),
        )
        # (request, its version and keep-alive, get_http_version calls, should_upgrade calls)
        cases = [
            (b"GET / HTTP/1.1\r\nHost: billing\r\n\r\n", ("1.1", True), 0, 0),
            (b"GET / HTTP/1.1\r\nHost: billing\r\nConnection: close\r\n\r\n", ("1.1", False), 1, 1),
            (
                b"GET / HTTP/1.1\r\nconnection: Keep-Alive\r\nHost: billing\r\n\r\n",
                ("1.1", True),
                1,
                1,
            ),
            (
                b"GET / HTTP/1.0\r\nHost: billing\r\nConnection: keep-alive\r\n\r\n",
                ("1.0", True),
                1,
                1,
            ),
            (b"GET / HTTP/1.0\r\nHost: billing\r\n\r\n", ("1.0", False), 1, 0),
            # llhttp reads Proxy-Connection as Connection: kept alive, yet 1.0.
            (
                b"GET / HTTP/1.0\r\nHost: billing\r\nProxy-Connection: keep-alive\r\n\r\n",
                ("1.0", True),
                1,
                1,
            ),
        ]
        for data, expected, asked, upgrade_asked in cases:
            with _app_connection(r.proxy) as (down, _):
                parser = _VersionAsked(down.parser)
                down.parser = cast(httptools.HttpRequestParser, parser)
                down.data_received(data)
            assert [expected] == seen, data
            assert (asked, upgrade_asked) == (parser.asked, parser.upgrade_asked), data
            seen.clear()
        await r.settled()


class TestPipelinedSelfAnswers:
    async def test_answers_the_sidecar_makes_itself_take_turns_with_other_connections(
        self, rig: RigFactory
    ) -> None:
        """100 pipelined requests the sidecar answers itself (no such upstream) arrive in
        one read: the task answers one per turn of the event loop, so other connections
        are served in between; it used to answer them all in one turn, holding the loop
        (a long pipeline stalled every connection for most of a second)."""
        r = await rig()
        with _app_connection(r.proxy) as (down, transport):
            down.data_received(b"GET /v1/invoke/nobody/x HTTP/1.1\r\nHost: s\r\n\r\n" * 100)
            for _ in range(3):
                await asyncio.sleep(0)
            early = transport.out.count(b"HTTP/1.1 404 ")
            await until("all answered", lambda: transport.out.count(b"HTTP/1.1 404 ") == 100)
        assert 0 < early <= 3
        await r.settled()

    async def test_shutting_down_between_two_pipelined_answers_serves_no_more(
        self, rig: RigFactory
    ) -> None:
        """The shutdown closes connections (`start_closing`) while a task is between two
        pipelined requests it answers itself: it serves no more of them, as behind an
        answer that closes, and the connection ends with a lingering close after the
        answers already made."""
        r = await rig()
        with _app_connection(r.proxy) as (down, transport):
            down.data_received(b"GET /v1/invoke/nobody/x HTTP/1.1\r\nHost: s\r\n\r\n" * 5)
            await asyncio.sleep(0)  # the task's first step: one answer, then a turn
            answered = transport.out.count(b"HTTP/1.1 404 ")
            r.proxy.start_closing()
            await until("its task ended", lambda: down.task is None)
        assert (1, 1) == (answered, transport.out.count(b"HTTP/1.1 404 "))
        assert (True, False) == (transport.eof, down.busy)

    async def test_ending_a_connection_whose_socket_is_already_gone_raises_nothing(
        self, rig: RigFactory
    ) -> None:
        """The stdlib event loop's transport still hands out its socket after it closed,
        with file descriptor -1. Deciding how to close after an answer asks that socket
        whether the app sent more; that raised ValueError, and the request ended as a
        bug (`request_failed_unexpectedly`, the connection aborted)."""
        r = await rig()
        with _app_connection(r.proxy) as (down, transport):
            transport.sock = socket.socket()
            transport.sock.close()
            with structlog.testing.capture_logs() as logs:
                down.data_received(
                    b"GET /v1/invoke/nobody/x HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
                )
                await until("its task ended", lambda: down.task is None)
        assert [] == [e for e in logs if e["log_level"] == "error"]
        assert (True, False) == (transport.eof, transport.aborted)

    async def test_a_lingering_close_closes_when_its_timer_fires_a_little_early(
        self, rig: RigFactory
    ) -> None:
        """uvloop's timers count whole milliseconds, so the lingering close's timer can
        fire just before LINGER has passed by the clock: that is quiet enough (it used to
        wait another LINGER). Input that came since puts the close LINGER after it."""
        r = await rig()
        loop = asyncio.get_running_loop()
        with _app_connection(r.proxy) as (down, transport):
            down._linger()
            assert down.linger_timer is not None
            down.linger_timer.cancel()
            down.last_active = time.monotonic() - 0.4
            down._linger_end()  # input 0.4 s ago: LINGER after it
            assert down.linger_timer is not None
            again_in = down.linger_timer.when() - loop.time()
            down.linger_timer.cancel()
            down.last_active = time.monotonic() - LINGER + 0.001
            down._linger_end()  # fired 1 ms early
        assert (True, True) == (transport.eof, transport.closed)
        assert LINGER - 0.5 < again_in <= LINGER - 0.4 + 0.01

    async def test_a_closed_connection_is_not_kept_by_its_lingering_close(
        self, rig: RigFactory
    ) -> None:
        """An answer with `Connection: close` that the app pipelined more behind ends in
        a lingering close, whose timer would keep the connection's objects for 2 s after
        the app closed: with many short connections, that is memory. The timer goes
        with the connection."""
        r = await rig()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(r.proxy.protocol, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.sockets[0].getsockname()[1]
            )
            # Another request pipelined after the close: the close lingers.
            writer.write(
                b"GET /v1/invoke/nobody/x HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
                b"GET /v1/invoke/nobody/y HTTP/1.1\r\nHost: s\r\n\r\n"
            )
            answer = await asyncio.wait_for(reader.read(), PATIENCE)  # to the sidecar's FIN
            down = weakref.ref(next(iter(r.proxy.connections)))
            writer.close()
            await writer.wait_closed()
            await until("the connection is lost", lambda: not r.proxy.connections)
        finally:
            server.close()
            await server.wait_closed()
        gc.collect()
        assert (True, 1) == (answer.startswith(b"HTTP/1.1 404 "), answer.count(b"HTTP/1.1 "))
        assert down() is None


class TestAdmission:
    async def test_open_circuit_is_answered_on_the_coroutine_path(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A task-less request's 5xx counts against the breaker; once it is open, a
        request is not sent task-less even with a pooled connection at hand: the task
        answers 503 CIRCUIT_OPEN and the connection stays pooled."""
        r = await rig(
            lambda seen: Reply(500) if seen.target == "/b" else Reply(),
            circuit_breaker=BreakerConfig(failure_threshold=1),
        )
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        failed = await app.get("/v1/invoke/billing/b")
        refused = await app.get("/v1/invoke/billing/c")

        assert 500 == failed.status
        assert (503, "CIRCUIT_OPEN") == (refused.status, refused.headers["x-sidecar-error"])
        assert "retry-after" in refused.headers
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert ["/v1/invoke/billing/a", "/v1/invoke/billing/c"] == paths.tasks
        await r.settled()
        assert "open" == r.upstream.breaker.state
        assert 1 == len(r.pool.idle)
        assert ["/a", "/b"] == [s.target for s in r.backend.seen]

    async def test_concurrency_limit_is_answered_on_the_coroutine_path(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """With max_concurrent_requests taken by a task-less request, another request is
        not admitted task-less: the task answers 503 OVERLOADED."""
        r = await rig(
            lambda seen: STALL if seen.target == "/slow" else Reply(), max_concurrent_requests=1
        )
        first = await r.connect()
        await first.get("/v1/invoke/billing/a")
        second = await r.connect()
        await second.get("/v1/invoke/billing/b")  # two connections pooled now
        first.send(get("/v1/invoke/billing/slow"))
        await until("sent upstream", lambda: len(r.backend.seen) == 3)

        refused = await second.get("/v1/invoke/billing/c")

        assert (503, "OVERLOADED") == (refused.status, refused.headers["x-sidecar-error"])
        assert ["/v1/invoke/billing/b", "/v1/invoke/billing/slow"] == paths.fast
        assert "/v1/invoke/billing/c" in paths.tasks
        await first.close()
        await r.settled()


class TestSendFailure:
    async def test_pooled_connection_closing_at_send_is_retried_in_a_task(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """The pooled connection is closing when the request is sent (its close not yet
        seen by the pool): nothing was sent, so it is retried like a connect failure,
        in a task, on a new connection."""
        r = await rig()
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        (conn,) = r.pool.idle
        assert conn.transport is not None
        (down,) = r.downstreams

        conn.transport.close()  # closing now; connection_lost comes on a later loop turn
        down.data_received(get("/v1/invoke/billing/b"))  # as if read from the app's socket
        answer = await app.answer()

        assert (200, b"/b", 1) == (answer.status, answer.body, conn_of(answer))
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert ["/v1/invoke/billing/b"] == paths.resumed
        assert [("/a", 0), ("/b", 1)] == [(s.target, s.conn) for s in r.backend.seen]
        await r.settled()
        assert 1.0 == r.sample("sidecar_retries_total")

    async def test_send_failure_not_retried_is_answered_before_the_parser_returns(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """With retries.max 0 the failed send is answered 502 UPSTREAM_CONNECT_FAILED at
        once, inside the parser callback: nothing is in flight when it returns."""
        r = await rig(retries=RetryConfig(max=0))
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        (conn,) = r.pool.idle
        assert conn.transport is not None
        (down,) = r.downstreams

        conn.transport.close()
        down.data_received(get("/v1/invoke/billing/b"))

        assert dict.fromkeys(r.leaks(), 0) == r.leaks()
        answer = await app.answer()
        assert (502, "UPSTREAM_CONNECT_FAILED") == (
            answer.status,
            answer.headers["x-sidecar-error"],
        )
        assert ["/v1/invoke/billing/b"] == paths.served
        assert [] == paths.resumed
        after = await app.get("/v1/invoke/billing/c")
        assert (200, 1) == (after.status, conn_of(after))


class TestRetriesAfterATaskLessAttempt:
    async def test_pooled_connection_closed_unanswered_is_retried_on_a_new_one(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """The upstream closes the kept-alive connection on the second request without a
        byte: like a connect failure, retried in a task on a new connection; the app
        sees only the retry's 200."""

        r = await rig(second_hangs_up)
        app = await r.connect()
        first = await app.get("/v1/invoke/billing/a")

        second = await app.get("/v1/invoke/billing/b")

        assert (200, 0) == (first.status, conn_of(first))
        assert (200, b"/b", 1) == (second.status, second.body, conn_of(second))
        assert ["/v1/invoke/billing/a"] == paths.tasks
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert ["/v1/invoke/billing/b"] == paths.resumed
        assert ["/v1/invoke/billing/b"] == paths.retried
        assert [] == paths.served  # finished by the task, not from a callback
        assert ["/a", "/b", "/b"] == [s.target for s in r.backend.seen]
        await r.settled()
        assert 1.0 == r.sample("sidecar_retries_total")
        assert 2.0 == r.sample("sidecar_upstream_requests_total", code="200")
        assert 0.0 == r.sample("sidecar_upstream_requests_total", code="502")
        assert [True, True] == paths.verdicts
        (conn,) = r.pool.idle  # the retry's connection; the one that hung up is gone
        assert r.backend.connections[0].closed
        assert not conn.closed

        third = await app.get("/v1/invoke/billing/c")

        assert (200, 1) == (third.status, conn_of(third))
        assert ["/v1/invoke/billing/b", "/v1/invoke/billing/c"] == paths.fast
        await r.settled()

    async def test_retryable_status_is_retried_in_a_task(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A 503 (in retries.on_statuses) to a task-less attempt is discarded before it
        reaches the app; the retry, in a task, answers 200."""

        r = await rig(second_is_503, retries=RetryConfig(on_statuses=frozenset({503})))
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        second = await app.get("/v1/invoke/billing/b")

        assert (200, b"/b") == (second.status, second.body)
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert ["/v1/invoke/billing/b"] == paths.resumed
        assert ["/v1/invoke/billing/b"] == paths.retried
        # The 503's body was left unread: its connection is closed, the retry makes one.
        assert [("/a", 0), ("/b", 0), ("/b", 1)] == [(s.target, s.conn) for s in r.backend.seen]
        assert 1 == conn_of(second)
        await r.settled()
        assert 1.0 == r.sample("sidecar_retries_total")
        assert 2.0 == r.sample("sidecar_upstream_requests_total", code="200")
        assert 0.0 == r.sample("sidecar_upstream_requests_total", code="503")
        assert [True, True] == paths.verdicts

    async def test_status_that_may_not_be_retried_is_relayed_from_the_callback(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """With retries.max 0 the upstream's 503 is the answer: relayed as it was sent
        (no x-sidecar-error) from the response callback, no task; the breaker counts a
        failure and the kept-alive connection goes back to the pool."""

        def second_is_busy(seen: Seen) -> Reply:
            return Reply(503, b'{"busy": true}') if seen.nth == 1 else Reply()

        r = await rig(second_is_busy, retries=RetryConfig(max=0, on_statuses=frozenset({503})))
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        second = await app.get("/v1/invoke/billing/b")

        assert (503, b'{"busy": true}') == (second.status, second.body)
        assert "x-sidecar-error" not in second.headers
        assert "text/plain" == second.headers["content-type"]
        assert ["/v1/invoke/billing/a"] == paths.tasks
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert ["/v1/invoke/billing/b"] == paths.served
        assert [] == paths.resumed
        await r.settled()
        assert 1.0 == r.sample("sidecar_upstream_requests_total", code="503")
        assert 0.0 == r.sample("sidecar_retries_total")
        assert [True, False] == paths.verdicts
        assert 1 == r.upstream.breaker.failure_count
        assert 1 == len(r.pool.idle)

    async def test_retry_budget_spent_relays_the_status(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A retryable status with no retry budget left is relayed from the callback too."""
        r = await rig(
            lambda seen: Reply(503, b"no") if seen.nth == 1 else Reply(),
            retries=RetryConfig(
                on_statuses=frozenset({503}), budget_ratio=0.0, min_retries_per_second=0.0
            ),
        )
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        second = await app.get("/v1/invoke/billing/b")

        assert (503, b"no") == (second.status, second.body)
        assert ["/v1/invoke/billing/b"] == paths.served
        assert [] == paths.resumed
        await r.settled()


class TestTimeouts:
    async def test_per_try_timeout_of_a_task_less_attempt_is_504(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """The upstream never answers the second request on its connection: after
        per_try_timeout the app gets 504 UPSTREAM_TIMEOUT in the error contract, that
        connection is closed, nothing leaks, and the app's connection carries on."""

        r = await rig(second_stalls, per_try_timeout=0.2)
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        began = time.monotonic()
        timed_out = await app.get("/v1/invoke/billing/b")
        took = time.monotonic() - began

        assert 504 == timed_out.status
        assert "UPSTREAM_TIMEOUT" == timed_out.headers["x-sidecar-error"]
        assert "application/json" == timed_out.headers["content-type"]
        error = json.loads(timed_out.body)["error"]
        assert ("UPSTREAM_TIMEOUT", "billing") == (error["code"], error["upstream"])
        assert "per_try_timeout" in error["message"]
        assert 0.2 <= took < 1.5
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert ["/v1/invoke/billing/b"] == paths.served
        assert [] == paths.resumed
        await r.settled()
        await until("the stalled connection closed", lambda: r.backend.connections[0].closed)
        assert [] == r.pool.idle
        assert 1.0 == r.sample("sidecar_upstream_requests_total", code="504")
        assert 1.0 == r.sample("sidecar_proxy_errors_total", error="UPSTREAM_TIMEOUT")
        assert [True, False] == paths.verdicts

        after = await app.get("/v1/invoke/billing/c")

        assert (200, 1) == (after.status, conn_of(after))

    async def test_timeout_retried_when_allowed(self, rig: RigFactory, paths: Paths) -> None:
        """With retries.on_timeout the timed-out task-less attempt is retried in a task."""

        r = await rig(second_stalls, per_try_timeout=0.2, retries=RetryConfig(on_timeout=True))
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        second = await app.get("/v1/invoke/billing/b")

        assert (200, 1) == (second.status, conn_of(second))
        assert ["/v1/invoke/billing/b"] == paths.resumed
        await r.settled()

    async def test_overall_timeout_cuts_a_task_less_response_that_stalls(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """The head came within per_try_timeout, then the body stalled: the deadline
        ticker cuts the response at the overall timeout (the app's connection is
        closed mid-body, the upstream's failure counted) and stops once nothing is
        watched."""

        def second_stalls_mid_body(seen: Seen) -> Reply:
            return Reply(partial=True, body=b"x" * 64) if seen.nth == 1 else Reply()

        r = await rig(second_stalls_mid_body, per_try_timeout=0.1, timeout=0.3)
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        began = time.monotonic()
        app.send(get("/v1/invoke/billing/b"))
        cut = await asyncio.wait_for(app.reader.read(), PATIENCE)
        took = time.monotonic() - began

        head, _, body = cut.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"x" * 32 == body
        assert 0.3 <= took < 1.5
        assert ["/v1/invoke/billing/b"] == paths.fast
        await r.settled()
        assert [True, False] == paths.verdicts
        assert {} == r.proxy.watched
        await until("the ticker stopped", lambda: r.proxy._ticker is None)


class TestAppLeaves:
    async def test_app_closing_while_waiting_releases_everything(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """The app closes its connection while a task-less request waits for the
        upstream: the attempt ends without a verdict, the upstream connection is closed
        (not pooled) and every count is given back."""

        r = await rig(second_stalls)
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        app.send(get("/v1/invoke/billing/b"))
        await until("sent upstream", lambda: len(r.backend.seen) == 2)
        assert 1 == r.upstream.inflight

        await app.close()

        await r.settled()
        await until("the upstream connection closed", lambda: r.backend.connections[0].closed)
        assert [] == r.pool.idle
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert ["/v1/invoke/billing/b"] == paths.served
        assert [] == paths.resumed
        assert [True, None] == paths.verdicts
        assert 0 == r.upstream.breaker.failure_count
        assert not r.proxy.connections

    @pytest.mark.parametrize("others_in_flight", [0, 1], ids=["alone", "held"])
    async def test_an_answer_ended_in_the_pass_that_reads_the_apps_half_close_reaches_it(
        self, rig: RigFactory, paths: Paths, others_in_flight: int
    ) -> None:
        """The upstream's answer and the app's FIN (it half-closed after its request)
        are read in one pass of the loop, the answer first: the answer reaches the app,
        written at once (alone) or held for the end of the pass (another request in
        flight): the loop closes the transport right after `eof_received`, dropping
        later writes. The upstream answers and the app half-closes in one callback, so
        both are ready, in that order, when the loop next polls."""
        rigs: list[Rig] = []
        apps: list[AppConnection] = []

        def answer_then_half_close(seen: Seen) -> Reply:
            if seen.target == "/stall":
                return STALL
            if seen.target != "/last":
                return Reply()
            transport = rigs[0].backend.connections[seen.conn].transport
            assert transport is not None
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n/last")
            apps[0].writer.write_eof()
            return STALL  # answered above

        r = await rig(answer_then_half_close)
        rigs.append(r)
        if others_in_flight:  # on a connection of its own, taken before the pool has one
            (await r.connect()).send(get("/v1/invoke/billing/stall"))
            await until("another request in flight", lambda: r.proxy.active == 1)
        app = await r.connect()
        apps.append(app)
        await app.get("/v1/invoke/billing/warm")
        app.send(get("/v1/invoke/billing/last"))

        answer = await app.answer()
        assert (200, b"/last") == (answer.status, answer.body)
        assert b"" == await asyncio.wait_for(app.reader.read(), PATIENCE)
        assert ["/v1/invoke/billing/last"] == paths.fast


class TestWritesOfARequestAlone:
    """The answer of a request alone in flight has no other write to share a wake-up
    with (Outbox): its end goes to the app at once, before the exchange's bookkeeping.
    With another request in flight, it waits for the end of the loop's pass, to leave
    with that pass's other writes. Request heads wait for the end of the pass in
    both cases."""

    @staticmethod
    def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
        """Whether the head was still held when `start_fast` returned, and the answer
        when the exchange's bookkeeping got to `served`, by request."""
        held: dict[str, list[bool]] = {"head": [], "answer": []}
        start_fast = Exchange.start_fast
        served = DownstreamProtocol.served

        def spy_start_fast(exchange: Exchange) -> bool:
            taken = start_fast(exchange)
            if taken and exchange.conn is not None:
                held["head"].append(bool(exchange.conn.unsent))
            return taken

        def spy_served(down: DownstreamProtocol, req: Request, keep: bool) -> None:
            held["answer"].append(bool(down.unsent))
            served(down, req, keep)

        monkeypatch.setattr(Exchange, "start_fast", spy_start_fast)
        monkeypatch.setattr(DownstreamProtocol, "served", spy_served)
        return held

    @pytest.mark.parametrize(
        ("others_in_flight", "answer_held"), [(0, False), (1, True)], ids=["alone", "held"]
    )
    async def test_the_answer_waits_for_the_end_of_the_pass_only_with_another_in_flight(
        self,
        rig: RigFactory,
        monkeypatch: pytest.MonkeyPatch,
        others_in_flight: int,
        answer_held: bool,
    ) -> None:
        r = await rig(lambda seen: STALL if seen.target == "/stall" else Reply())
        if others_in_flight:  # on a connection of its own, taken before the pool has one
            (await r.connect()).send(get("/v1/invoke/billing/stall"))
            await until("the other request sent", lambda: len(r.backend.seen) == 1)
        app = await r.connect()
        await app.get("/v1/invoke/billing/warm")  # pools a connection: the next is task-less
        held = self.spy(monkeypatch)

        answer = await app.get("/v1/invoke/billing/it")

        assert (200, b"/it") == (answer.status, answer.body)
        assert {"head": [True], "answer": [answer_held]} == held
        assert [] == [d for d in r.downstreams if d.unsent]  # what was held is sent
        assert others_in_flight == r.proxy.active  # the stalled one, if any


class TestUnexpectedErrors:
    """A bug on the task-less path is contained as on the coroutine path: logged, the
    app's connection closed, nothing left counted or taken."""

    @staticmethod
    def fail_for(monkeypatch: pytest.MonkeyPatch, suffix: bytes) -> None:
        request_head = Exchange._request_head

        def broken(self: Exchange) -> bytes:
            if self.req.target.endswith(suffix):
                raise RuntimeError("injected")
            return request_head(self)

        monkeypatch.setattr(Exchange, "_request_head", broken)

    async def test_error_starting_a_task_less_request_closes_the_app_connection(
        self, rig: RigFactory, paths: Paths, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        r = await rig()
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        self.fail_for(monkeypatch, b"/b")

        app.send(get("/v1/invoke/billing/b"))

        assert b"" == await asyncio.wait_for(app.reader.read(), PATIENCE)
        await r.settled()
        assert 1 == len(r.pool.idle)  # the pooled connection was not taken
        assert 1 == len(r.backend.seen)

    async def test_error_starting_a_pipelined_request_closes_after_the_first_answer(
        self, rig: RigFactory, paths: Paths, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        r = await rig(lambda seen: Reply(delay=0.05))
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        self.fail_for(monkeypatch, b"/c")

        app.send(get("/v1/invoke/billing/b") + get("/v1/invoke/billing/c"))

        assert 200 == (await app.answer()).status
        assert b"" == await asyncio.wait_for(app.reader.read(), PATIENCE)
        await r.settled()
        assert not r.backend.connections[0].closed  # the upstream side is untouched
        assert ["/v1/invoke/billing/b"] == paths.served


class TestPipelining:
    async def test_two_pipelined_requests_are_answered_in_order_task_less(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """Two GETs in one write on a warmed connection: the second waits for the first
        to finish, then is sent from that answer's callback on the same upstream
        connection; both answers arrive in order."""
        r = await rig(lambda seen: Reply(delay=0.05) if seen.target == "/p1" else Reply())
        app = await r.connect()
        await app.get("/v1/invoke/billing/warm")

        app.send(get("/v1/invoke/billing/p1") + get("/v1/invoke/billing/p2"))
        first = await app.answer()
        second = await app.answer()

        assert [(200, b"/p1"), (200, b"/p2")] == [
            (first.status, first.body),
            (second.status, second.body),
        ]
        assert [0, 0] == [conn_of(first), conn_of(second)]
        assert ["recv /p1", "send /p1", "recv /p2", "send /p2"] == r.backend.timeline[2:]
        assert ["/v1/invoke/billing/warm"] == paths.tasks
        assert ["/v1/invoke/billing/p1", "/v1/invoke/billing/p2"] == paths.fast
        assert ["/v1/invoke/billing/p1", "/v1/invoke/billing/p2"] == paths.served
        await r.settled()
        assert 1 == len(r.pool.idle)
        assert 3.0 == r.sample("sidecar_upstream_requests_total", code="200")


class _Recorder(SpanExporter):
    """Keeps the spans it is given."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _tracer(ratio: float) -> tuple[Tracer, _Recorder]:
    config = config_from_mapping(
        {
            "service": {"name": "orders", "id": "orders-1"},
            "consul": {"enabled": False},
            "telemetry": {"tracing": {"exporter": "console", "sampler_ratio": ratio}},
        },
        {},
    )
    recorder = _Recorder()
    return Tracer(config, exporter=recorder), recorder


TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
THEIRS = f"00-{TRACE}-{PARENT}-01"
UNSAMPLED = f"00-{TRACE}-{PARENT}-00"


def _spans_by_path(recorder: _Recorder) -> dict[str, list[ReadableSpan]]:
    """The recorded spans by the upstream path they served (their upstream target, with
    the /v1/invoke/billing prefix taken off): each request's SERVER span first, then its
    CLIENT spans in order."""
    spans: dict[str, list[ReadableSpan]] = {}
    for span in sorted(recorder.spans, key=lambda s: (s.kind.name != "SERVER", s.start_time)):
        path = str((span.attributes or {})["url.path"]).removeprefix("/v1/invoke/billing")
        spans.setdefault(path, []).append(span)
    return spans


def _shape(spans: list[ReadableSpan]) -> list[tuple[str, str, list[str], bool]]:
    """What a request's spans must share whichever path served it."""
    return [
        (s.name, s.kind.name, sorted((s.attributes or {}).keys()), s.status.is_ok) for s in spans
    ]


class TestTracing:
    async def test_sampled_request_is_task_less_and_records_its_spans(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """With every trace sampled, a request with a pooled connection at hand is served
        task-less like any other, and records the same SERVER and CLIENT spans as one
        served in a task; the CLIENT span's context is what goes upstream."""
        tracer, recorder = _tracer(1.0)
        r = await rig(tracer=tracer)
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        second = await app.get("/v1/invoke/billing/b?x=1", extra=[("traceparent", THEIRS)])

        assert 200 == second.status
        assert ["/v1/invoke/billing/a"] == paths.tasks
        assert ["/v1/invoke/billing/b?x=1"] == paths.fast
        await r.settled()
        tracer.shutdown(1.0)  # never started: exports what is queued, here
        assert 4 == len(recorder.spans)
        by_path = _spans_by_path(recorder)
        # Task and task-less: the same names, kinds, attributes and status.
        assert _shape(by_path["/a"]) == _shape(by_path["/b"])
        server, client = by_path["/b"]
        assert "GET /v1/invoke/billing/*" == server.name
        assert {
            "http.request.method": "GET",
            "url.path": "/v1/invoke/billing/b",
            "url.scheme": "http",
            "network.protocol.version": "1.1",
            "sidecar.upstream": "billing",
            "http.route": "/v1/invoke/billing/*",
            "http.response.status_code": 200,
        } == dict(server.attributes or {})
        assert server.parent is not None
        assert server.context is not None
        assert (int(TRACE, 16), int(PARENT, 16)) == (server.context.trace_id, server.parent.span_id)
        assert client.parent is not None
        assert client.context is not None
        assert server.context.span_id == client.parent.span_id
        assert "/b" == (client.attributes or {})["url.path"]
        assert 200 == (client.attributes or {})["http.response.status_code"]
        assert "http.request.resend_count" not in (client.attributes or {})
        sent = r.backend.seen[1].headers["traceparent"]
        context = client.context
        assert f"00-{context.trace_id:032x}-{context.span_id:016x}-01" == sent
        assert server.start_time is not None
        assert client.start_time is not None
        assert server.end_time is not None
        assert client.end_time is not None
        assert server.start_time <= client.start_time <= client.end_time <= server.end_time

    async def test_sampled_request_retried_in_a_task_ends_its_spans_there(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A sampled task-less attempt answered 503 (retryable) ends its CLIENT span with
        the 503; the retry, in a task, adds a second CLIENT span (resend_count 1) under
        the same SERVER span, which ends once, with the retry's 200."""

        tracer, recorder = _tracer(1.0)
        r = await rig(
            second_is_503, tracer=tracer, retries=RetryConfig(on_statuses=frozenset({503}))
        )
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        second = await app.get("/v1/invoke/billing/b")

        assert (200, b"/b") == (second.status, second.body)
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert ["/v1/invoke/billing/b"] == paths.resumed
        await r.settled()
        tracer.shutdown(1.0)
        server, first, retry = _spans_by_path(recorder)["/b"]
        assert server.context is not None
        assert server.status.is_ok
        assert 200 == (server.attributes or {})["http.response.status_code"]
        for client in (first, retry):
            assert client.parent is not None
            assert server.context.span_id == client.parent.span_id
        assert 503 == (first.attributes or {})["http.response.status_code"]
        assert "503" == (first.attributes or {})["error.type"]
        assert not first.status.is_ok
        assert 200 == (retry.attributes or {})["http.response.status_code"]
        assert 1 == (retry.attributes or {})["http.request.resend_count"]
        assert retry.status.is_ok
        # Each attempt carried its own CLIENT span's context upstream.
        sent = [s.headers["traceparent"].split("-")[2] for s in r.backend.seen[1:]]
        assert [f"{c.context.span_id:016x}" for c in (first, retry) if c.context] == sent

    async def test_sampled_request_answered_with_an_error_from_the_callback(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A sampled task-less attempt that times out (no retry) is answered 504 from the
        callback: both spans end as errors, and the log line about it carries the
        request's trace and span ids."""

        tracer, recorder = _tracer(1.0)
        r = await rig(
            second_stalls,
            tracer=tracer,
            per_try_timeout=0.05,
            circuit_breaker=BreakerConfig(failure_threshold=1),
        )
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            second = await app.get("/v1/invoke/billing/b")
            after = await app.get("/v1/invoke/billing/c")  # no ids leak to the next one

        assert (504, 503) == (second.status, after.status)
        assert ["/v1/invoke/billing/b"] == paths.fast
        assert [] == paths.resumed
        await r.settled()
        tracer.shutdown(1.0)
        server, client = _spans_by_path(recorder)["/b"]
        assert "UPSTREAM_TIMEOUT" == (server.attributes or {})["error.type"]
        assert 504 == (server.attributes or {})["http.response.status_code"]
        assert not server.status.is_ok
        assert "UPSTREAM_TIMEOUT" == (client.attributes or {})["error.type"]
        assert not client.status.is_ok
        assert client.end_time is not None
        assert server.end_time is not None
        assert client.end_time <= server.end_time
        assert server.context is not None
        context = server.context
        ids = {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
        (opened,) = [e for e in logs if e["event"] == "circuit_state_changed"]
        assert ids == {k: opened.get(k) for k in ids}
        assert all(e.get("span_id") != ids["span_id"] for e in logs if e is not opened), logs

    async def test_ids_of_a_retried_request_stay_off_the_requests_queued_behind_it(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A sampled task-less request retried in a task, with an unsampled request
        pipelined behind it (served in that task): the log line the second one causes
        (its timeout opens the circuit) carries no trace ids, not the first one's."""

        def script(seen: Seen) -> Reply:
            if seen.target == "/b":
                return Reply(503, b"again") if seen.nth == 1 else Reply()
            return STALL if seen.target == "/c" else Reply()

        tracer, _ = _tracer(1.0)
        r = await rig(
            script,
            tracer=tracer,
            per_try_timeout=0.2,
            retries=RetryConfig(on_statuses=frozenset({503}), on_timeout=False),
            circuit_breaker=BreakerConfig(failure_threshold=1),
        )
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")

        with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            app.send(
                get("/v1/invoke/billing/b")
                + get("/v1/invoke/billing/c", extra=[("traceparent", UNSAMPLED)])
            )
            retried, timed_out = await app.answer(), await app.answer()

        assert (200, 504) == (retried.status, timed_out.status)
        assert ["/v1/invoke/billing/b"] == paths.resumed
        (opened,) = [e for e in logs if e["event"] == "circuit_state_changed"]
        assert "trace_id" not in opened, opened
        await r.settled()
        tracer.shutdown(1.0)

    async def test_ids_of_the_request_that_opened_a_connection_stay_off_its_later_use(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """A sampled request connects (the coroutine path); an unsampled one from another
        app connection later reuses that upstream connection task-less and its 500 opens
        the circuit: that log line carries no trace ids (a connection's callbacks run in
        the context it was made in, which must not be the sampled request's)."""
        tracer, _ = _tracer(1.0)
        r = await rig(
            lambda seen: Reply(500) if seen.target == "/c" else Reply(),
            tracer=tracer,
            circuit_breaker=BreakerConfig(failure_threshold=1),
        )
        first, other = await r.connect(), await r.connect()
        assert 200 == (await first.get("/v1/invoke/billing/a")).status

        with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            failed = await other.get("/v1/invoke/billing/c", extra=[("traceparent", UNSAMPLED)])

        assert 500 == failed.status
        assert (["/v1/invoke/billing/a"], ["/v1/invoke/billing/c"]) == (paths.tasks, paths.fast)
        (opened,) = [e for e in logs if e["event"] == "circuit_state_changed"]
        assert "trace_id" not in opened, opened
        await r.settled()
        tracer.shutdown(1.0)

    async def test_unsampled_request_is_task_less_and_carries_its_context(
        self, rig: RigFactory, paths: Paths
    ) -> None:
        """With nothing sampled, requests on a pooled connection go task-less and still
        send a traceparent upstream: a new unsampled one, or the app's own unchanged
        (with its tracestate)."""
        tracer, recorder = _tracer(0.0)
        r = await rig(tracer=tracer)
        app = await r.connect()
        await app.get("/v1/invoke/billing/a")
        theirs = f"00-{TRACE}-{PARENT}-00"

        new = await app.get("/v1/invoke/billing/b")
        carried = await app.get(
            "/v1/invoke/billing/c", extra=[("traceparent", theirs), ("tracestate", "k=v")]
        )

        assert [200, 200] == [new.status, carried.status]
        assert ["/v1/invoke/billing/b", "/v1/invoke/billing/c"] == paths.fast
        assert ["/v1/invoke/billing/a"] == paths.tasks
        made = r.backend.seen[1].headers["traceparent"]
        version, trace_id, span_id, flags = made.split("-")
        assert ("00", 32, 16, "00") == (version, len(trace_id), len(span_id), flags)
        assert 0 not in (int(trace_id, 16), int(span_id, 16))
        assert theirs == r.backend.seen[2].headers["traceparent"]
        assert "k=v" == r.backend.seen[2].headers["tracestate"]
        await r.settled()
        tracer.shutdown(1.0)
        assert [] == recorder.spans
