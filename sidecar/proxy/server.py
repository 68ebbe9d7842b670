"""The app-facing HTTP/1.1 listeners: parse, route, admit, forward, answer.

One `DownstreamProtocol` per app connection parses requests with httptools and
runs one `Exchange` per request. The exchange picks an endpoint, sends the
request, and streams the response back from the upstream connection's callbacks;
its coroutine only wakes when an attempt ends. Retries, per-try and overall
timeouts, the circuit breaker and the concurrency limit are applied here; what
each of them decides lives in `balancer` and `resilience`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import fcntl
import math
import random
import re
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Final, Protocol, cast

import httptools

from sidecar.config import AppConnectionsConfig
from sidecar.errors import ErrorCode, ProxyError
from sidecar.proxy.balancer import EndpointStats
from sidecar.proxy.forward import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_TUNNEL,
    EndpointPool,
    Outbox,
    UpstreamConnection,
)
from sidecar.proxy.headers import (
    UPGRADE_WEBSOCKET,
    Headers,
    absolute_target,
    host_name,
    lowered,
    request_head,
    response_fields,
    route_target,
    scheme_length,
    serialize,
    websocket_upgrade,
)
from sidecar.proxy.resilience import CircuitOpenError, retry_backoff, retryable_request
from sidecar.proxy.tunnel import Tunnel
from sidecar.proxy.upstream import Upstream
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import (
    CLIENT,
    SERVER,
    SpanRecord,
    TraceContext,
    Tracer,
    unbind_log_ids,
)

log = get_logger("sidecar.proxy")

#: A request body up to this size is kept so the request can be retried.
REPLAY_LIMIT: Final = 64 * 1024
#: Body bytes buffered while no upstream is attached before the app is paused.
BUFFER_LIMIT: Final = 256 * 1024
#: How often the deadline ticker checks the attempts of task-less exchanges: their
#: per-try and overall timeouts fire up to this much late (seconds).
TICK: Final = 0.01
#: Before closing after an answer (a 400, `Connection: close`), what the app still sends
#: is read and dropped until it sends nothing for this long once the answer is written,
#: so the close does not reset the connection before the app has read the answer.
LINGER: Final = 2.0
#: ... and no longer than this after the lingering close began, once the answer is
#: written (nginx's lingering_time).
LINGER_MAX: Final = 30.0
#: How early a lingering close's timer may fire and still count as LINGER (seconds).
LINGER_SLACK: Final = 0.01

# Why reading from the app's socket is paused (bit mask).
_PAUSE_UPSTREAM: Final = 1  # the upstream socket's write buffer is full
_PAUSE_BUFFER: Final = 2  # body buffered while connecting is above BUFFER_LIMIT
_PAUSE_QUEUE: Final = 4  # a pipelined request waits behind the current one
_PAUSE_REJECT: Final = 8  # a bad request waits for its 400 behind the ones before it
_PAUSE_UPGRADE: Final = 16  # what follows a WebSocket handshake waits for the upstream's answer

# How one attempt ended.
_DONE: Final = 0  # response fully relayed
_RETRY_STATUS: Final = 1  # retryable status, discarded before anything reached the app
_TIMEOUT: Final = 2  # no response head within the per-try (or overall) timeout
_CONNECT_FAILED: Final = 3  # the connection could not be made
_RESET: Final = 4  # connection closed or broken before the response head
_CUT: Final = 5  # response started but was cut short (upstream died, overall timeout)
_CLIENT_GONE: Final = 6  # the app closed its connection
_UPGRADED: Final = 7  # 101 relayed: the exchange became a tunnel
_APP_STALLED: Final = 8  # the app sent no body bytes for body_timeout
_NO_DESCRIPTOR: Final = 9  # the sidecar had no file descriptor (or buffer memory) to connect with

#: connect() errors that are the sidecar's own shortage, not the endpoint's fault.
_SHORTAGE_ERRNOS: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

_VERSIONS: Final = frozenset(("1.1", "1.0"))
#: The lengths of the request fields `on_headers_complete` reads (content-length,
#: transfer-encoding, expect, host, idempotency-key, traceparent, tracestate,
#: connection, proxy-connection), as bits (`1 << length`): a field of any other length
#: is passed by without lower-casing its name.
_READ_LENGTH_BITS: Final[int] = sum(
    {
        1 << len(n)
        for n in (
            b"content-length",
            b"transfer-encoding",
            b"expect",
            b"host",
            b"idempotency-key",
            b"traceparent",
            b"tracestate",
            b"connection",
            b"proxy-connection",
        )
    }
)
#: The fields llhttp reads a request's keep-alive and upgrade from.
_CONNECTION_FIELDS: Final = frozenset((b"connection", b"proxy-connection"))
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNK_END: Final = b"0\r\n\r\n"
_CRLF: Final = b"\r\n"
#: SO_LINGER on, 0 s: closing the socket sends a reset (see DownstreamProtocol.cut).
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)
#: Methods whose `Max-Forwards` the sidecar honours (RFC 9110 §7.6.2).
_MAX_FORWARDS_METHODS: Final = frozenset((b"TRACE", b"OPTIONS"))
#: What the sidecar answers, as the final recipient, to `OPTIONS` with `Max-Forwards: 0`.
_ALLOW: Final = b"allow: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE\r\n"
#: Fields a reflected TRACE leaves out (RFC 9110 §9.3.8: likely to hold secrets).
_TRACE_HIDDEN: Final = frozenset((b"authorization", b"proxy-authorization", b"cookie"))
#: A static of the compiled build: `time.monotonic()` is an attribute lookup on the module.
_monotonic: Final = time.monotonic
#: A request line as RFC 9112 §3 spells it: method token, target, version.
_REQUEST_LINE: Final = re.compile(
    rb"(?:^|\n)([!#$%&'*+\-.^_`|~0-9A-Za-z]+) [^ \r\n]+ HTTP/\d\.\d\r?\n"
)


def hot_path_build() -> str:
    """ "compiled" when this module runs as the mypyc build (scripts/compile.py), else
    "python"."""
    return "compiled" if __file__.endswith(".so") else "python"


class _Refused(Exception):
    """Raised from a parser callback to refuse a request; the message is the 400's."""


class Request:
    """One parsed request and its body as it arrives."""

    __slots__ = (
        "body",
        "body_done",
        "body_size",
        "chunked",
        "conn",
        "content_length",
        "expect_continue",
        "has_body",
        "headers",
        "host",
        "idempotency_key",
        "keep_alive",
        "method",
        "replayable",
        "route",
        "status",
        "target",
        "trace",
        "traceparent",
        "tracestate",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.headers: Headers = []
        self.host: bytes | None = None  # the first Host field's value
        self.target = b""
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.chunked = False
        self.has_body = False
        self.content_length = b""  # the Content-Length field's value, if any
        self.expect_continue = False
        self.idempotency_key = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_done = False
        self.replayable = True
        self.upgrade = False  # a WebSocket handshake: tunnelled if the upstream answers 101
        self.conn: UpstreamConnection | None = None
        self.traceparent: bytes | None = None  # the app's trace context, if it sent one
        self.tracestate: bytes | None = None
        self.trace: TraceContext | None = None  # set while tracing is on
        self.route = ""  # http.route of a traced request, once routed
        self.status = 0  # the status the app received (relayed or made by the sidecar)


class EventSink(Protocol):
    """What the proxy needs from the event relay (`sidecar.events`): nothing about AMQP."""

    max_event_bytes: int

    async def publish(
        self,
        topic: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        trace: TraceContext | None = None,
    ) -> bytes: ...


class Proxy:
    """The routing table and shared state of every app-facing listener."""

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        metrics: Metrics,
        limits: AppConnectionsConfig | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.limits = limits or AppConnectionsConfig()
        self.max_header_bytes = self.limits.max_header_bytes  # read per socket read
        self.by_name: dict[bytes, Upstream] = {n.encode(): u for n, u in upstreams.items()}
        self.metrics = metrics
        self.connections: set[DownstreamProtocol] = set()
        self.tunnels: set[Tunnel] = set()
        self.active = 0
        self.closing = False
        self.rng = random.Random()
        self._idle_waiter: asyncio.Future[None] | None = None
        self._flush_waiter: asyncio.Future[None] | None = None  # see wait_ended
        self.no_route_errors = metrics.proxy_errors.labels("", ErrorCode.NO_ROUTE.value)
        self._sweeper: asyncio.TimerHandle | None = None
        # Task-less exchanges waiting for their upstream, checked by one ticker (`watch`).
        self.watched: dict[Exchange, None] = {}
        self._ticker: asyncio.TimerHandle | None = None
        # discovery.allow_any_service: finds (or refuses) a name no upstream has; raises
        # ProxyError when it cannot tell. Called only for names not in `by_name`.
        self.lookup: Callable[[str], Awaitable[Upstream | None]] | None = None
        # The event relay behind POST /v1/publish/{topic}; None without an events section.
        self.events: EventSink | None = None
        # Tracing (None when off): a SERVER span per request, a CLIENT span per attempt.
        self.tracer: Tracer | None = None
        self._outbox: Outbox | None = None

    def outbox(self, loop: asyncio.AbstractEventLoop) -> Outbox:
        """The writes held until the end of the loop's pass, of every connection."""
        outbox = self._outbox
        if outbox is None or outbox.loop is not loop:
            outbox = self._outbox = Outbox(loop)
        return outbox

    def protocol(self, fixed: Upstream | None = None) -> DownstreamProtocol:
        return DownstreamProtocol(self, fixed)

    def begin(self) -> None:
        self.active += 1

    def alone(self) -> bool:
        """No request in flight but the caller's, so the end of its answer need not wait
        for the end of the loop's pass: no other answer can go with it (Outbox). An
        open WebSocket tunnel, a publish or a retry's back-off counts as in flight."""
        return self.active < 2

    def end(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle_waiter is not None and not self._idle_waiter.done():
            self._idle_waiter.set_result(None)

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        while self.active:
            self._idle_waiter = asyncio.get_running_loop().create_future()
            await self._idle_waiter

    def watch(self, exchange: Exchange, loop: asyncio.AbstractEventLoop) -> None:
        """Check `exchange.due` every TICK until `exchange` is unwatched.

        One repeating timer for every task-less attempt in flight instead of a timer
        each (a timer costs more than the rest of the exchange's bookkeeping together);
        it stops when nothing is watched.
        """
        self.watched[exchange] = None
        if self._ticker is None:
            self._ticker = loop.call_later(TICK, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        watched = self.watched
        if not watched:
            self._ticker = None
            return
        self._ticker = loop.call_later(TICK, self._tick, loop)  # first: a bug must not stop it
        now = loop.time()
        for exchange in [e for e in watched if e.due <= now]:
            try:
                exchange.on_due(now)
            except Exception:
                log.exception("request_failed_unexpectedly")
                watched.pop(exchange, None)
                exchange.down.abort()

    def start_sweeping(self) -> None:
        """Periodically close idle app connections and tunnels, answer a request head
        that is too slow (400) or a body that stalled (408).

        One timer for all connections instead of one per connection keeps timers off
        the per-request path; a connection lives at most one sweep interval too long.
        """
        limits = self.limits
        interval = min(
            1.0, limits.idle_timeout / 4, limits.header_timeout / 4, limits.body_timeout / 4
        )
        loop = asyncio.get_running_loop()

        def sweep() -> None:
            self._sweeper = loop.call_later(interval, sweep)  # first: a bug must not stop it
            now = _monotonic()
            idle_before = now - limits.idle_timeout
            head_before = now - limits.header_timeout
            body_before = now - limits.body_timeout
            for conn in list(self.connections):
                try:
                    conn.sweep(idle_before, head_before, body_before)
                except Exception:
                    log.exception("connection_sweep_failed")
                    conn.abort()
            for tunnel in list(self.tunnels):
                if tunnel.last_active < idle_before:
                    log.info("tunnel_idle_closed", upstream=tunnel.upstream_name)
                    tunnel.close()

        self._sweeper = loop.call_later(interval, sweep)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def start_closing(self) -> None:
        """Responses from now on close their connection; idle connections close now."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_if_idle()

    def ending(self) -> int:
        """App connections still writing out answers made, or lingering (see
        `DownstreamProtocol._linger`): the last step of a shutdown lets them end."""
        return sum(1 for conn in self.connections if conn.ending())

    async def wait_ended(self) -> None:
        """Return once no app connection is `ending` (see `abort_all`)."""
        for conn in self.connections:
            conn.watch_flush()
        try:
            while self.ending():
                self._flush_waiter = asyncio.get_running_loop().create_future()
                await self._flush_waiter
        finally:
            self._flush_waiter = None

    def flushed(self) -> None:
        """A connection was written out or ended: `wait_ended` looks again."""
        waiter = self._flush_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort_all(self) -> None:
        """The end of a shutdown: requests still in flight are cut; a connection whose
        answers are all written is closed, not reset, so the app still reads what the
        kernel holds for it."""
        self.stop_sweeping()
        for conn in list(self.connections):
            conn.finish()
        for tunnel in list(self.tunnels):
            tunnel.abort()
        for upstream in set(self.by_name.values()):  # on-demand upstreams too
            upstream.close_pools()


class DownstreamProtocol(asyncio.Protocol):
    """One connection from the app: parses requests and serves them in order."""

    # Slots, not a dict: past 30 attributes CPython 3.11 stops sharing an instance
    # dict's keys, and every attribute read on the hot path takes the slow lookup.
    __slots__ = (
        "__weakref__",
        "between",
        "body_last",
        "body_waiter",
        "busy",
        "chunks",
        "chunks_to",
        "client_ip",
        "closed",
        "deferred",
        "dispatched",
        "exchange",
        "fixed",
        "head_bytes",
        "head_started",
        "held",
        "in_head",
        "last_active",
        "linger_since",
        "linger_timer",
        "lingering",
        "loop",
        "outbox",
        "parser",
        "paused",
        "proxy",
        "queue",
        "rejected",
        "req",
        "task",
        "trailing",
        "transport",
        "unsent",
        "write_paused",
        "write_wait",
    )

    def __init__(self, proxy: Proxy, fixed: Upstream | None) -> None:
        self.proxy = proxy
        self.fixed = fixed
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b"127.0.0.1"
        self.req: Request | None = None  # the request being parsed
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None  # serving on the coroutine path
        # A request is being served (by `task`, or task-less by `exchange`) and later
        # ones queue behind it.
        self.busy = False
        self.exchange: Exchange | None = None
        self.body_waiter: asyncio.Future[None] | None = None  # a publish reading its body
        self.paused = 0
        self.closed = False
        self.last_active = _monotonic()  # when the connection last became idle
        self.in_head = True  # parsing a request head (or waiting for the next one)
        self.head_bytes = 0  # bytes received since that head began (or trailers, below)
        # After a chunk header and before its data: what comes may be the trailer
        # section, bounded like a head (llhttp buffers a field's value whole).
        self.trailing = False
        # A chunked body's chunks parsed in this read, re-framed for `chunks_to`: sent
        # in one write when the read is parsed (a write per chunk let one app sending
        # 1-byte chunks make tens of thousands of system calls per read).
        self.chunks: list[bytes] = []
        self.chunks_to: UpstreamConnection | None = None
        self.head_started = 0.0  # when a request head began; 0.0 while none is pending
        self.dispatched = False  # the request being parsed is served or queued
        # Its small body is being read, within this read: dispatched at its end.
        self.deferred: Request | None = None
        self.rejected: ProxyError | None = None  # a bad request's answer, owed after earlier ones
        self.lingering = False  # answered, then closing: input is dropped until the close
        self.linger_since = 0.0  # when the lingering close began
        self.linger_timer: asyncio.TimerHandle | None = None
        self.write_paused = False  # the app's transport is over its write high mark
        # Answers wait for the app to read: the next queued request is served once the
        # app's transport is writable again (resume_writing). `busy` stays set.
        self.write_wait = False
        self.between = False  # its task is between two pipelined requests (see _serve)
        self.body_last = 0.0  # when the app last sent body bytes (or reading last resumed)
        self.held = b""  # what the app sent after a WebSocket handshake, until the answer
        # The loop, once per connection: asyncio.get_running_loop() costs a getpid()
        # system call on CPython 3.11, twice per request on the hot path otherwise.
        self.loop = loop = asyncio.get_running_loop()
        self.outbox = proxy.outbox(loop)
        self.unsent: list[bytes] = []  # written at the end of the loop's pass (see Outbox)

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        self.proxy.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.last_active = _monotonic()  # see _linger_end
            return
        if self.in_head or self.trailing:
            self.head_bytes += len(data)
        try:
            try:
                self.parser.feed_data(data)
            finally:
                if self.chunks_to is not None:
                    self._send_chunks()
        except httptools.HttpParserUpgrade as upgrade:
            req = self.req
            if req is None or req.method == b"CONNECT":
                self._reject(_bad_request("CONNECT tunnels are not supported"))
            else:
                # Unless it is a WebSocket handshake the upgrade is ignored (RFC 9110 §7.8
                # lets a server do so): Upgrade and Connection were stripped, the request
                # goes on as plain HTTP/1.1, and what follows is its body, if any, then
                # the next request. After a handshake, what follows waits: it is the
                # tunnel's if the upstream answers 101, the next request otherwise
                # (`_end_upgrade`).
                self.parser = httptools.HttpRequestParser(self)
                self.in_head = True
                self.head_bytes = 0
                rest = data[upgrade.args[0] :]
                if req.upgrade:
                    self.held = rest
                    self._pause(_PAUSE_UPGRADE)
                else:
                    if req.has_body:
                        self._body_after_upgrade(req)
                    if rest:
                        self.data_received(rest)
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._reject(_bad_request(str(refused)))
            elif isinstance(exc, httptools.HttpParserInvalidMethodError):
                self._reject(_unknown_method(data))
            else:
                self._reject(_bad_request(f"malformed HTTP request: {exc}"))
            return
        deferred = self.deferred
        if deferred is not None:  # its body did not all come with its head: stream it
            self.deferred = None
            self._dispatch(deferred)
        # Counted per read, so it also bounds a single endless header httptools would
        # otherwise buffer whole; bytes after the end of the head reset the count.
        if (self.in_head or self.trailing) and self.head_bytes > self.proxy.max_header_bytes:
            self._reject(_bad_request(self._head_too_large()))

    def eof_received(self) -> bool:
        """The app closed its sending side. That is how an HTTP client that gave up (its
        own timeout) looks, so it counts as the app leaving: the connection closes and
        any attempt in flight is cancelled. A half-close after the requests (`nc`
        without `-q`) is not supported, as in nginx's and Envoy's defaults.

        An answer held for the end of this pass (see Outbox) goes to the transport
        first: the loop closes it next, and it would drop anything written later."""
        self.send_unsent()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.unsent = []
        self.proxy.connections.discard(self)
        if self.linger_timer is not None:  # it would keep this connection for LINGER
            self.linger_timer.cancel()
            self.linger_timer = None
        self.proxy.flushed()
        if self.exchange is not None:
            self.exchange.client_gone()
        elif self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        # Remembered: asyncio does not call this again for the next exchange while the
        # buffer stays full, so that exchange pauses its upstream itself, once the
        # response head is in (Exchange.on_response_head).
        self.write_paused = True
        ex = self.exchange
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.proxy.flushed()
        if self.lingering:  # the answer is written (see _linger)
            self._linger_arm()
            return
        ex = self.exchange
        if ex is not None and ex.conn is not None:
            ex.conn.resume_reading()
        if self.write_wait and not self.closed:
            self.write_wait = False
            after = self._next()
            if after is None:
                self._idle()
            else:
                self._dispatch(after)

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.req = Request()
        self.dispatched = False
        # The first byte of a head (llhttp skips blank lines between messages), also
        # when it came in the same read as the end of the previous request.
        self.head_started = _monotonic()

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.req is not None
        if self.in_head:  # else a trailer field: dropped, never merged (RFC 9110 §6.5.1)
            self.req.headers.append((name, value))

    def on_chunk_header(self) -> None:
        self.trailing = True

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        self.in_head = False
        self.head_bytes = 0
        self.head_started = 0.0
        parser = self.parser
        req.method = parser.get_method()
        if req.method == b"CONNECT":
            return  # feed_data raises HttpParserUpgrade next; _reject answers 400
        req.keep_alive = keep_alive = parser.should_keep_alive()
        size = len(req.target)
        # A Connection field was sent, or a Proxy-Connection one: llhttp reads both alike
        # (keep-alive, close, upgrade).
        connection = False
        expect: bytes | None = None
        refused: str | None = None  # the first field refused: raised after the version's check
        for name, value in req.headers:
            size += len(name) + len(value)
            if not (_READ_LENGTH_BITS >> len(name)) & 1:
                continue  # none of the fields read below (most fields)
            lname = lowered(name)
            if lname == b"content-length":
                req.content_length = length = value.strip()
                req.has_body = length != b"0"
            elif lname == b"transfer-encoding":
                # Only plain chunked can be relayed: the body is re-chunked on the way
                # out, so any other coding (gzip, ...) would reach the upstream unnamed.
                if (req.chunked or value.strip().lower() != b"chunked") and refused is None:
                    shown = value.decode("latin-1")
                    refused = (
                        f"Transfer-Encoding {shown!r} is not supported: only a single 'chunked'"
                    )
                req.chunked = req.has_body = True
            elif lname in _CONNECTION_FIELDS:
                connection = True
            elif lname == b"expect":
                expect = value
            elif lname == b"host":
                if req.host is not None and refused is None:  # RFC 9112 §3.2: 400, whichever
                    refused = "a request must have one Host field, not several"
                req.host = value
            elif lname == b"idempotency-key":
                req.idempotency_key = True
            elif lname == b"traceparent":
                # Two of them make the context invalid (W3C): a new trace starts.
                req.traceparent = value if req.traceparent is None else b"-"
            elif lname == b"tracestate":
                # Several fields combine into one list (W3C Trace Context §3.3.1.1).
                req.tracestate = value if req.tracestate is None else req.tracestate + b"," + value
        if keep_alive and not connection:
            # Of the versions llhttp accepts (0.9, 1.0, 1.1 and 2.0; any other is a parse
            # error), it keeps a request without a Connection (or Proxy-Connection) field
            # alive only for 1.1: the common case skips get_http_version, which formats
            # a new str each time.
            req.version = "1.1"
        else:
            req.version = version = parser.get_http_version()
            if version not in _VERSIONS:
                raise _Refused(f"HTTP/{version} is not supported: only HTTP/1.1 and HTTP/1.0")
        if refused is not None:
            raise _Refused(refused)
        if expect is not None:
            # RFC 9110 §10.1.1: ignored in an HTTP/1.0 request.
            req.expect_continue = expect.strip().lower() == b"100-continue" and req.version == "1.1"
        if size > self.proxy.max_header_bytes:
            raise _Refused(self._head_too_large())
        # llhttp upgrades a request (other than CONNECT) only when its Connection (or
        # Proxy-Connection) field lists `upgrade`: without one, it need not be asked.
        upgrade = connection and parser.should_upgrade()
        if upgrade:
            req.upgrade = (
                not req.has_body and req.version == "1.1" and websocket_upgrade(req.headers)
            )
        if not req.has_body:
            req.body_done = True
        else:
            self.body_last = _monotonic()
        self.dispatched = True
        if self.busy or self.write_paused:
            self.queue.append(req)
            self._pause(_PAUSE_QUEUE)
            if not self.busy:  # the app is not reading earlier answers: see _next
                self.busy = self.write_wait = True
        elif req.body_done or upgrade or not _small_body(req):
            self._dispatch(req)
        else:
            # A small body usually comes in the same read as its head: the request is
            # dispatched at its end (on_message_complete), whole, so it can go task-less;
            # if the read ends first, it is dispatched then (data_received) and its body
            # streams as before. Either way before anything else runs.
            self.busy = True
            self.deferred = req

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        if self.trailing:
            self.trailing = False
            self.head_bytes = 0
        self.body_last = _monotonic()
        req.body_size += len(body)
        conn = req.conn
        if conn is not None:
            if req.chunked:
                if self.chunks_to is not conn:
                    if self.chunks_to is not None:
                        self._send_chunks()
                    self.chunks_to = conn
                self.chunks += (b"%x\r\n" % len(body), body, _CRLF)
            else:
                conn.write(body)
            if req.replayable:
                if req.body_size <= REPLAY_LIMIT:
                    req.body.append(body)
                else:
                    req.replayable = False
                    req.body = []
            return
        req.body.append(body)
        if req.body_size > REPLAY_LIMIT:
            req.replayable = False
        if req.body_size > BUFFER_LIMIT:
            self._pause(_PAUSE_BUFFER)
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _send_chunks(self) -> None:
        conn, chunks = self.chunks_to, self.chunks
        assert conn is not None
        self.chunks_to = None
        self.chunks = []
        conn.write(b"".join(chunks))

    def _body_after_upgrade(self, req: Request) -> None:
        """Parse the body of an upgrade request whose upgrade is ignored (`Upgrade: h2c`
        on a POST). llhttp ended the message at its head, taking the body for the new
        protocol, so a fresh parser is primed with a head of the same framing that
        `_BodyAfterUpgrade` keeps from the connection; the body and everything after
        it are parsed as usual."""
        req.body_done = False  # llhttp's message end at the head said otherwise
        self.in_head = False
        if req.chunked:
            framing = b"Transfer-Encoding: chunked"
        else:
            length = next(v for n, v in req.headers if n.lower() == b"content-length")
            framing = b"Content-Length: %s" % length.strip()
        self.parser = httptools.HttpRequestParser(_BodyAfterUpgrade(self))
        self.parser.feed_data(b"POST / HTTP/1.1\r\n%s\r\n\r\n" % framing)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        req.body_done = True
        self.in_head = True
        self.trailing = False
        self.head_bytes = 0
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if req.conn is not None and req.chunked:
            if self.chunks_to is not None:
                self._send_chunks()
            req.conn.write(_CHUNK_END)
        ex = self.exchange
        if req.has_body and ex is not None and ex.req is req:
            ex.on_body_done()
        if self.deferred is req:
            self.deferred = None
            self._dispatch(req)

    # -- serving ---------------------------------------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        """Serve `req`, the next in order: task-less when `_fast` can, else in a task.

        Not once the connection is ending (an earlier request in the same read was
        answered with a close, or failed): nobody would read the answer, and a request
        sent anyway might change something upstream.
        """
        transport = self.transport
        if self.closed or self.lingering or transport is None or transport.is_closing():
            self._idle()
            return
        self.busy = True
        try:
            fast = self._fast(req)
        except Exception:  # a bug must not take down other connections (as in _serve)
            log.exception("request_failed_unexpectedly")
            self.abort()
            if self.exchange is None:  # else its end (client_gone) finishes the count
                self._idle()
            return
        if not fast:
            self.task = self.loop.create_task(self._serve(req), context=contextvars.Context())

    def _fast(self, req: Request) -> bool:
        """Start the common case without a task: a complete request (no body, or a whole
        small Content-Length body, see on_headers_complete), routed to a configured
        upstream whose circuit is closed and which has an idle pooled connection. The
        request is sent from here (a parser callback) and finished from the upstream's
        response callbacks (`Exchange.fast_ended`). A sampled request goes task-less
        too: its spans are recorded from the same callbacks.

        False, having changed nothing that `_serve` would redo, when anything else
        applies: connecting, publishing, Max-Forwards, absolute-form targets, WebSocket
        handshakes, bodies still arriving or chunked, an on-demand lookup, an error
        answer.
        """
        if not req.body_done or req.chunked or req.upgrade or req.method in _MAX_FORWARDS_METHODS:
            return False
        if req.has_body and not req.replayable:
            return False  # a large body queued whole: sent, then dropped, by _one_attempt
        target = req.target
        if target[:1] != b"/":
            return False
        proxy = self.proxy
        upstream = self.fixed
        if upstream is None:
            if target[:12] == b"/v1/publish/":
                return False
            name, target = self._route_name(req)
            upstream = proxy.by_name.get(name)
            if upstream is None:
                return False
        tracer = proxy.tracer
        if tracer is not None:
            # Begun once: `_serve` goes on with this context if the request ends up there.
            req.trace = tracer.begin(req.traceparent, req.tracestate)
        return Exchange(self, req, upstream, target).start_fast()

    def served(self, req: Request, keep: bool) -> None:
        """A task-less exchange finished `req`: on to the next request, or idle."""
        self.proxy.end()
        after = self._after(req, keep)
        if after is None:
            self._idle()
        else:
            self._dispatch(after)

    def _after(self, req: Request, keep: bool) -> Request | None:
        """`req` was answered: close when the connection can't carry another (see
        `_may_send_more`); else `_next`."""
        if not keep or self.closed or self.proxy.closing:
            # Shutting down: also after an answer whose head said keep-alive, since it
            # went out before the shutdown began; the app may send its next request.
            if self._may_send_more(req):
                self._linger()
            else:
                self.close()
            return None
        return self._next()

    def _may_send_more(self, req: Request) -> bool:
        """Whether the app may still send after `req`'s answer, so that a plain close
        could reset the connection before it reads the answer (nginx's heuristic for
        its lingering close): the sidecar chose to close, not the app (shutting down,
        an HTTP/1.0 answer without a length), the app is still sending the body, it
        pipelined more, or bytes wait unread in the socket. An app that asked to
        close sends nothing more (RFC 9112 §9.6), and gets a plain close."""
        if self.closed:
            return False
        if req.keep_alive or not req.body_done or self.queue or self.paused or self.req is not req:
            return True
        transport = self.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):  # ValueError: asyncio's socket of a closed transport
            return True
        return unread != b"\0\0\0\0"

    def _next(self) -> Request | None:
        """The next queued request, if any, unless the app is not reading its answers:
        then it waits (`write_wait`) until it does, so answers do not pile up in memory;
        else answer a bad request owed behind the last one."""
        if self.queue:
            if self.write_paused:
                self.write_wait = True
                self.last_active = _monotonic()  # see sweep
                return None
            after = self.queue.popleft()
            if not self.queue:
                self._resume(_PAUSE_QUEUE)
            return after
        if self.rejected is not None:
            self._answer_rejected(self.rejected)
        return None

    @staticmethod
    def _route_name(req: Request) -> tuple[bytes, bytes]:
        """The upstream name `req` is routed to (from its target, else its Host; `b""`
        when neither names one) and the target to forward."""
        name, target = route_target(req.target)
        if name is None:
            return (b"" if req.host is None else host_name(req.host)), target
        return name, target

    def _idle(self) -> None:
        self.busy = self.write_wait  # else still busy: resume_writing serves the next one
        self.last_active = _monotonic()

    def resume_in_task(self, exchange: Exchange) -> None:
        """A task-less exchange's first attempt failed and may be retried: the retry
        loop (back-off, further attempts) and the requests queued after it go on in a
        task, exactly as if the exchange had started there."""
        self.task = self.loop.create_task(
            self._serve(exchange.req, exchange), context=contextvars.Context()
        )

    async def _serve(self, req: Request | None, resumed: Exchange | None = None) -> None:
        proxy = self.proxy
        try:
            # A resumed exchange is finished even if the app left meanwhile: it holds
            # the in-flight counts, and its retry loop sees the app gone.
            while req is not None and (resumed is not None or not self.closed):
                if resumed is None:
                    proxy.begin()
                try:
                    tracer = proxy.tracer
                    if resumed is not None:
                        trace = req.trace
                        if tracer is None or trace is None or trace.span is None:
                            keep = await resumed.retry()
                        else:  # its SERVER span was begun task-less
                            keep = await self._handle_traced(req, tracer, trace, resumed)
                        resumed = None
                    elif tracer is None:
                        keep = await self._handle(req)
                    else:
                        # The context always goes on; only a sampled request costs more.
                        trace = req.trace
                        if trace is None:
                            trace = req.trace = tracer.begin(req.traceparent, req.tracestate)
                        if trace.span is None:
                            keep = await self._handle(req)
                        else:
                            keep = await self._handle_traced(req, tracer, trace)
                finally:
                    proxy.end()
                if req.upgrade and keep and not self.closed:
                    self._end_upgrade()
                req = self._after(req, keep)
                if req is not None:
                    # Pipelined: let other connections run between answers (a long
                    # pipeline of answers the sidecar makes itself would hold the loop).
                    self.between = True
                    try:
                        await asyncio.sleep(0)
                    finally:
                        self.between = False
                    if self.lingering:  # shutting down meanwhile (close_if_idle)
                        req = None
        except asyncio.CancelledError:
            self.abort()
        except Exception:  # a bug must not take down other connections
            log.exception("request_failed_unexpectedly")
            self.abort()
        finally:
            self.task = None
            self._idle()

    async def _handle_traced(
        self,
        req: Request,
        tracer: Tracer,
        trace: TraceContext,
        resumed: Exchange | None = None,
    ) -> bool:
        """`_handle` for a sampled request: its SERVER span, and its ids on every log line
        written meanwhile. `resumed`: a task-less exchange whose first attempt may be
        retried, its SERVER span begun already."""
        if resumed is None:
            server_span_begin(req, trace)
        tokens = trace.bind_log_ids()
        error: str | None = None
        try:
            return await (self._handle(req) if resumed is None else resumed.retry())
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            unbind_log_ids(tokens)
            server_span_end(req, tracer, trace, error)

    async def _handle(self, req: Request) -> bool:
        """Serve one request; return whether the connection may carry another."""
        if req.target[:12] == b"/v1/publish/" and self.fixed is None:
            return await self._publish(req)
        if req.method in _MAX_FORWARDS_METHODS:
            answered = self._max_forwards(req)
            if answered is not None:
                return answered
        upstream = self.fixed
        target = req.target
        if upstream is None:
            name, target = self._route_name(req)
            upstream = self.proxy.by_name.get(name)
            if upstream is None and self.proxy.lookup is not None and name:
                try:
                    upstream = await self.proxy.lookup(name.decode("latin-1"))
                except ProxyError as exc:
                    return self.send_error(req, exc)
            if upstream is None:
                self.proxy.no_route_errors.inc()
                shown = name.decode("latin-1") if name else None
                if shown is None:
                    message = "no upstream named in the path (/v1/invoke/<upstream>/...) or Host"
                else:
                    message = f"no upstream named {shown!r} is configured" + (
                        " and Consul knows no such service" if self.proxy.lookup else ""
                    )
                return self.send_error(req, ProxyError(ErrorCode.NO_ROUTE, message, shown))
        host = None
        if req.target[:1] != b"/" and scheme_length(req.target):
            # Absolute-form (HTTP_PROXY clients): the target's authority is the Host the
            # upstream gets, whatever Host the app sent (RFC 9112 §3.2.2).
            host, target = absolute_target(req.target)
            if not target:
                target = b"*" if req.method == b"OPTIONS" else b"/"
        trace = req.trace
        if trace is not None and trace.span is not None:
            server_span_route(req, trace.span, upstream)
        return await Exchange(self, req, upstream, target, host).run()

    async def _publish(self, req: Request) -> bool:
        """POST /v1/publish/{topic}: hand the event to the relay; 202 once it is durable."""
        events = self.proxy.events
        if events is None:
            return self.send_error(
                req,
                ProxyError(
                    ErrorCode.NO_ROUTE,
                    "event publishing is not configured: add an events section (or set "
                    "SIDECAR_AMQP_URL)",
                ),
            )
        topic = req.target[12:].split(b"?", 1)[0].decode("latin-1")
        req.route = "/v1/publish/{topic}"
        if req.method != b"POST":
            shown = req.method.decode("latin-1")
            err = ProxyError(ErrorCode.BAD_REQUEST, f"{shown} /v1/publish/{{topic}}: use POST")
            return self.send_error(req, err)
        limit = events.max_event_bytes
        for name, value in req.headers:
            length = value.strip()
            if name.lower() == b"content-length" and length.isdigit() and int(length) > limit:
                return self.send_error(req, _too_large(int(value), limit))
        try:
            body = await self._read_body(req, limit)
        except TimeoutError:
            stalled = f"no request-body bytes for {self.proxy.limits.body_timeout:g}s"
            return self.send_error(req, ProxyError(ErrorCode.REQUEST_TIMEOUT, stalled))
        if body is None:
            return self.send_error(req, _too_large(None, limit))
        try:
            answer = await events.publish(topic, req.headers, body, req.trace)
        except ProxyError as exc:
            return self.send_error(req, exc)
        return self.send_response(req, 202, b"content-type: application/json\r\n", answer)

    async def _read_body(self, req: Request, limit: int) -> bytes | None:
        """The whole request body, or None as soon as it passes `limit` (read no further)."""
        if req.expect_continue and not req.body_done:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        timeout = self.proxy.limits.body_timeout
        while not req.body_done:
            if req.body_size > limit:
                return None
            self._resume(_PAUSE_BUFFER)  # the body is ours to take, not an upstream's
            waiter = self.body_waiter = self.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            finally:
                self.body_waiter = None
        if req.body_size > limit:
            return None
        body = b"".join(req.body)
        req.body = []
        return body

    def _max_forwards(self, req: Request) -> bool | None:
        """Apply `Max-Forwards` to a TRACE or OPTIONS (RFC 9110 §7.6.2): at 0 answer as
        the final recipient and return keep-alive; otherwise count it down and return
        None (forward)."""
        headers = req.headers
        for i, (name, value) in enumerate(headers):
            if name.lower() != b"max-forwards":
                continue
            hops = value.strip()
            if not hops.isdigit():
                shown = value.decode("latin-1")
                return self._answer_bad(req, f"Max-Forwards {shown!r} is not a number of hops")
            if int(hops) > 0:
                headers[i] = (name, b"%d" % (int(hops) - 1))
                return None
            if req.method == b"OPTIONS":
                return self.send_response(req, 200, _ALLOW, b"")
            reflected = [(n, v) for n, v in headers if n.lower() not in _TRACE_HIDDEN]
            message = b"TRACE %s HTTP/%s\r\n%s\r\n" % (
                req.target,
                req.version.encode(),
                serialize(reflected),
            )
            return self.send_response(req, 200, b"content-type: message/http\r\n", message)
        return None

    def _answer_bad(self, req: Request, message: str) -> bool:
        err = _bad_request(message)
        self.proxy.metrics.proxy_errors.labels("", err.code.value).inc()
        return self.send_error(req, err)

    def _end_upgrade(self) -> None:
        """The upstream did not switch protocols: what the app sent after its handshake
        is read as the next request."""
        held, self.held = self.held, b""
        self._resume(_PAUSE_UPGRADE)
        if held:
            self.data_received(held)

    # -- writing to the app ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write now, after anything held."""
        transport = self.transport
        if transport is not None and not self.closed:
            if self.unsent:
                self.send_unsent()
            transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        """Write now, after anything held."""
        transport = self.transport
        if transport is not None and not self.closed:
            if self.unsent:
                self.send_unsent()
            transport.writelines(data)

    def hold(self, data: list[bytes]) -> None:
        """Write `data` (taken, not copied) at the end of the loop's pass (see Outbox):
        the end of an answer, bounded by one read of the upstream."""
        if self.transport is not None and not self.closed:
            unsent = self.unsent
            if unsent:
                unsent += data
            else:
                self.unsent = data
                self.outbox.add(self)

    def send_unsent(self) -> None:
        unsent = self.unsent
        if unsent:
            self.unsent = []
            transport = self.transport
            if transport is not None and not self.closed:
                transport.writelines(unsent)
                self.proxy.flushed()  # a shutdown's wait_ended may wait for this

    def send_error(self, req: Request, err: ProxyError) -> bool:
        """Answer with the JSON error contract; return whether to keep the connection."""
        trace = req.trace
        if trace is not None and trace.span is not None:
            trace.span.attributes["error.type"] = err.code.value
        headers = b"content-type: application/json\r\nx-sidecar-error: %s\r\n%s" % (
            err.code.value.encode(),
            b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in err.headers),
        )
        return self.send_response(req, err.code.status, headers, err.body())

    def send_response(self, req: Request, status: int, headers: bytes, body: bytes) -> bool:
        """A response the sidecar makes itself (error or fallback); return keep-alive."""
        keep = self.may_keep(req)
        req.status = status
        self.write(
            b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%s%s\r\n%s"
            % (
                status,
                _REASONS.get(status, b"Unknown"),
                len(body),
                headers,
                _connection_field(req, keep),
                body,
            )
        )
        return keep

    def may_keep(self, req: Request) -> bool:
        """Whether the connection may carry another request after answering `req`.

        Not when the app asked to close, nor when shutting down, nor when the answer
        comes before the app finished sending its body: the rest of that body can't be
        told apart from the next request.
        """
        return req.keep_alive and req.body_done and not self.proxy.closing

    # -- connection state ------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            # A stalled body is measured only while the sidecar reads: a pause is its own.
            self.body_last = _monotonic()

    def _reject(self, err: ProxyError) -> None:
        """Refuse a request we cannot parse (or that is too big), then close: the stream
        is unusable after it.

        Responses go out in request order, so while earlier requests on this connection
        are served, the 400 waits for them and reading stops. A malformed body of a
        request already being served cuts that request instead: nothing can answer it.
        """
        if self.lingering:
            return  # already refused once
        req = self.req
        if self.dispatched and req is not None and not req.body_done:
            if req not in self.queue:
                self.close()  # its body is being forwarded: nothing can answer it now
                return
            self.queue.remove(req)  # queued, never sent anywhere: it gets the 400
        if not self.busy:
            self._answer_rejected(err)
        elif self.rejected is None:
            self.rejected = err
            self._pause(_PAUSE_REJECT)

    def _head_too_large(self) -> str:
        return f"request head larger than max_header_bytes ({self.proxy.max_header_bytes} bytes)"

    def _answer_rejected(self, err: ProxyError) -> None:
        req = Request()
        req.keep_alive = False
        self.proxy.metrics.proxy_errors.labels("", err.code.value).inc()
        self.send_error(req, err)
        self._linger()

    def _linger(self) -> None:
        """Close after an answer without losing it (a lingering close, as nginx does).

        Closing with unread input, or input arriving after the close, makes the kernel
        send a reset, which can destroy the answer before the app reads it. So: finish
        writing and half-close (the app sees the end of the answer), read and drop
        input, and close once the app closes, or sends nothing for LINGER after the
        answer is written (LINGER_MAX at most). An app that does not read the answer
        is cut by the sweep after idle_timeout, as an idle connection is.
        """
        transport = self.transport
        if transport is None or self.closed or self.lingering:
            return
        self.lingering = True
        self.linger_since = _monotonic()  # last_active: from the answer's end (_linger_arm)
        if self.paused:
            self.paused = 0
            transport.resume_reading()
        self.send_unsent()
        if transport.can_write_eof():
            transport.write_eof()
        if self.unflushed():
            self.watch_flush()  # resume_writing arms it
        else:
            self._linger_arm()

    def _linger_arm(self) -> None:
        """The answer is written: LINGER without input from now on closes."""
        self.last_active = _monotonic()
        self.linger_timer = self.loop.call_later(LINGER, self._linger_end)

    def _linger_end(self) -> None:
        now = _monotonic()
        # uvloop's timers count whole milliseconds: one may fire a little early.
        left = self.last_active + LINGER - now
        if left > LINGER_SLACK and now - self.linger_since < LINGER_MAX:
            # The app sent more since: LINGER after its last bytes.
            self.linger_timer = self.loop.call_later(left, self._linger_end)
        else:
            self.linger_timer = None
            self.close()  # all written: a graceful close does not wait

    def sweep(self, idle_before: float, head_before: float, body_before: float) -> None:
        """Close this connection if it idled since `idle_before`, has been sending one
        request head since `head_before`, or sent no bytes of the body the sidecar is
        reading since `body_before` (clock times); see `Proxy.start_sweeping`."""
        if self.closed:
            return
        if self.lingering:
            if self.unflushed() and self.linger_since < idle_before:
                self.abort()  # the app does not read its answer
            return
        if self.write_wait:
            if self.last_active < idle_before:
                self.abort()  # the app has not read its answers for idle_timeout
            return
        if self.busy:
            req = self.req
            if (
                req is not None
                and self.dispatched
                and not req.body_done
                and not self.paused
                and self.body_last < body_before
                and self.exchange is not None
                and self.exchange.req is req
            ):
                self.exchange.app_stalled()
            return
        if self.head_started:
            if self.head_started < head_before:
                self._reject(
                    _bad_request(
                        "request head not complete within header_timeout "
                        f"({self.proxy.limits.header_timeout:g}s)"
                    )
                )
        elif self.last_active < idle_before:
            transport = self.transport
            if transport is not None and transport.get_write_buffer_size():
                self.abort()  # an app that stopped reading: a graceful close would wait
            else:
                self.close()

    def close_if_idle(self) -> None:
        if self.write_wait or self.between:
            # Nothing in flight: the pipelined requests left are not served (as behind
            # an answer that closes); the answers made are written, then it ends.
            self.queue.clear()
            if self.write_wait:
                self.write_wait = False
                self._idle()
            self._linger()  # between: its task sees it and ends
        elif not self.busy:
            self.close()

    def unflushed(self) -> bool:
        transport = self.transport
        return (
            transport is not None
            and not self.closed
            and (bool(self.unsent) or transport.get_write_buffer_size() > 0)
        )

    def ending(self) -> bool:
        """Still writing out answers made, or lingering: a shutdown lets it end."""
        return not self.closed and (self.lingering or self.unflushed())

    def watch_flush(self) -> None:
        """Have resume_writing tell when every byte is handed to the kernel."""
        self.send_unsent()
        if self.unflushed():
            assert self.transport is not None
            self.transport.set_write_buffer_limits(0, 0)

    def finish(self) -> None:
        """Shutdown's last word: close when no request is in flight and every answer is
        handed to the kernel (it goes on sending them after the exit), else cut."""
        self.send_unsent()
        if self.unflushed() or (self.busy and not self.lingering):
            self.cut()
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.send_unsent()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            # What was written goes to the kernel first, as it went at once before
            # writes were held (see Outbox): only the transport's own buffer is dropped.
            self.send_unsent()
            self.transport.abort()
        self.closed = True

    def cut(self) -> None:
        """Abort with the answer in progress cut short. One that ends with the connection
        (HTTP/1.0, no length) would look complete to the app if the connection just
        ended (uvloop's abort only closes the socket: the app reads an end of stream):
        that one ends with a TCP reset, which makes the app's read fail. Any other
        answer's framing tells the app it is cut."""
        transport = self.transport
        ex = self.exchange
        if transport is not None and not self.closed and ex is not None and ex.close_delimited:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self.abort()


class Exchange:
    """One app request through one upstream: admission, attempts, and the response relay.

    It is `forward.ResponseSink`, where an upstream response goes: the upstream
    connection calls it as the response arrives, and it writes straight to the app's
    transport.

    Timers measure the upstream, never the app: the overall `timeout` starts once
    the app's whole request is in (for a request without a body, at once), and
    each attempt's `per_try_timeout` once the whole request has been sent on that
    attempt; a connect is bounded by `per_try_timeout` on its own. While the app
    is still uploading, only `app_connections.body_timeout` applies, and a stall
    is the app's fault (408, nothing blamed).
    """

    __slots__ = (
        "_body_sent",
        "_fut",
        "_head_seen",
        "_out",
        "_timer",
        "attempt_span",
        "attempts",
        "begun",
        "close_delimited",
        "conn",
        "deadline",
        "down",
        "downstream_chunked",
        "due",
        "failed",
        "first_byte",
        "host",
        "interim",
        "keep",
        "req",
        "retry_status",
        "retrying",
        "stalled",
        "started",
        "stats",
        "status",
        "target",
        "tunnel",
        "up",
    )

    def __init__(
        self,
        down: DownstreamProtocol,
        req: Request,
        up: Upstream,
        target: bytes,
        host: bytes | None = None,
    ) -> None:
        self.down = down
        self.req = req
        self.up = up
        self.target = target
        self.host = host  # replaces the app's Host (absolute-form target)
        self.conn: UpstreamConnection | None = None
        self.status = 0  # the status relayed to the app; 0 until a final head is relayed
        self.attempts = 0
        self.attempt_span: TraceContext | None = None  # a sampled task-less attempt's span
        self.deadline = math.inf  # the overall timeout's end, once the request is all in
        self.keep = False
        self.downstream_chunked = False
        # The answer to the app ends with the connection (HTTP/1.0, no length): cut
        # short, it must end with a reset, not look complete (see `DownstreamProtocol.cut`).
        self.close_delimited = False
        self.interim = False  # a 1xx reached the app: no attempt may follow
        self.stalled = False  # the app stopped sending its body (body_timeout)
        self.tunnel: Tunnel | None = None
        self.started = 0.0  # the attempt's start on the balancer's clock (its latency sample)
        self.first_byte: float | None = None
        self.retry_status = 0  # the status of the last attempt discarded for a retry
        self.failed: ProxyError | None = None  # why the previous attempt failed
        self.retrying = False  # the attempt that just ended may be followed by another
        self.stats: EndpointStats | None = None  # the endpoint of the current attempt
        self.begun = 0.0  # when the exchange began (loop clock): its latency sample
        self.due = math.inf  # a task-less attempt's next deadline, for Proxy.watch
        self._fut: asyncio.Future[int] | _Outcome | None = None
        self._body_sent = False  # the whole request body was sent when the answer ended
        self._head_seen = False
        self._out: list[bytes] = []  # response bytes waiting for flush()
        self._timer: asyncio.TimerHandle | None = None

    async def run(self) -> bool:
        down, req, up = self.down, self.req, self.up
        config = up.config
        if up.inflight >= up.max_inflight:
            return self._error(
                ProxyError(
                    ErrorCode.OVERLOADED,
                    f"{up.inflight} requests to {up.name!r} are in flight "
                    f"(max_concurrent_requests {config.max_concurrent_requests})",
                    up.name,
                )
            )
        try:
            probe = up.breaker.admit()
        except CircuitOpenError as exc:
            fallback = config.fallback
            if fallback is not None:
                up.count(fallback.status)
                return down.send_response(req, fallback.status, up.fallback_headers, fallback.body)
            return self._error(
                ProxyError(
                    ErrorCode.CIRCUIT_OPEN,
                    f"circuit to {up.name!r} is open after repeated failures",
                    up.name,
                    (("retry-after", str(exc.retry_after)),),
                )
            )
        loop = down.loop
        self._open(loop)
        if req.expect_continue and not req.body_done:
            down.write(_CONTINUE)
        return await self._drive(loop, probe, resumed=False)

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        """The exchange is admitted: it counts in flight from now on."""
        up = self.up
        self.begun = start = loop.time()
        if self.req.body_done:
            self.deadline = start + up.timeout
        up.inflight += 1
        up.budget.deposit()
        self.down.exchange = self

    async def _drive(self, loop: asyncio.AbstractEventLoop, probe: bool, resumed: bool) -> bool:
        """Run the attempts (after the failed first one of a task-less start when
        `resumed`), then close the exchange; return keep-alive."""
        verdict: bool | None = None  # breaker: True success, False failure, None no verdict
        settled = False
        try:
            verdict = await self._attempts(loop, resumed)
            tunnel = self.tunnel
            if tunnel is not None:
                # The handshake is the request: its verdict and latency count now; the
                # tunnel stays in flight until it closes.
                settled = True
                self._settle(probe, verdict, loop.time() - self.begun)
                await tunnel.done
            return self.keep
        finally:
            self._close(loop, probe, verdict, settled)

    def _close(
        self, loop: asyncio.AbstractEventLoop, probe: bool, verdict: bool | None, settled: bool
    ) -> None:
        down, up = self.down, self.up
        down.exchange = None
        if down.paused:
            down._resume(_PAUSE_UPSTREAM)  # back-pressure from this upstream ends with it
            down._resume(_PAUSE_BUFFER)  # nothing waits for the buffered body any more
        up.inflight -= 1
        tunnel = self.tunnel
        if tunnel is not None and not tunnel.done.done():
            tunnel.abort()  # cancelled (a bug, or the loop ending): nothing leaks
        if not settled:
            self._settle(probe, verdict, loop.time() - self.begun)

    # -- the task-less common case ---------------------------------------------------------------

    def start_fast(self) -> bool:
        """Admit, pick and send from the parser callback, when the circuit is closed and
        the picked endpoint has an idle pooled connection; False (nothing changed) when
        not. The attempt's end comes to `fast_ended`, from a response callback or the
        per-try timer: a complete response finishes the exchange there; anything else
        is handled as `_attempts` would, and a retry goes on in a task (`retry`)."""
        up = self.up
        if up.inflight >= up.max_inflight or not up.breaker.admits_freely():
            return False
        head = self._request_head()  # before anything is taken or counted: it may raise
        balancer = up.balancer
        stats = balancer.pick()
        if stats is None:
            return False
        pool = stats.pool
        assert isinstance(pool, EndpointPool)
        conn = pool.take()
        if conn is None:
            return False
        down, req = self.down, self.req
        loop = down.loop
        down.proxy.begin()
        self._open(loop)
        self.attempts = 1
        self.stats = stats
        self.started = balancer.begin(stats)
        self.conn = conn
        self._fut = outcome = _Outcome(self)
        trace = req.trace
        if trace is not None and trace.span is not None:
            tracer = down.proxy.tracer
            assert tracer is not None
            server_span_begin(req, trace)
            server_span_route(req, trace.span, up)
            self.attempt_span = attempt = self._attempt_span(tracer, trace, stats)
            head = head.replace(trace.header, attempt.header, 1)
        if conn.start([head, *req.body] if req.has_body else [head], self, req.method == b"HEAD"):
            # The per-try deadline (the whole request is sent); see on_due.
            self.due = self.begun + up.try_timeout
            down.proxy.watch(self, loop)
        else:
            outcome.set_result(_CONNECT_FAILED)  # reset right after the accept
        return True

    def fast_ended(self, result: int) -> None:
        """The task-less attempt ended with `result` (see `_Outcome`). A sampled request's
        CLIENT span ends with the attempt and its SERVER span with the exchange (or in
        the task a retry goes on in); log lines written meanwhile carry its ids, as on
        the coroutine path."""
        self._fut = None
        down, req = self.down, self.req
        down.proxy.watched.pop(self, None)
        loop = down.loop
        stats = self.stats
        assert stats is not None
        attempt = self.attempt_span
        tracer, trace = down.proxy.tracer, req.trace
        tokens = None
        if attempt is not None:
            self.attempt_span = None
            assert tracer is not None
            assert trace is not None
            self._end_attempt_span(tracer, attempt, result)
            tokens = trace.bind_log_ids()
        error: str | None = None
        retrying = False
        try:
            try:
                verdict = self._outcome(loop, stats, result)
                retrying = self.retrying
            except Exception as exc:  # a bug must not take down other connections
                log.exception("request_failed_unexpectedly")
                error = type(exc).__name__
                self.keep = False
                verdict = None
                down.abort()
            if not retrying:
                self._close(loop, False, verdict, False)
        finally:
            if tokens is not None:
                # Unbound before anything else runs: the retry's task (and the requests
                # queued behind it, served in that task) must not inherit these ids.
                unbind_log_ids(tokens)
            if retrying:
                down.resume_in_task(self)  # a sampled request's task ends its SERVER span
            else:
                try:
                    if attempt is not None:
                        assert tracer is not None
                        assert trace is not None
                        server_span_end(req, tracer, trace, error)
                finally:
                    down.served(req, self.keep)

    async def retry(self) -> bool:
        """Go on after a task-less first attempt that may be retried (in a task)."""
        return await self._drive(self.down.loop, False, resumed=True)

    def _settle(self, probe: bool, verdict: bool | None, took: float) -> None:
        """Give the breaker its verdict and observe the latency, once per request."""
        breaker = self.up.breaker
        if verdict is None:
            breaker.release(probe)
        elif verdict:
            breaker.success(probe)
        else:
            breaker.failure(probe)
        self.up.traffic.observe(took)

    async def _attempts(self, loop: asyncio.AbstractEventLoop, resumed: bool) -> bool | None:
        """Run attempts until one answers or none may follow; return the breaker verdict.

        `resumed`: the first attempt was made task-less and may be retried (its outcome
        is handled already); go on with the back-off.
        """
        up, req = self.up, self.req
        balancer = up.balancer
        per_try = up.config.per_try_timeout
        head = self._request_head()
        trace = req.trace
        tracer = self.down.proxy.tracer if trace is not None and trace.span is not None else None
        if resumed:
            await self._backoff(loop)
            stats = balancer.pick(avoid=self.stats)
        else:
            stats = balancer.pick()
        while True:
            if self.down.closed:
                return None  # the app left during a back-off
            if self.stalled:
                self._answer_stalled()
                return None
            if stats is None:
                self._error(
                    self.failed
                    or ProxyError(
                        ErrorCode.NO_HEALTHY_ENDPOINTS,
                        f"no healthy endpoint for {up.name!r}",
                        up.name,
                    )
                )
                return False
            remaining = self.deadline - loop.time()
            if remaining <= 0:  # the back-off used up the rest of `timeout`
                self._error(self.failed or self._timeout_error(loop, stats))
                return False
            self.attempts += 1
            pool = stats.pool
            assert isinstance(pool, EndpointPool)
            self.stats = stats
            self.started = balancer.begin(stats)
            self.first_byte = None
            if tracer is None:
                attempt = None
                sent = head
            else:
                assert trace is not None
                attempt = self._attempt_span(tracer, trace, stats)
                sent = head.replace(trace.header, attempt.header, 1)
            try:
                result = await self._one_attempt(loop, pool, sent, min(per_try, remaining))
            except BaseException:  # cancelled, or a bug: the endpoint's count must not leak,
                balancer.abandon(stats)  # nor the connection, in a state nobody knows
                if self.conn is not None:
                    self.conn.abort()
                    self.conn = None
                if attempt is not None and tracer is not None:
                    tracer.end(attempt, "cancelled")
                raise
            if attempt is not None and tracer is not None:
                self._end_attempt_span(tracer, attempt, result)
            verdict = self._outcome(loop, stats, result)
            if not self.retrying:
                return verdict
            await self._backoff(loop)
            stats = balancer.pick(avoid=stats)

    def _outcome(
        self, loop: asyncio.AbstractEventLoop, stats: EndpointStats, result: int
    ) -> bool | None:
        """Settle one attempt that ended with `result`: release or drop its connection,
        count it, and answer the app if no attempt follows. Returns the breaker verdict;
        `retrying` tells whether another attempt may follow (after a back-off)."""
        up, req = self.up, self.req
        balancer = up.balancer
        retries = up.retry_policy
        self.retrying = False
        conn = self.conn
        self.conn = None
        req.conn = None
        if result == _DONE:
            ok = self.status < 500
            self._end(stats, ok)
            if conn is not None:
                conn.release(self._body_sent)
            up.count(self.status)
            return ok
        if result == _UPGRADED:
            self._end(stats, True)
            up.count(101)
            self.keep = False
            return True
        if conn is not None:
            conn.abort()
            self.down._resume(_PAUSE_UPSTREAM)  # that connection's back-pressure is gone
        if result == _CLIENT_GONE:
            balancer.abandon(stats)
            self.keep = False
            return None
        if result == _APP_STALLED:
            balancer.abandon(stats)
            self._answer_stalled()
            return None
        if result == _NO_DESCRIPTOR:
            # The sidecar's own shortage (its open-file limit): no verdict on the endpoint
            # or the breaker, which would eject healthy endpoints and open the circuit
            # for the whole `open_for` after the shortage ends; no retry, which would
            # fail the same way. `failed` says what happened (set by _one_attempt).
            balancer.abandon(stats)
            assert self.failed is not None
            self._error(self.failed)
            return None
        self._end(stats, False)
        if result == _CUT:
            up.count(self.status)
            self.keep = False
            self.down.cut()
            trace = self.req.trace
            if trace is not None and trace.span is not None:
                # The app got a head and part of a body: serving it failed, whatever
                # the status code says (a span's status is ERROR on a network error).
                trace.span.attributes["error.type"] = trace.span.error = _ATTEMPT_ERRORS[_CUT]
            return False
        if result == _RETRY_STATUS:
            # Decided when the head arrived (on_response_head); nothing reached the app.
            failed = None
            allowed = True
        elif result == _TIMEOUT:
            failed = self._timeout_error(loop, stats)
            allowed = retries.on_timeout and self._may_retry(loop)
        else:
            what = "connect to" if result == _CONNECT_FAILED else "get a response from"
            failed = ProxyError(
                ErrorCode.UPSTREAM_CONNECT_FAILED,
                f"could not {what} {up.name!r} at {stats.endpoint} (attempt {self.attempts})",
                up.name,
            )
            if result == _CONNECT_FAILED:
                allowed = retries.on_connect_failure
            else:
                # A kept-alive connection the upstream closed before reading anything
                # fails like a connect failure; any other reset needs `reset`.
                stale = conn is not None and conn.reused and not conn.got_bytes
                allowed = retries.on_reset or (stale and retries.on_connect_failure)
            allowed = allowed and self._may_retry(loop)
        self.failed = failed
        if not allowed:
            assert failed is not None
            self._error(failed)
            return False
        self.retrying = True
        return None

    def _attempt_span(
        self, tracer: Tracer, trace: TraceContext, stats: EndpointStats
    ) -> TraceContext:
        """The CLIENT span of one attempt (retries are its siblings)."""
        method = self.req.method.decode("latin-1")
        endpoint = stats.endpoint
        attributes: dict[str, object] = {
            "http.request.method": method,
            "server.address": endpoint.host,
            "server.port": endpoint.port,
            "url.path": self.target.split(b"?", 1)[0].decode("latin-1"),
            "sidecar.upstream": self.up.name,
            "sidecar.endpoint": endpoint.address,
        }
        if self.attempts > 1:
            attributes["http.request.resend_count"] = self.attempts - 1
        return tracer.child(trace, method, CLIENT, attributes)

    def _end_attempt_span(self, tracer: Tracer, attempt: TraceContext, result: int) -> None:
        assert attempt.span is not None
        attributes = attempt.span.attributes
        status = self.retry_status if result == _RETRY_STATUS else self.status
        if status and result in (_DONE, _RETRY_STATUS, _CUT, _UPGRADED):
            attributes["http.response.status_code"] = status
        error = _ATTEMPT_ERRORS.get(result)
        if error is None and status >= 500:
            error = str(status)
        if error is not None:
            attributes["error.type"] = error
        tracer.end(attempt, error)

    def _timeout_error(self, loop: asyncio.AbstractEventLoop, stats: EndpointStats) -> ProxyError:
        which = "per_try_timeout" if self.deadline - loop.time() > 0 else "timeout"
        return ProxyError(
            ErrorCode.UPSTREAM_TIMEOUT,
            f"{self.up.name!r} did not answer within {which} "
            f"(attempt {self.attempts} to {stats.endpoint})",
            self.up.name,
        )

    def _answer_stalled(self) -> None:
        """The app sent no body bytes for body_timeout: 408 if nothing was relayed yet,
        else cut the connection. No verdict: the upstream did nothing wrong."""
        self.keep = False
        if self.status:
            self.down.abort()
            return
        limit = self.down.proxy.limits.body_timeout
        self._error(
            ProxyError(
                ErrorCode.REQUEST_TIMEOUT,
                f"the app sent no request body bytes for body_timeout ({limit:g}s)",
                self.up.name,
            )
        )

    async def _one_attempt(
        self, loop: asyncio.AbstractEventLoop, pool: EndpointPool, head: bytes, budget: float
    ) -> int:
        """Connect (or reuse), send, and wait until this attempt ends; return how it ended."""
        self._head_seen = False
        fut: asyncio.Future[int] = loop.create_future()
        self._fut = fut
        try:
            conn = pool.take()
            if conn is None:
                # The connect is bounded by the per-try budget; the attempt's own timer
                # starts once the request is sent.
                self._timer = loop.call_later(budget, self._on_timer)
                # A new connection's callbacks run in the context it was made in: an
                # empty one, or every later request on it would log this one's trace ids.
                connect = loop.create_task(
                    pool.connect(self.down.outbox), context=contextvars.Context()
                )
                await asyncio.wait((connect, fut), return_when=asyncio.FIRST_COMPLETED)
                if fut.done():  # timed out, or the app went away (or stalled)
                    connect.cancel()
                    if connect.done() and not connect.cancelled() and not connect.exception():
                        connect.result().abort()
                    return fut.result()
                exc = connect.exception()
                if exc is not None:
                    if isinstance(exc, OSError) and exc.errno in _SHORTAGE_ERRNOS:
                        self.failed = ProxyError(
                            ErrorCode.OVERLOADED,
                            f"the sidecar could not open a connection to {self.up.name!r} "
                            f"at {pool.endpoint}: {exc.strerror}",
                            self.up.name,
                        )
                        return _NO_DESCRIPTOR
                    return _CONNECT_FAILED
                conn = connect.result()
                self._timer.cancel()
                self._timer = None
            self.conn = conn
            req = self.req
            # The head and whatever body is already here leave in one write.
            out = [head]
            if req.has_body:
                body = req.body
                if req.chunked:
                    for chunk in body:
                        out += (b"%x\r\n" % len(chunk), chunk, _CRLF)
                    if req.body_done:
                        out.append(_CHUNK_END)
                else:
                    out += body
            if not conn.start(out, self, req.method == b"HEAD", req.upgrade):
                return _CONNECT_FAILED  # reset right after the accept: nothing was sent
            if req.body_done:
                # The whole request is sent: the upstream's time starts now (one timer:
                # at the per-try deadline it ends an attempt that has no response head
                # yet, or re-arms itself for the overall deadline, see _on_timer).
                self._timer = loop.call_later(
                    min(budget, self.deadline - loop.time()), self._on_timer
                )
            else:
                # The app is still sending: no timer until its last byte (on_body_done).
                req.conn = conn
                conn.keep_readable()
            if req.has_body and not req.replayable:
                req.body = []
            self.down._resume(_PAUSE_BUFFER)  # the buffered body is on its way now
            return await fut
        finally:
            self._fut = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def on_body_done(self) -> None:
        """The app's last body byte arrived: the overall timeout starts, and so does the
        per-try timer of an attempt the body was streaming to."""
        loop = self.down.loop
        now = loop.time()
        self.deadline = now + self.up.timeout
        fut = self._fut
        if fut is not None and not fut.done() and self.req.conn is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(now + self.up.try_timeout, self._on_timer)
            if not self._head_seen:  # the endpoint's latency sample starts now too
                self.started = self.up.balancer.now()

    def app_stalled(self) -> None:
        """The app sent no body bytes for body_timeout (the proxy's sweeper saw it)."""
        self.stalled = True
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(_APP_STALLED)

    def _request_head(self) -> bytes:
        req = self.req
        host = self.host
        trace = req.trace
        return request_head(
            req.method,
            self.target,
            req.headers,
            self.down.client_ip,
            host=self.up.host if host is None else host,
            replace_host=host is not None,
            traceparent=None if trace is None else trace.header,
            tracestate="" if trace is None else trace.tracestate,
            chunked=req.chunked,
            upgrade=req.upgrade,
        )

    def _may_retry(self, loop: asyncio.AbstractEventLoop) -> bool:
        req, up = self.req, self.up
        if self.attempts > up.retry_policy.max or self.interim:
            return False
        if not retryable_request(req.method, req.idempotency_key):
            return False
        if not req.replayable or self.deadline - loop.time() <= 0:
            return False
        if not up.budget.try_withdraw():
            return False
        up.retries.inc()
        return True

    async def _backoff(self, loop: asyncio.AbstractEventLoop) -> None:
        delay = min(
            retry_backoff(self.attempts - 1, self.down.proxy.rng), self.deadline - loop.time()
        )
        if delay > 0:
            await asyncio.sleep(delay)

    def _end(self, stats: EndpointStats, ok: bool) -> None:
        before = stats.ejections
        self.up.balancer.end(stats, self.started, ok, self.first_byte)
        if stats.ejections != before:
            self.down.proxy.metrics.ejections.labels(self.up.name).inc()
            log.warning(
                "endpoint_ejected",
                upstream=self.up.name,
                endpoint=str(stats.endpoint),
                ejections=stats.ejections,
                consecutive_failures=self.up.config.outlier.consecutive_failures,
                ejected_for_s=round(stats.ejected_until - self.up.balancer.now(), 3),
            )

    def _error(self, err: ProxyError) -> bool:
        self.up.count(err.code.status)
        self.down.proxy.metrics.proxy_errors.labels(self.up.name, err.code.value).inc()
        self.keep = self.down.send_error(self.req, err)
        return self.keep

    # -- timers ----------------------------------------------------------------------------------

    def _on_timer(self) -> None:
        """The per-try deadline (`min(per_try_timeout, what is left of timeout)`) passed;
        see `_deadline_passed`. A response that ends first cancels the timer, so no
        second timer is made for the common fast answer."""
        self._timer = None
        loop = self.down.loop
        if not self._deadline_passed(loop.time()):
            self._timer = loop.call_at(self.deadline, self._on_timer)

    def on_due(self, now: float) -> None:
        """`_on_timer` for a task-less attempt, called by the proxy's ticker once `due`
        passed."""
        if self._deadline_passed(now):
            self.down.proxy.watched.pop(self, None)
        else:
            self.due = self.deadline

    def _deadline_passed(self, now: float) -> bool:
        """End the attempt at its deadline: no response head yet, it timed out; past the
        overall deadline, a streaming response is cut. False while a response streams
        within the overall `timeout`: check again at `deadline`."""
        fut = self._fut
        if fut is None or fut.done():
            return True
        if not self._head_seen:
            fut.set_result(_TIMEOUT)
        elif now < self.deadline:
            return False
        else:
            fut.set_result(_CUT)
        return True

    def client_gone(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(_CLIENT_GONE)

    # -- forward.ResponseSink: what the upstream connection calls ----------------------------------

    def on_interim(self, status: int, reason: bytes, headers: Headers) -> None:
        """Relay a 1xx the upstream sent on its own (103 Early Hints) to an HTTP/1.1 app
        (RFC 9110 §15.2: never to HTTP/1.0); from then on no attempt may follow."""
        fut = self._fut
        if fut is None or fut.done() or self.req.version != "1.1":
            return
        self.interim = True
        self._out.append(
            b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, response_fields(headers, False))
        )

    def on_response_head(self, status: int, reason: bytes, headers: Headers, framing: int) -> None:
        fut = self._fut
        if fut is None or fut.done():
            return  # the attempt already ended (timed out, or the app left)
        self._head_seen = True
        self.first_byte = self.up.balancer.now()
        if status in self.up.retry_statuses and self._may_retry(self.down.loop):
            self.retry_status = status
            fut.set_result(_RETRY_STATUS)
            return
        self.status = status
        req, down = self.req, self.down
        req.status = status
        if down.write_paused and self.conn is not None:
            # The app stopped reading during an earlier answer: hold this body too. Only
            # now, after the head: pausing earlier would time out the upstream (and
            # count it as failing) for the app's slowness.
            self.conn.pause_reading()
        keep = down.may_keep(req)
        rechunk = self.downstream_chunked = self.close_delimited = False
        if framing in (FRAMING_CHUNKED, FRAMING_CLOSE):
            if req.version == "1.1":
                rechunk = self.downstream_chunked = True
            else:
                keep = False
                self.close_delimited = True
        if framing == FRAMING_TUNNEL:
            extra = UPGRADE_WEBSOCKET  # not hop-by-hop this once: the app's side of the switch
            keep = False
        else:
            extra = _connection_field(req, keep)
        self.keep = keep
        # Held until flush(): the head usually leaves in one write with the body.
        self._out.append(
            b"HTTP/1.1 %d %s\r\n%s%s\r\n"
            % (status, reason, response_fields(headers, rechunk), extra)
        )

    def on_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream answered 101 (already given to `on_response_head`): relay it, then
        join the two sockets in a tunnel. `rest` is what the upstream sent after the 101
        head; the connection no longer reads or pools its transport."""
        fut = self._fut
        down = self.down
        transport = down.transport
        upstream = conn.transport
        assert upstream is not None  # it just read the 101
        if fut is None or fut.done() or transport is None or down.closed:
            upstream.abort()  # the attempt ended (timed out, the app left) while it came
            return
        self.flush()  # the 101 head, after anything held (writelines): the tunnel writes at once
        if rest:
            transport.write(rest)
        held, down.held = down.held, b""
        if held:
            upstream.write(held)
        # The app's connection leaves the HTTP side: no sweeps, no requests, no close by it.
        down.proxy.connections.discard(down)
        down.closed = True
        tunnel = Tunnel(transport, upstream, self.up.name, down.proxy.tunnels)
        tunnel.start(down.write_paused, conn.write_paused)
        self.tunnel = tunnel
        fut.set_result(_UPGRADED)

    def on_response_body(self, chunk: bytes) -> None:
        fut = self._fut
        if fut is None or fut.done():
            return  # discarded for a retry
        if self.downstream_chunked:
            self._out += (b"%x\r\n" % len(chunk), chunk, _CRLF)
        else:
            self._out.append(chunk)

    def flush(self) -> None:
        """Write what the last `data_received` produced, in one go."""
        if self._out:
            self.down.writelines(self._out)
            self._out = []

    def on_response_end(self, complete: bool) -> None:
        fut = self._fut
        if fut is None or fut.done():
            return
        if not complete:
            self.flush()
            fut.set_result(_CUT)
            return
        if self.downstream_chunked:
            self._out.append(_CHUNK_END)
        if self.down.proxy.alone():
            self.flush()  # at once, not after the exchange's bookkeeping below
        elif self._out:  # the answer's end (one read at most): with the pass's other writes
            self.down.hold(self._out)
            self._out = []
        # A request whose body the app is still sending can't share the connection,
        # and neither can the upstream connection that answered before reading it all.
        self._body_sent = self.req.body_done
        if not self._body_sent:
            self.keep = False
        fut.set_result(_DONE)

    def on_upstream_error(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(_CUT if self._head_seen else _RESET)

    def pause_source(self) -> None:
        self.down._pause(_PAUSE_UPSTREAM)

    def resume_source(self) -> None:
        self.down._resume(_PAUSE_UPSTREAM)

    def __repr__(self) -> str:
        return f"<Exchange {self.up.name} {self.req.method.decode()} attempts={self.attempts}>"


class _Outcome:
    """How a task-less attempt ended: the part of a future `Exchange` uses (`done`,
    `set_result`), except that the result goes to `Exchange.fast_ended` at once, in
    the callback that decided it, instead of waking a task."""

    __slots__ = ("exchange", "result")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.result = -1

    def done(self) -> bool:
        return self.result >= 0

    def set_result(self, result: int) -> None:
        self.result = result
        self.exchange.fast_ended(result)


#: error.type of a CLIENT span, by how the attempt ended (a 5xx adds its status code).
_ATTEMPT_ERRORS: Final = {
    _TIMEOUT: ErrorCode.UPSTREAM_TIMEOUT.value,
    _CONNECT_FAILED: ErrorCode.UPSTREAM_CONNECT_FAILED.value,
    _RESET: "connection_reset",
    _CUT: "response_cut",
    _CLIENT_GONE: "client_gone",
    _APP_STALLED: ErrorCode.REQUEST_TIMEOUT.value,
    _NO_DESCRIPTOR: ErrorCode.OVERLOADED.value,
}


def _small_body(req: Request) -> bool:
    """A Content-Length body of at most REPLAY_LIMIT bytes (kept for a retry as it is),
    without `Expect: 100-continue` (the app waits before sending it)."""
    length = req.content_length  # b"" without one; never with chunked (llhttp refuses it)
    return not req.expect_continue and length.isdigit() and int(length) <= REPLAY_LIMIT


def server_span_begin(req: Request, trace: TraceContext) -> None:
    """Name a sampled request's SERVER span and give it the request's attributes."""
    span = trace.span
    assert span is not None
    method = req.method.decode("latin-1")
    target = req.target
    path = target.split(b"?", 1)[0]
    if target[:1] != b"/" and target != b"*":  # absolute-form: the path after the authority
        path = b"/" + path[scheme_length(path) :].partition(b"/")[2]
    span.kind = SERVER
    span.name = method
    span.attributes = {
        "http.request.method": method,
        "url.path": path.decode("latin-1"),
        "url.scheme": "http",
        "network.protocol.version": req.version,
    }


def server_span_route(req: Request, span: SpanRecord, upstream: Upstream) -> None:
    """The request was routed to `upstream`: its span says so (and its http.route)."""
    span.attributes["sidecar.upstream"] = upstream.name
    if req.target.startswith(b"/v1/invoke/"):
        req.route = f"/v1/invoke/{upstream.name}/*"


def server_span_end(req: Request, tracer: Tracer, trace: TraceContext, error: str | None) -> None:
    """End a sampled request's SERVER span with its route, status and error, if any
    (`error`: what interrupted serving it)."""
    span = trace.span
    assert span is not None
    attributes = span.attributes
    if req.route:
        span.name = f"{span.name} {req.route}"
        attributes["http.route"] = req.route
    if req.status:
        attributes["http.response.status_code"] = req.status
    code = attributes.get("error.type")
    if code is None and req.status >= 500:
        attributes["error.type"] = code = str(req.status)
    elif code is None and error is not None:
        attributes["error.type"] = code = error
    # A server span's status is an error for 5xx only (4xx is the client's).
    tracer.end(trace, str(code) if req.status >= 500 or error else None)


def _bad_request(message: str) -> ProxyError:
    return ProxyError(ErrorCode.BAD_REQUEST, message)


def _unknown_method(data: bytes) -> ProxyError:
    """501 for a well-formed request line whose method llhttp does not know (`FROB`,
    `get`); 400 when the bytes are no request line at all. Requests before it in the
    same read parsed, so the one that failed is the first line whose method a fresh
    parser refuses."""
    for match in _REQUEST_LINE.finditer(data):
        probe = httptools.HttpRequestParser(_Ignore())
        try:
            probe.feed_data(match.group(0).lstrip(b"\n") + b"\r\n")
        except httptools.HttpParserInvalidMethodError:
            method = match.group(1).decode("latin-1")
            return ProxyError(
                ErrorCode.NOT_IMPLEMENTED, f"method {method!r} is not supported by the sidecar"
            )
        except httptools.HttpParserError:
            continue
    return _bad_request("malformed HTTP request: invalid method")


class _Ignore:
    """A parser protocol with no callbacks, for probing a request line."""


class _BodyAfterUpgrade:
    """Parser callbacks for a body that follows an ignored upgrade: the primed head's
    callbacks are dropped, the body's and every later message's go to the connection."""

    __slots__ = ("down", "priming")

    def __init__(self, down: DownstreamProtocol) -> None:
        self.down = down
        self.priming = True

    def on_message_begin(self) -> None:
        if not self.priming:
            self.down.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.priming:
            self.down.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.priming:
            self.down.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.priming:
            self.down.on_headers_complete()

    def on_chunk_header(self) -> None:
        self.down.on_chunk_header()  # the primed head has no body

    def on_body(self, body: bytes) -> None:
        self.down.on_body(body)

    def on_message_complete(self) -> None:
        self.priming = False
        self.down.on_message_complete()


_REASONS: Final[dict[int, bytes]] = {status.value: status.phrase.encode() for status in HTTPStatus}


def _too_large(size: int | None, limit: int) -> ProxyError:
    shown = f"of {size} bytes" if size is not None else f"of more than {limit} bytes"
    return ProxyError(
        ErrorCode.BODY_TOO_LARGE, f"event body {shown} is over events.max_event_bytes ({limit})"
    )


def _connection_field(req: Request, keep: bool) -> bytes:
    """The `Connection` line of an answer to `req`: close, or keep-alive stated for an
    HTTP/1.0 client (which closes unless told otherwise), or none."""
    if not keep:
        return b"Connection: close\r\n"
    if req.version == "1.0":
        return b"Connection: keep-alive\r\n"
    return b""
