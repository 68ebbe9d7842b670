"""OTLP trace export: span records encoded straight to protobuf, sent over HTTP or gRPC.

The SDK's path (a `ReadableSpan` per span, then its generic encoder building one
protobuf message object per attribute) cost about 45 µs of CPU per span here,
more than a whole proxied request. This encoder writes the wire format of
`ExportTraceServiceRequest` (opentelemetry-proto, `trace/v1/trace.proto`) with
bytes concatenation, caching what repeats (attribute keys, the resource and
scope); the tests decode its output with the official protobuf classes and
compare it with the SDK encoder's. Sending follows the OTLP exporter
specification: retry 429, 502, 503, 504 (and gRPC's UNAVAILABLE and
RESOURCE_EXHAUSTED) and connection errors with exponential back-off, honour
`Retry-After`, and give up at the export timeout.
"""

from __future__ import annotations

import gzip
import random
import select
import socket
import ssl
import struct
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

import httptools

from sidecar import __version__
from sidecar.config import TracingConfig

if TYPE_CHECKING:
    from sidecar.telemetry.tracing import SpanRecord

#: SpanKind values of trace.proto.
KINDS: Final = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
#: Span.flags / Link.flags bits (trace.proto SpanFlags): whether the parent (or linked)
#: context is known to be remote. The low 8 bits (W3C trace flags) stay 0, as the SDK
#: leaves them.
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
_STATUS_ERROR: Final = 2
_LINK_FLAGS: Final = b"\x35" + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)  # field 6, fixed32

_RETRY_HTTP: Final = frozenset((429, 502, 503, 504))
#: A string attribute longer than this (characters) is cut: one huge request path must not
#: make a batch too large for the collector (gRPC's default limit is 4 MiB).
MAX_VALUE_CHARS: Final = 4096
#: Spans of one batch are sent in requests of at most about this many bytes.
MAX_REQUEST_BYTES: Final = 2 * 1024 * 1024
USER_AGENT: Final = f"hms-sidecar/{__version__} (OTLP exporter)"


class ExportError(Exception):
    """An export that cannot succeed (a non-retryable answer, or the time ran out)."""


# --- protobuf wire format ------------------------------------------------------------------


#: Every one-byte varint, made once: most tags and lengths of a span are one byte.
_ONE_BYTE: Final[tuple[bytes, ...]] = tuple(bytes((n,)) for n in range(0x80))


def _varint(value: int) -> bytes:
    """An unsigned varint (`value` >= 0: callers mask signed ones to 64 bits)."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if value < 0:
        raise ValueError(f"a varint is unsigned: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings, bytes, messages."""
    size = len(payload)
    if number < 0x10 and size < 0x80:  # tag and length one byte each
        return _ONE_BYTE[number << 3 | 2] + _ONE_BYTE[size] + payload
    return _varint(number << 3 | 2) + _varint(size) + payload


def _string(number: int, text: str) -> bytes:
    return _field(number, text.encode()) if text else b""


def _any_value(value: object) -> bytes:
    """An AnyValue message's content."""
    if isinstance(value, str):
        return _field(1, value[:MAX_VALUE_CHARS].encode("utf-8", "replace"))
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64, two's complement
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    if isinstance(value, bytes):
        return _field(7, value)
    if isinstance(value, list | tuple):  # ArrayValue { repeated AnyValue values = 1; }
        return _field(5, b"".join(_field(1, _any_value(v)) for v in value))
    return _field(1, str(value).encode())


class _Keys(dict[str, bytes]):
    """Encoded `KeyValue.key` fields, made once per attribute name."""

    def __missing__(self, key: str) -> bytes:
        encoded = self[key] = _field(1, key.encode())
        return encoded


_KEYS: Final = _Keys()


def attributes(values: Mapping[str, object], number: int) -> bytes:
    """Repeated KeyValue field `number` for these attributes."""
    keys = _KEYS
    return b"".join(
        [_field(number, keys[key] + _field(2, _any_value(value))) for key, value in values.items()]
    )


def encode_span(record: SpanRecord) -> bytes:
    """One Span message (trace.proto) from a span record."""
    parts = [
        b"\x0a\x10" + record.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + record.span_id.to_bytes(8, "big"),
    ]
    if record.tracestate:
        parts.append(_string(3, record.tracestate))
    if record.parent_id:
        parts.append(b"\x22\x08" + record.parent_id.to_bytes(8, "big"))
    parts.append(_string(5, record.name))
    parts.append(b"\x30" + _varint(KINDS.get(record.kind, 1)))
    parts.append(b"\x39" + struct.pack("<Q", record.start_ns))
    parts.append(b"\x41" + struct.pack("<Q", record.end_ns))
    parts.append(attributes(record.attributes, 9))
    for trace_id, span_id, _ in record.links:
        link = b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big")
        parts.append(_field(13, link + _LINK_FLAGS))
    if record.error is not None:
        parts.append(_field(15, _string(2, record.error) + b"\x18" + _varint(_STATUS_ERROR)))
    else:
        parts.append(b"\x7a\x00")  # an empty Status (unset), as the SDK writes it
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if record.parent_remote else 0)
    parts.append(b"\x85\x01" + struct.pack("<I", flags))  # field 16, fixed32
    return b"".join(parts)


class Encoder:
    """`ExportTraceServiceRequest` bytes for a batch; one resource and one scope."""

    def __init__(self, resource: Mapping[str, object]) -> None:
        self.resource = _field(1, attributes(resource, 1))  # ResourceSpans.resource
        scope = _string(1, "hms-sidecar") + _string(2, __version__)
        self.scope = _field(1, scope)  # ScopeSpans.scope

    @staticmethod
    def span(record: SpanRecord) -> bytes:
        """One encoded span, as a `ScopeSpans.spans` field: what `batch` joins."""
        return _field(2, encode_span(record))

    def requests(self, records: Iterable[SpanRecord]) -> list[bytes]:
        """The records as requests of at most about MAX_REQUEST_BYTES each."""
        return [body for body, _ in self.batch([self.span(record) for record in records])]

    def batch(self, spans: list[bytes]) -> list[tuple[bytes, int]]:
        """Spans encoded by `span` as requests of at most about MAX_REQUEST_BYTES each,
        with the number of spans in each (each request succeeds or fails on its own)."""
        if sum(map(len, spans)) <= MAX_REQUEST_BYTES:
            # The usual case, without a Python loop: the export thread holds the GIL
            # for a few µs here instead of about 0.15 ms per 512 spans.
            return [(self._request(spans), len(spans))] if spans else []
        out: list[tuple[bytes, int]] = []
        chunk: list[bytes] = []
        size = 0
        for span in spans:
            if chunk and size + len(span) > MAX_REQUEST_BYTES:
                out.append((self._request(chunk), len(chunk)))
                chunk, size = [], 0
            chunk.append(span)
            size += len(span)
        if chunk:
            out.append((self._request(chunk), len(chunk)))
        return out

    def _request(self, spans: list[bytes]) -> bytes:
        resource_spans = self.resource + _field(2, self.scope + b"".join(spans))
        return _field(1, resource_spans)


# --- transports ----------------------------------------------------------------------------


class Transport(Protocol):
    def send(self, body: bytes, deadline: float) -> None:
        """Deliver one request before `deadline` (monotonic); ExportError if it cannot."""

    def close(self) -> None: ...


def _backoff(attempt: int, rng: random.Random) -> float:
    """1 s, 2 s, 4 s, ... with ±20 % jitter: the OTLP exporters' schedule."""
    return float(2**attempt) * rng.uniform(0.8, 1.2)


class _Answer:
    """httptools callbacks that collect the answer to one export (after any 1xx).

    Anything after the answer (a second response, garbage) is not read as part of it:
    it marks the connection out of step (`extra`), and the answer stands.
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0  # of the final answer, once its head is complete
        self.keep_alive = True
        self.retry_after: bytes | None = None
        self.body = b""  # its first bytes, for the error message
        self.done = False
        self.extra = False  # bytes came after the answer
        self.switched = False  # the answer is a 101: the collector switched protocols

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True
            return
        self.retry_after = None
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done and len(name) == 11 and name.lower() == b"retry-after":
            self.retry_after = value

    def on_headers_complete(self) -> None:
        if self.done:
            return
        status = self.parser.get_status_code()
        if status >= 200:
            self.status = status
            self.keep_alive = bool(self.parser.should_keep_alive())
        elif status == 101:
            self.switched = True

    def on_body(self, body: bytes) -> None:
        if not self.done and len(self.body) < 200:
            self.body += body[:200]

    def on_message_complete(self) -> None:
        if self.status:
            self.done = True


class HttpTransport:
    """OTLP/HTTP (protobuf): POST to the traces URL over one kept-alive connection.

    Plain sockets and httptools rather than http.client: the export thread then holds
    the GIL for a few microseconds between its system calls. http.client's request
    building and header parsing ran a few hundred microseconds of Python per export,
    each time making the event loop wait for the GIL: with every request sampled the
    compiled proxy served 14 % more requests without it (docs/performance.md).
    """

    def __init__(self, config: TracingConfig) -> None:
        assert config.endpoint is not None
        url = urlsplit(config.endpoint)
        self.https = url.scheme == "https"
        self.host = url.hostname or "localhost"
        self.port = url.port or (443 if self.https else 80)
        self.path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.gzip = config.compression == "gzip"
        # By lower-cased name: a configured field replaces the exporter's own.
        fields = {
            "content-type": ("Content-Type", "application/x-protobuf"),
            "user-agent": ("User-Agent", USER_AGENT),
        }
        for name, value in config.headers:
            fields[name.lower()] = (name, value)
        if self.gzip:
            fields["content-encoding"] = ("Content-Encoding", "gzip")
        # The head up to Content-Length's value, as http.client wrote it: Host first and
        # Accept-Encoding: identity, unless configured; a host name in IDNA.
        host = self.host
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        authority = f"[{host}]" if ":" in host else host
        if self.port != (443 if self.https else 80):
            authority += f":{self.port}"
        name, value = fields.pop("host", ("Host", authority))
        lines = [f"POST {self.path} HTTP/1.1", f"{name}: {value}"]  # Host first (RFC 9110)
        if "accept-encoding" not in fields:
            lines.append("Accept-Encoding: identity")
        lines += [f"{name}: {value}" for name, value in fields.values()]
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        # Made once: loading the system's CA certificates takes milliseconds of the GIL.
        self._tls: ssl.SSLContext | None = None
        if self.https:
            self._tls = ssl.create_default_context()
            self._tls.set_alpn_protocols(["http/1.1"])
        self._sock: socket.socket | None = None
        self._rng = random.Random()

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), _left(deadline))
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            except ssl.SSLCertVerificationError as exc:
                sock.close()
                # Not retried: the same certificate comes back on every attempt.
                raise ExportError(f"the collector's certificate was refused: {exc}") from None
            except BaseException:
                sock.close()
                raise
        return sock

    def _exchange(self, request: bytes, deadline: float) -> _Answer | None:
        """Send `request` and read its answer before `deadline`. None when a kept-alive
        connection failed before a byte of the answer came: the collector had closed it
        while idle (its keep-alive timeout), and the request can go again at once on a
        new connection."""
        sock = self._sock
        if sock is not None and _readable(sock):
            # Bytes nobody asked for, or the collector's close (its idle timeout): either
            # way the connection is out of step or gone. A new one instead.
            self.close()
            sock = None
        reused = sock is not None
        if sock is None:
            sock = self._sock = self._connect(deadline)
        answer = _Answer()
        got = False  # a byte of the answer came
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(request)
            while not answer.done:
                sock.settimeout(_left(deadline))
                data = sock.recv(65536)
                if not data:
                    if answer.status and not answer.keep_alive:
                        break  # a body delimited by the close: complete
                    raise ConnectionError("the collector closed the connection before answering")
                got = True
                try:
                    answer.parser.feed_data(data)
                except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                    if answer.switched:  # llhttp stops at a 101, with or without Upgrade
                        raise ExportError("HTTP 101: the collector switched protocols") from None
                    if not answer.done:
                        raise
                    answer.extra = True  # garbage after the answer, which stands
        except OSError as exc:
            self.close()
            if reused and not got and not isinstance(exc, TimeoutError):
                return None
            raise
        except BaseException:
            self.close()
            raise
        if not answer.keep_alive or answer.extra:
            self.close()  # nothing more can be read from it in step
        return answer

    def send(self, body: bytes, deadline: float) -> None:
        if self.gzip:
            body = gzip.compress(body, compresslevel=5)
        request = b"".join((self._head, b"%d\r\n\r\n" % len(body), body))  # one copy
        attempt = 0
        while True:
            if deadline - time.monotonic() <= 0:
                raise ExportError("the export timeout passed")
            retry_after: float | None = None
            try:
                answer = self._exchange(request, deadline)
                if answer is None:  # a stale kept-alive connection: again, on a new one
                    answer = self._exchange(request, deadline)
                    assert answer is not None  # a new connection is never stale
            except (OSError, httptools.HttpParserError) as exc:  # closed by _exchange
                reason = f"{type(exc).__name__}: {exc}"
            else:
                status = answer.status
                if 200 <= status < 300:
                    return
                reason = f"HTTP {status}: {answer.body[:200]!r}"
                if status not in _RETRY_HTTP:
                    raise ExportError(reason)
                header = answer.retry_after
                if header is not None and header.strip().isdigit():
                    retry_after = float(header.strip())
            delay = retry_after if retry_after is not None else _backoff(attempt, self._rng)
            attempt += 1
            if time.monotonic() + delay >= deadline:
                raise ExportError(f"{reason} (no time left to retry)")
            time.sleep(delay)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _readable(sock: socket.socket) -> bool:
    """Whether an idle connection has something to read: data or its end (or TLS bytes
    already decrypted)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True  # closed under us: not reusable either
    return bool(readable)


def _left(deadline: float) -> float:
    """Seconds until `deadline` (monotonic), as a socket timeout: TimeoutError once past."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the export timeout passed")
    return left


class GrpcTransport:
    """OTLP/gRPC: TraceService/Export with the encoded request as the raw message."""

    METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

    def __init__(self, config: TracingConfig) -> None:
        import grpc  # noqa: PLC0415 - only with protocol grpc

        endpoint = config.endpoint or "http://localhost:4317"
        url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        host = url.hostname or "localhost"
        target = f"[{host}]:{url.port or 4317}" if ":" in host else f"{host}:{url.port or 4317}"
        if url.scheme == "https":
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            self.channel = grpc.insecure_channel(target)
        self.export = self.channel.unary_unary(self.METHOD)  # bytes in, bytes out
        self.metadata = tuple((k.lower(), v) for k, v in config.headers)
        self.compression = grpc.Compression.Gzip if config.compression == "gzip" else None
        self._grpc = grpc
        # The OTLP spec's retryable codes; RESOURCE_EXHAUSTED only with the server's retry
        # information, which grpcio does not surface: a message too large never succeeds.
        self._retry = {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.CANCELLED,
        }
        self._rng = random.Random()

    def send(self, body: bytes, deadline: float) -> None:
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExportError("the export timeout passed")
            try:
                self.export(
                    body, timeout=left, metadata=self.metadata, compression=self.compression
                )
                return
            except self._grpc.RpcError as exc:
                code = exc.code()
                reason = f"gRPC {code.name}: {exc.details()}"
                if code not in self._retry:
                    raise ExportError(reason) from None
            delay = _backoff(attempt, self._rng)
            attempt += 1
            if time.monotonic() + delay >= deadline:
                raise ExportError(f"{reason} (no time left to retry)")
            time.sleep(delay)

    def close(self) -> None:
        self.channel.close()


def transport(config: TracingConfig) -> Transport:
    return GrpcTransport(config) if config.protocol == "grpc" else HttpTransport(config)
