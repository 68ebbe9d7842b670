"""The admin API (SPEC §7), served on `admin.listen` by a small HTTP/1.1 server of its own.

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

Every GET endpoint answers HEAD too. Every answer is JSON but /metrics, errors included
(404 NOT_FOUND, 405 METHOD_NOT_ALLOWED with `Allow`, 400 BAD_REQUEST for a request that is
not HTTP/1.x, 413 for a body over 64 KiB, 431 for a head over 64 KiB, 500 INTERNAL).

Why not aiohttp's server: it made every sidecar import aiohttp, about 13 MB of its
49 MB RSS (docs/performance.md). The
endpoints above need little of HTTP: `AdminAPI` answers a parsed request, `AdminServer`
parses them (httptools, as the proxy does) and writes the answers in order, with
keep-alive, pipelining, HEAD and `Expect: 100-continue`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

import httptools
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from sidecar import __version__
from sidecar.config import Address, Config
from sidecar.lifecycle import Readiness
from sidecar.proxy.upstream import Upstream
from sidecar.telemetry.logging import LEVELS, current_log_level, get_logger, set_log_level
from sidecar.telemetry.metrics import Metrics

log = get_logger("sidecar.admin")

JSON = "application/json; charset=utf-8"
#: A request head larger than this is answered 431; a body larger than `MAX_BODY`, 413.
#: The only body any endpoint reads is a log level's name.
MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024
#: An idle keep-alive connection is closed after this long (aiohttp's default, which the
#: admin API had before); so is one that has not finished sending a request by then.
KEEPALIVE_S = 75.0
#: Requests a client may pipeline before the server stops reading from it.
MAX_PIPELINED = 16
#: After refusing a request whose rest is still coming (413, 431, 400), the server
#: half-closes and reads on, discarding, this long at most: closing at once would make
#: the kernel reset the connection, and the client could lose the answer.
LINGER_S = 2.0


@dataclass(frozen=True, slots=True)
class Answer:
    """What an endpoint answers: status, body, its content type and any extra headers."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AdminRequest:
    """A complete request as an endpoint sees it; `params` are the path's named parts."""

    method: str
    path: str
    remote: str | None
    body: bytes = b""
    params: Mapping[str, str] = field(default_factory=dict)


Endpoint = Callable[[AdminRequest], Awaitable[Answer]]


def json_answer(
    payload: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()
) -> Answer:
    return Answer(status, json.dumps(payload).encode(), JSON, headers)


def _error(
    status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> Answer:
    return json_answer({"error": {"code": code, "message": message}}, status, headers)


def _head_too_large() -> Answer:
    return _error(431, "HEADERS_TOO_LARGE", f"the request head is over {MAX_HEAD} bytes")


def _body_too_large() -> Answer:
    return _error(413, "BODY_TOO_LARGE", f"the request body is over {MAX_BODY} bytes")


def _origin_form(target: str) -> str:
    """`http://host:port/path?q` as `/path?q` (RFC 9112 §3.2.2: a server accepts the
    absolute form); any other target as it is."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target
    path = rest[len(rest.split("/", 1)[0]) :]
    return path or "/"


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


class AdminAPI:
    """The endpoints: routes a request to one and returns its answer (no I/O of its own).

    `upstreams` may be a callable: the set grows when `allow_any_service` makes one.
    """

    def __init__(
        self,
        config: Config,
        readiness: Readiness,
        upstreams: Mapping[str, Upstream] | Callable[[], Mapping[str, Upstream]],
        metrics: Metrics,
        *,
        consul_status: Callable[[], Mapping[str, Any]] | None = None,
        events_status: Callable[[], Mapping[str, Any]] | None = None,
        alerts_status: Callable[[], Mapping[str, Any]] | None = None,
        request_shutdown: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.readiness = readiness
        self._upstreams = upstreams if callable(upstreams) else (lambda: upstreams)
        self.metrics = metrics
        self._consul_status = consul_status
        self._events_status = events_status
        self._alerts_status = alerts_status
        self._request_shutdown = request_shutdown
        #: (path pattern, {method: endpoint}); a GET endpoint answers HEAD too.
        self.routes: list[tuple[re.Pattern[str], dict[str, Endpoint]]] = [
            (re.compile(r"/live"), {"GET": self.live}),
            (re.compile(r"/ready"), {"GET": self.ready}),
            (re.compile(r"/metrics"), {"GET": self.metrics_text}),
            (re.compile(r"/v1/status"), {"GET": self.status}),
            (re.compile(r"/v1/breakers/(?P<upstream>[^/]+)/reset"), {"POST": self.reset_breaker}),
            (re.compile(r"/v1/shutdown"), {"POST": self.shutdown}),
            (re.compile(r"/v1/log-level"), {"PUT": self.put_log_level}),
        ]

    def __repr__(self) -> str:
        return f"AdminAPI(ready={self.readiness.ready}, routes={len(self.routes)})"

    async def handle(
        self, method: str, target: str, remote: str | None, body: bytes = b""
    ) -> Answer:
        """The answer to `method target` (a request target: path and any query) from
        `remote`; a HEAD is answered as its GET (the server sends no body)."""
        path = target.partition("?")[0].partition("#")[0]
        for pattern, methods in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            endpoint = methods.get("GET" if method == "HEAD" else method)
            if endpoint is None:
                allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
                return _error(
                    405,
                    "METHOD_NOT_ALLOWED",
                    f"{method} {path}: use {', '.join(allowed)}",
                    (("Allow", ", ".join(allowed)),),
                )
            params = {name: unquote(value) for name, value in match.groupdict().items()}
            return await endpoint(AdminRequest(method, path, remote, body, params))
        return _error(404, "NOT_FOUND", f"no admin endpoint at {path}")

    async def live(self, _: AdminRequest) -> Answer:
        return json_answer({"live": True})

    async def ready(self, _: AdminRequest) -> Answer:
        if self.readiness.ready:
            return json_answer({"ready": True})
        return json_answer({"ready": False, "reasons": self.readiness.reasons()}, 503)

    async def metrics_text(self, _: AdminRequest) -> Answer:
        # The classic 0.0.4 text format: every Prometheus 2.x scraper parses it.
        return Answer(200, generate_latest(self.metrics.registry), CONTENT_TYPE_PLAIN_0_0_4)

    async def status(self, _: AdminRequest) -> Answer:
        config = self.config
        consul = (
            dict(self._consul_status())
            if self._consul_status
            else {"enabled": config.consul.enabled}
        )
        events = dict(self._events_status()) if self._events_status else {"enabled": False}
        alerts = (
            dict(self._alerts_status()) if self._alerts_status else {"firing": [], "pending": []}
        )
        return json_answer(
            {
                "version": __version__,
                "service": {
                    "name": config.service.name,
                    "id": config.service.id,
                    "address": config.service.address,
                    "port": config.service.port,
                    "registration": _registration_state(consul),
                },
                "consul": consul,
                "events": events,
                "ready": self.readiness.ready,
                "not_ready_reasons": self.readiness.reasons(),
                "upstreams": {name: up.status() for name, up in self._upstreams().items()},
                "alerts": alerts,
            }
        )

    async def reset_breaker(self, request: AdminRequest) -> Answer:
        if not _is_loopback(request.remote):
            return _error(403, "FORBIDDEN", "breaker reset is allowed from loopback clients only")
        name = request.params["upstream"]
        upstream = self._upstreams().get(name)
        if upstream is None:
            return _error(404, "NO_ROUTE", f"no upstream named {name!r} is configured")
        before = upstream.breaker.state
        upstream.breaker.reset()
        log.info("circuit_reset", upstream=name, before=before, remote=request.remote)
        return json_answer({"upstream": name, "before": before, "circuit": "closed"})

    async def put_log_level(self, request: AdminRequest) -> Answer:
        if not _is_loopback(request.remote):
            return _error(
                403, "FORBIDDEN", "log level changes are allowed from loopback clients only"
            )
        level = _requested_level(request.body)
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
        return json_answer({"level": level, "previous": previous})

    async def shutdown(self, request: AdminRequest) -> Answer:
        if not _is_loopback(request.remote):
            return _error(403, "FORBIDDEN", "shutdown is allowed from loopback clients only")
        if self._request_shutdown is None:
            return _error(404, "NOT_FOUND", "shutdown is not available here")
        again = self.readiness.draining
        log.info("shutdown_requested", remote=request.remote, again=again)
        # The same path as SIGTERM (a second request cuts the drain short, as a second
        # signal does); the answer goes out before the admin listener closes.
        self._request_shutdown("POST /v1/shutdown")
        self.readiness.draining = True
        return json_answer(
            {
                "shutting_down": True,
                "forced": again,
                "drain_s": self.config.shutdown.drain,
                "grace_s": self.config.shutdown.grace,
            },
            202,
        )


def _wire(answer: Answer, *, with_body: bool, keep_alive: bool) -> bytes:
    head = [
        f"HTTP/1.1 {answer.status} {HTTPStatus(answer.status).phrase}",
        f"Content-Type: {answer.content_type}",
        f"Content-Length: {len(answer.body)}",
        f"Date: {formatdate(usegmt=True)}",
    ]
    head += [f"{name}: {value}" for name, value in answer.headers]
    if not keep_alive:
        head.append("Connection: close")
    wire = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    return wire + answer.body if with_body else wire


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    body: bytes
    keep_alive: bool
    refused: Answer | None  # answered without asking the API (a body over MAX_BODY)


class _Connection(asyncio.Protocol):
    """One admin client: parses its requests and answers them one at a time, in order."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.paused = False
        self.ended = False  # no more requests are read (closing, or answered with close)
        # The request being parsed: bytes received since its head began (while it is
        # incomplete) and the size of its parts (once parsed).
        self.head_bytes = 0
        self.head_size = 0
        self.in_head = True
        self.url = bytearray()
        self.body = bytearray()
        self.too_large = False
        self.expects_continue = False
        # After the head: bytes received (body, chunk framing, trailers) and the body's
        # declared length (-1: none).
        self.rest_bytes = 0
        self.declared = -1
        # Write back-pressure: answers wait while the client is not reading.
        self.writable: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"_Connection(remote={self.remote!r}, queued={len(self.queue)}, ended={self.ended})"

    # --- transport ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if peer else None
        self.server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.queue.clear()
        self.server.connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        self._wake_writer()

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    def _wake_writer(self) -> None:
        writable, self.writable = self.writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def _linger(self) -> None:
        """Half-close after the answer and discard what the client still sends (ended:
        data_received drops it) until it closes too, or LINGER_S passes."""
        transport = self.transport
        assert transport is not None
        transport.write_eof()
        self._set_idle(LINGER_S, transport.abort)

    def _close(self) -> None:
        """Close once what is written has gone out; cut it if the client does not read
        it within the keep-alive timeout (a close alone would wait forever)."""
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size():
            self._set_idle(self.server.keepalive_s, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        if self.in_head:
            self.head_bytes += len(data)
        else:
            self.rest_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request before the upgrade is queued (on_message_complete ran); the
            # admin API speaks nothing else, so it is answered and the connection closed.
            self._stop_reading()
        except httptools.HttpParserError as exc:
            self._refuse(_error(400, "BAD_REQUEST", f"not an HTTP/1.x request: {exc}"))
        else:
            # A head still incomplete after this many bytes is not going to be one the
            # admin API wants (a complete one is measured in on_headers_complete).
            if self.in_head:
                if self.head_bytes > MAX_HEAD:
                    self._refuse(_head_too_large())
            elif self.declared > MAX_BODY or self.rest_bytes > MAX_BODY + MAX_HEAD:
                # Known too large from its head (no `100 Continue` was sent), or a body,
                # its chunk framing and trailers past any sane size: answered now, not
                # after reading it all (trailers are buffered whole by the parser).
                self._refuse(_body_too_large())

    def _refuse(self, answer: Answer) -> None:
        """Answer after what is queued, then close: the rest of the stream is unreadable."""
        self.queue.append(_Request("GET", "", b"", False, answer))
        self._stop_reading()
        self._serve_soon()

    def _stop_reading(self) -> None:
        self.ended = True
        if self.queue and not self.queue[-1].refused:
            self.queue[-1].keep_alive = False
        if not self.queue and self.task is None:
            self._close()

    # --- httptools callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_size = 0
        self.url.clear()
        self.body.clear()
        self.too_large = False
        self.expects_continue = False
        self.rest_bytes = 0
        self.declared = -1

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if not self.in_head:
            return  # a trailer field: counted with the rest of the message
        lname = name.lower()
        if lname == b"expect" and value.strip().lower() == b"100-continue":
            self.expects_continue = True
        elif lname == b"content-length" and value.strip().isdigit():
            self.declared = int(value)  # a bad or second one is the parser's to refuse

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        self.rest_bytes = 0
        if self.head_size > MAX_HEAD or self.declared > MAX_BODY:
            return  # refused (431 once complete; 413 at once, data_received)
        if (
            self.expects_continue
            and self.transport is not None
            and self.parser.get_http_version() == "1.1"  # RFC 9110 §10.1.1: not to 1.0
            and not self.queue
            and self.task is None
        ):
            # Only to the request answered next, so it cannot come before the answer to
            # an earlier one; a pipelined one just sends its body (RFC 9110 §10.1.1).
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > MAX_BODY:
            self.too_large = True
            self.body.clear()
        elif not self.too_large:
            self.body += body

    def on_message_complete(self) -> None:
        refused = None
        keep_alive = self.parser.should_keep_alive()
        if self.head_size > MAX_HEAD:
            refused = _head_too_large()
            keep_alive = False
        elif self.too_large:
            refused = _body_too_large()
            keep_alive = False
        elif (version := self.parser.get_http_version()) not in ("1.0", "1.1"):
            refused = _error(400, "BAD_REQUEST", f"HTTP/{version}: the admin API speaks HTTP/1.1")
            keep_alive = False
        method = self.parser.get_method().decode("latin-1")
        target = _origin_form(self.url.decode("latin-1"))
        self.queue.append(_Request(method, target, bytes(self.body), keep_alive, refused))
        self.in_head = True
        if not keep_alive:
            self.ended = True  # nothing after this request is read
        if len(self.queue) >= MAX_PIPELINED and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._serve_soon()

    # --- answering ------------------------------------------------------------------

    def _serve_soon(self) -> None:
        if self.task is None:
            if self.idle is not None:
                self.idle.cancel()
                self.idle = None
            self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.queue:
            request = self.queue.popleft()
            answer = request.refused
            if answer is None:
                try:
                    answer = await self.server.api.handle(
                        request.method, request.target, self.remote, request.body
                    )
                except Exception:  # one endpoint's bug must not end the server
                    log.exception(
                        "admin_request_failed", method=request.method, target=request.target
                    )
                    answer = _error(
                        500, "INTERNAL", "the admin endpoint failed; see the sidecar's log"
                    )
            keep_alive = request.keep_alive and not self.server.closing
            if transport.is_closing():
                return
            transport.write(
                _wire(answer, with_body=request.method != "HEAD", keep_alive=keep_alive)
            )
            if not keep_alive:
                self.ended = True
                self.queue.clear()
                if request.refused is not None and transport.can_write_eof():
                    self._linger()
                else:
                    self._close()
                return
            if self.paused and len(self.queue) < MAX_PIPELINED // 2:
                self.paused = False
                transport.resume_reading()
            if self.writable is not None:
                # The client is not reading its answers: wait for it, and cut it after
                # the keep-alive timeout rather than buffer answers without end.
                try:
                    await asyncio.wait_for(asyncio.shield(self.writable), self.server.keepalive_s)
                except TimeoutError:
                    self.ended = True
                    self.queue.clear()
                    transport.abort()
                    return
            elif self.queue:
                # Endpoints rarely await anything: without this, a long pipeline would be
                # answered in one go while every other connection, the proxy's included,
                # waited.
                await asyncio.sleep(0)
        self.task = None
        if not self.ended:
            self._arm_idle()
        elif not transport.is_closing():
            self._close()

    def _arm_idle(self) -> None:
        self._set_idle(self.server.keepalive_s, self._expire)

    def _set_idle(self, delay: float, then: Callable[[], object]) -> None:
        """The connection's one timer, replacing any other: `then` after `delay`."""
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(delay, then)

    def _expire(self) -> None:
        self.idle = None
        if self.task is None and self.transport is not None:
            self.ended = True
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # idle this long with answers still unread
            else:
                self.transport.close()

    def close_when_idle(self) -> asyncio.Task[None] | None:
        """Close now if no request is being answered; else after the one in hand (its
        answer says `Connection: close`). Returns the answering task, if any."""
        if self.task is None and self.transport is not None:
            self.ended = True
            self._close()
        return self.task


class AdminServer:
    """Serves an `AdminAPI` on one address: `start`, then `close` at shutdown."""

    def __init__(self, api: AdminAPI, *, keepalive_s: float = KEEPALIVE_S) -> None:
        self.api = api
        self.keepalive_s = keepalive_s
        self.connections: set[_Connection] = set()
        self.closing = False
        self.server: asyncio.Server | None = None

    def __repr__(self) -> str:
        where = [sock.getsockname() for sock in self.server.sockets] if self.server else None
        return f"AdminServer(listening={where}, connections={len(self.connections)})"

    async def start(self, address: Address) -> asyncio.Server:
        """Bind `address` and serve; OSError if it cannot be bound."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Connection(self), address.host, address.port, reuse_address=True
        )
        return self.server

    async def close(self, within: float = 5.0) -> None:
        """Stop accepting, close idle connections now and the others once their current
        answer is written (`within` seconds, then they are cut)."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        busy = [task for conn in list(self.connections) if (task := conn.close_when_idle())]
        if busy:
            _, late = await asyncio.wait(busy, timeout=within)
            for task in late:
                task.cancel()
        for conn in list(self.connections):
            # One closing already is flushing its last answer (the shutdown's own, say).
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()
