"""One upstream HTTP/1.1 connection, its pool per endpoint, and the exchange it carries.

The upstream side of the data plane. Bytes are pushed, not pulled: response
body chunks go straight from the upstream socket's `data_received` to the app's
transport, and write back-pressure on either side pauses reading on the other,
so a 50 MiB body crosses with a few socket buffers of memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from typing import TYPE_CHECKING, Final, Protocol, cast

import httptools

from sidecar.discovery.base import Endpoint
from sidecar.proxy.headers import Headers, lowered
from sidecar.telemetry.logging import get_logger

log = get_logger("sidecar.proxy")


if TYPE_CHECKING:
    # Where one upstream response goes: the app-facing side of an exchange, the only
    # one. Named as the class, not as a Protocol of its methods, so that the compiled
    # build calls them directly instead of looking each up by name (about 400
    # instructions a call, four calls a response: docs/performance.md, "An eleventh
    # machine").
    from sidecar.proxy.server import Exchange as ResponseSink


class Sender(Protocol):
    """A connection whose small writes wait in an `Outbox` for the end of the pass."""

    def send_unsent(self) -> None:
        """Hand what is held to the transport, now."""


class Outbox:
    """Writes held until the event loop's current pass ends, then made back to back.

    A write to a socket wakes the process reading it (nginx, the app) if that process
    waits for input, and the writer pays for the wake-up: on a virtual machine, an
    interrupt sent to another processor. Written at once, each request and each
    answer woke its reader anew, since a fast reader is back asleep before the next
    write comes: that was 13-15 % of the sidecar's CPU at 32 connections
    (docs/performance.md). Held until the pass's I/O callbacks are done, the writes
    of a pass leave together: the reader woken by the first finds the rest ready.

    Only what is bounded is held: request heads with a body at hand, and the end of
    a response (one read of it at most); streamed bodies are written at once, so the
    transports' back-pressure works as before. A connection writing at once sends
    what it holds first, and sends it before it closes. `_send` runs in the loop's
    next round of callbacks, before it polls again (one `call_soon` per pass).

    The end of an answer is held only while another request is in flight
    (`Proxy.alone`): alone, it has no other write to share a wake-up with, and held,
    it would wait for the exchange's bookkeeping (docs/performance.md, "A tenth
    machine"). Request heads are always held: written at once when alone, they cost
    11 % of the requests/s at 4 connections on that machine.
    """

    __slots__ = ("_context", "_queued", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queued: list[Sender] = []
        # No request's context: the sends' callbacks (back-pressure) log nobody's ids.
        self._context = contextvars.Context()

    def add(self, sender: Sender) -> None:
        """`sender` has just begun to hold data: send it at the end of the pass."""
        queued = self._queued
        if not queued:
            self.loop.call_soon(self._send, context=self._context)
        queued.append(sender)

    def _send(self) -> None:
        queued = self._queued
        self._queued = []
        for sender in queued:
            try:
                sender.send_unsent()
            except Exception:  # a bug must not keep the other connections' writes
                log.exception("write_failed_unexpectedly")


#: How the response body is delimited.
FRAMING_NONE: Final = 0  # no body (HEAD, 204, 304)
FRAMING_LENGTH: Final = 1  # Content-Length
FRAMING_CHUNKED: Final = 2  # Transfer-Encoding: chunked
FRAMING_CLOSE: Final = 3  # read until the upstream closes
FRAMING_TUNNEL: Final = 4  # 101 Switching Protocols: what follows is not HTTP

#: A response head (status line, headers, interim responses) above this is refused like
#: garbage: httptools would otherwise buffer an endless header whole.
MAX_RESPONSE_HEAD: Final = 256 * 1024
#: A pooled connection idle longer than this is closed instead of reused: a NAT or
#: firewall may have dropped it silently, and a request sent into it would only
#: fail at the per-try timeout. Go's http.Transport uses the same 90 s.
POOL_IDLE_TIMEOUT: Final = 90.0


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection to one endpoint, carrying one exchange at a time."""

    __slots__ = (
        "_ended",
        "_final",
        "_framing_is_close",
        "_head_bytes",
        "_head_only",
        "_headers",
        "_outbox",
        "_parser",
        "_pool",
        "_reason",
        "_sink",
        "_spare",
        "_trailer_bytes",
        "_trailing",
        "_upgrade",
        "closed",
        "got_bytes",
        "head_seen",
        "idle_since",
        "keep_alive",
        "paused",
        "reused",
        "transport",
        "unsent",
        "write_paused",
    )

    def __init__(self, pool: EndpointPool, outbox: Outbox | None = None) -> None:
        self._pool = pool
        # Where its small writes wait for the end of the loop's pass: the proxy's, shared
        # by every connection; without one, its own, made once it is connected.
        self._outbox = outbox
        self.unsent: list[bytes] = []  # written at the end of the loop's pass (see Outbox)
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._sink: ResponseSink | None = None
        self._ended: ResponseSink | None = None  # a complete response, told after the parse
        self._headers: Headers = []
        self._reason = b""
        self._final = False  # the message being parsed is a final response (not a 1xx)
        self._head_only = False
        self._upgrade = False  # the request asked to switch protocols (a WebSocket handshake)
        self._spare = -1  # a second descriptor of the socket, read after a failed write
        self.head_seen = False
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.keep_alive = True
        self.paused = False
        self._framing_is_close = False
        self._head_bytes = 0
        # After a chunk header and before its data: what comes may be the trailer
        # section, which llhttp hands over field by field (a value buffered whole).
        self._trailing = False
        self._trailer_bytes = 0
        self.idle_since = 0.0  # when it was last put in the pool
        self.write_paused = False  # the transport's write buffer is over its high mark

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if self._outbox is None:
            self._outbox = Outbox(asyncio.get_running_loop())

    def data_received(self, data: bytes) -> None:
        # Tested through a local: the parse below may end the response and set `_sink`
        # to None, and the compiled build would take a narrowed attribute at its word.
        sink = self._sink
        if sink is None:
            # Bytes nobody asked for (the connection is idle, or its response is done):
            # whatever they are, they would be read as the next request's answer.
            self.abort()
            return
        self.got_bytes = True
        try:
            if not self.head_seen:
                self._head_bytes += len(data)
            elif self._trailing:
                self._trailer_bytes += len(data)
            self._parser.feed_data(data)
            if not self.head_seen and self._head_bytes > MAX_RESPONSE_HEAD:
                raise httptools.HttpParserError("response head too large")
            if self._trailer_bytes > MAX_RESPONSE_HEAD:
                raise httptools.HttpParserError("response trailers too large")
            if self._sink is not None:
                self._sink.flush()
        except httptools.HttpParserUpgrade as upgrade:
            sink = self._sink
            if sink is not None and self._upgrade and self.head_seen:
                # The 101 the request asked for: the rest of the stream is the tunnel's.
                self._sink = None
                self.closed = True  # never pooled, never read here again
                self._close_spare()
                sink.on_upgraded(self, data[upgrade.args[0] :])
            else:  # a 101 nobody asked for: handled like garbage
                self._lost(clean=False)
                self.abort()
        except httptools.HttpParserError:
            # Garbage from the upstream: the exchange fails at once like a reset (or a
            # cut body once the head was relayed), and the connection is never reused.
            self._lost(clean=False)
            self.abort()
        ended = self._ended
        if ended is not None:
            # Told only now, with the parser done with this read: the sink may hand the
            # connection back to the pool (and the next request may take it) at once,
            # and anything the upstream sent after the response has been seen by then
            # (it marks the connection not reusable, on_message_begin).
            self._ended = None
            ended.on_response_end(True)

    def eof_received(self) -> bool:
        # The loop closes the transport next, and would drop anything written later:
        # what is held goes first, as it would have gone at once (see Outbox).
        self.send_unsent()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.unsent = []
        self._pool.forget(self)
        clean = exc is None
        if self._spare >= 0:
            if not clean and self._sink is not None:
                clean = self._read_spare()
            self._close_spare()
        self._lost(clean)

    def keep_readable(self) -> None:
        """Keep the socket readable after a failed write, while a request body streams.

        An upstream that answers early (401, 413 to an upload) and closes with the rest
        of the body unread makes its kernel reset the connection; the next write of
        the body then fails, and the event loop closes the socket at once - with the
        answer, which arrived before the reset, still unread in the kernel's buffer.
        A second descriptor keeps the socket open so `connection_lost` can read it.
        """
        if self._spare < 0 and self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    self._spare = os.dup(sock.fileno())
                except OSError:
                    # No descriptor left (the open-file limit): stream on without it;
                    # only an early answer followed by a reset may then be lost.
                    self._spare = -1

    def _read_spare(self) -> bool:
        """Parse what the kernel still holds after the loop gave up on the socket;
        return whether the stream ended with a clean close (FIN) rather than a reset."""
        while self._sink is not None:
            try:
                data = os.read(self._spare, 256 * 1024)  # non-blocking, like the socket
            except OSError:
                return False  # nothing more (EAGAIN), or the reset itself
            if not data:
                return True
            self.data_received(data)
        return False

    def _close_spare(self) -> None:
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1

    def _lost(self, clean: bool) -> None:
        sink = self._sink
        if sink is None:
            return
        self._sink = None
        if not self.head_seen:
            sink.on_upstream_error()
        else:
            # A body delimited by the close is complete at a clean close (FIN); a reset,
            # or any other body, is cut short.
            sink.on_response_end(self._framing_is_close and clean)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._sink is not None:
            self._sink.pause_source()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._sink is not None:
            self._sink.resume_source()

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._sink is None:
            # A second response after the complete one, in the same read (RFC 9112
            # §9.3): the connection is out of step and must not be reused.
            self.keep_alive = False
        self._headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_seen:  # else a trailer field: not relayed (counted, data_received)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._final = status >= 200
        sink = self._sink
        if status < 200:
            if status < 100:
                # llhttp takes any three digits; `000`-`099` is no status at all (RFC
                # 9110 §15): the same as garbage, never an interim answer to relay.
                raise httptools.HttpParserError(f"invalid status code {status:03d}")
            if sink is None:
                return
            if status == 101:
                if self._upgrade:  # the parser raises HttpParserUpgrade next
                    self.head_seen = True
                    self.keep_alive = False
                    sink.on_response_head(status, self._reason, self._headers, FRAMING_TUNNEL)
            elif status != 100:  # 100 Continue: the sidecar answered Expect itself
                sink.on_interim(status, self._reason, self._headers)
            return
        if sink is None:
            return
        self.keep_alive = self._parser.should_keep_alive()
        framing = self._framing(status)
        self._framing_is_close = framing == FRAMING_CLOSE
        self.head_seen = True
        sink.on_response_head(status, self._reason, self._headers, framing)
        if framing == FRAMING_NONE:
            # llhttp cannot know a HEAD response has no body; finish it here and
            # start a fresh parser for whatever this connection carries next.
            self._parser = httptools.HttpResponseParser(self)
            self._finish()

    def on_chunk_header(self) -> None:
        self._trailing = True

    def on_body(self, body: bytes) -> None:
        if self._trailing:
            self._trailing = False
            self._trailer_bytes = 0
        if self._sink is not None:
            self._sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._final and self._sink is not None:
            self._finish()

    # -- exchange -------------------------------------------------------------------------

    def _framing(self, status: int) -> int:
        """RFC 9112 §6.3: Transfer-Encoding wins over Content-Length; a body is chunked
        only when chunked is the last coding, otherwise it runs until the close."""
        if self._head_only or status in (204, 304):
            return FRAMING_NONE
        framing = FRAMING_CLOSE
        for name, value in self._headers:
            size = len(name)  # cheaper than lower-casing every name to compare two
            if size == 17 and lowered(name) == b"transfer-encoding":
                last = value.rpartition(b",")[2].strip().lower()
                return FRAMING_CHUNKED if last == b"chunked" else FRAMING_CLOSE
            if size == 14 and lowered(name) == b"content-length":
                framing = FRAMING_LENGTH
        return framing

    def start(
        self, data: list[bytes], sink: ResponseSink, head_only: bool, upgrade: bool = False
    ) -> bool:
        """Send a request head (and any body at hand; `data` is taken, not copied) at
        the end of the loop's pass (see Outbox); the response goes to `sink`.

        False when the connection closed before anything could be sent (the upstream
        reset it right after accepting, and the reset was seen before the write):
        nothing left, so the attempt failed like a connect failure.
        """
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return False
        self._sink = sink
        self._head_only = head_only
        self._upgrade = upgrade
        self._framing_is_close = False
        self.got_bytes = False
        self.head_seen = False
        self._head_bytes = 0
        self._trailing = False
        self._trailer_bytes = 0
        unsent = self.unsent
        if unsent:
            unsent += data
        else:
            self.unsent = data
            assert self._outbox is not None  # connected
            self._outbox.add(self)
        if self.write_paused:  # still full from the last exchange
            sink.pause_source()
        return True

    def write(self, data: bytes) -> None:
        """Write now (a streamed body), after what is held."""
        transport = self.transport
        if transport is not None and not self.closed:
            if self.unsent:
                self.send_unsent()
            transport.write(data)

    def send_unsent(self) -> None:
        unsent = self.unsent
        if unsent:
            self.unsent = []
            transport = self.transport
            # Closing: the upstream reset it, or the attempt ended (see connection_lost).
            if transport is not None and not transport.is_closing():
                transport.writelines(unsent)

    def _finish(self) -> None:
        """The response is complete; its sink hears it once the parser returns."""
        self._ended = self._sink
        self._sink = None

    def release(self, reusable: bool) -> None:
        """Return to the pool after an exchange, or close when it can't carry another."""
        self._sink = None
        if self._spare >= 0:
            self._close_spare()
        if reusable and self.keep_alive and not self.closed:
            if self.paused:
                self.resume_reading()  # back-pressure from the last app must not outlive it
            self._pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        self._sink = None
        if self.transport is not None and not self.closed:
            self.send_unsent()  # what was written goes, as it went at once (see Outbox)
            self.transport.abort()
        self.closed = True

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self._sink else "idle")
        return f"<UpstreamConnection {self._pool.endpoint} {state}>"


class EndpointPool:
    """Idle keep-alive connections to one endpoint, reused last-in first-out.

    Last-in first-out keeps the busy few warm and lets the rest age out: a
    connection idle longer than POOL_IDLE_TIMEOUT is closed when it is reached.

    Except within one pass of the event loop: a connection put back during the
    pass in progress is taken only when no other is idle. Its socket was reported
    readable in this pass, so epoll (level-triggered, as uvloop uses it) still
    holds it near the front of its ready list, and a response on it would be read
    in the next pass ahead of the responses to requests sent before it. Under
    load that reordering spread the proxy's latencies (closed loop at 32
    connections: p90 1.5 x the median, 1.36 without it; docs/performance.md). So
    `idle[:settled]` were put back before this pass and are taken first, newest
    first; the rest, put back during it, become settled once the loop comes
    round, before the next pass's I/O callbacks (one `call_soon` per pass with
    returns).
    """

    __slots__ = (
        "_context",
        "_loop",
        "_settling",
        "closed",
        "endpoint",
        "idle",
        "max_idle",
        "settled",
    )

    def __init__(self, endpoint: Endpoint, max_idle: int = 256) -> None:
        self.endpoint = endpoint
        self.idle: list[UpstreamConnection] = []
        self.settled = 0  # idle[:settled] were put back before the loop's current pass
        self.max_idle = max_idle
        self.closed = False  # the endpoint is gone: connections that come back are closed
        # The loop of the connections (set by `connect`); without one, plain LIFO.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settling = False  # `_settle` is scheduled on `_loop`
        # What `_settle` runs in: no request's context, and no other pool's (a context
        # can be entered by one thread at a time).
        self._context = contextvars.Context()

    def take(self) -> UpstreamConnection | None:
        """The most recently used idle connection that is still open, preferring one
        put back before the loop's current pass; None if there is none."""
        idle = self.idle
        if not idle:
            return None
        fresh_after = time.monotonic() - POOL_IDLE_TIMEOUT
        while idle:
            below = self.settled  # how many are older than the one taken
            if below:
                below = self.settled = below - 1
                conn = idle.pop(below)
            else:
                conn = idle.pop()
                below = len(idle)
            if conn.closed:
                continue
            if conn.idle_since < fresh_after:
                # Everything below it in the stack is older still (those put back
                # during this pass sit above the settled ones, and are fresh).
                conn.abort()
                self._drop_oldest(below)
                continue
            conn.reused = True
            return conn
        return None

    async def connect(self, outbox: Outbox | None = None) -> UpstreamConnection:
        """A new connection (OSError when it fails), its small writes held in `outbox`
        (the proxy's; without one, an outbox of its own)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a `_settle` pending on another loop will not run
            self._loop = loop
            self._settling = False
        _, conn = await loop.create_connection(
            lambda: UpstreamConnection(self, outbox), self.endpoint.host, self.endpoint.port
        )
        return conn

    def put(self, conn: UpstreamConnection) -> None:
        if self.closed:
            conn.abort()
            return
        idle = self.idle
        now = time.monotonic()
        conn.idle_since = now
        # The oldest sit at the bottom; drop those too old to be reused.
        aged = 0
        while aged < len(idle) and idle[aged].idle_since < now - POOL_IDLE_TIMEOUT:
            aged += 1
        if aged:
            self._drop_oldest(aged)
        if len(idle) < self.max_idle:
            idle.append(conn)
            loop = self._loop
            if not self._settling and loop is not None:
                self._settling = True
                loop.call_soon(self._settle, context=self._context)
        else:
            conn.abort()

    def _settle(self) -> None:
        """The loop came round: everything idle now was put back before its next pass."""
        self._settling = False
        self.settled = len(self.idle)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            at = self.idle.index(conn)
        except ValueError:
            return
        del self.idle[at]
        if at < self.settled:
            self.settled -= 1

    def close(self) -> None:
        """Close every idle connection, and those that come back later (endpoint gone,
        or shutting down)."""
        self.closed = True
        self._drop_oldest(len(self.idle))

    def _drop_oldest(self, count: int) -> None:
        """Close the `count` connections at the bottom of the stack, the oldest."""
        idle = self.idle
        older = idle[:count]
        del idle[:count]  # out of the list first: an abort must not find them there
        self.settled = max(0, self.settled - count)
        for conn in older:
            conn.abort()

    def __repr__(self) -> str:
        return f"<EndpointPool {self.endpoint} idle={len(self.idle)}>"
