"""An OTLP trace collector double, for Jaeger's OTLP receiver (the OpenTelemetry Collector's
`otlpreceiver`), which cannot run here: OTLP/HTTP `POST /v1/traces` and OTLP/gRPC
`TraceService/Export` on 127.0.0.1, one span store.

HTTP answers as the Collector's (`otlphttp.go`, `confighttp`): Content-Encoding exactly "",
gzip, deflate or zlib, else 400 (`identity` too); unknown path 404; not POST 405; media type
not application/x-protobuf or application/json 415; over 20 MiB (also once inflated) or
undecodable 400. Errors after the media-type check are a `google.rpc.Status`, and answers
use the request's encoding. OTLP/JSON ids are hex; ids of the wrong length are refused, as
pdata refuses them. Deviations: zstd/snappy/lz4 are 400 here; no `Status.details` on HTTP.
gRPC keeps grpcio's 4 MiB message limit, the Collector's default too.

Test controls: `fail_next(n, status)` (gRPC: the code the Collector pairs with that status),
`pause()`/`resume()` for a slow collector, `wait_for` (waits on state, fails with what came).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple, Self

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]
from google.rpc.status_pb2 import Status  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

TRACES_PATH = "/v1/traces"
GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: The Collector's default `max_request_body_size`, compressed and inflated alike.
MAX_BODY = 20 * 1024 * 1024
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
#: Content-Encoding -> zlib wbits (16+15: a gzip wrapper; 15: a zlib wrapper, as Go's "deflate").
_INFLATE = {"gzip": 31, "deflate": 15, "zlib": 15}
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_ID_FIELDS = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")
#: HTTP status -> gRPC code, as the Collector's statusutil.NewStatusFromMsgAndHTTPCode maps it.
_GRPC_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
              404: "UNIMPLEMENTED", 429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE",
              503: "UNAVAILABLE", 504: "UNAVAILABLE"}  # fmt: skip


class Event(NamedTuple):
    name: str
    attributes: dict[str, Any]


class Link(NamedTuple):
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    """One received span, decoded: ids in lowercase hex, enums by their short names."""

    name: str
    kind: str  # SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL (UNSPECIFIED if unset)
    trace_id: str
    span_id: str
    parent_span_id: str | None
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: str  # UNSET, OK, ERROR
    status_message: str
    events: list[Event]
    links: list[Link]
    resource: dict[str, Any]
    scope_name: str
    scope_version: str
    trace_state: str
    parent_is_remote: bool | None  # None: the sender did not say (SpanFlags)

    def __str__(self) -> str:
        parent = f" parent={self.parent_span_id}" if self.parent_span_id else ""
        return f"{self.name!r} {self.kind} trace={self.trace_id} span={self.span_id}{parent}"


@dataclass
class RecordedRequest:
    """One request that reached the double. `status`: None while held, else the HTTP status
    answered (for gRPC, the HTTP status of the failure that was injected, 200 if none)."""

    transport: str  # "http" or "grpc"
    method: str
    path: str
    headers: dict[str, str]  # keys in lower case
    span_count: int = 0
    status: int | None = None

    def __str__(self) -> str:
        return f"{self.transport} {self.method} {self.path} -> {self.status} ({self.span_count})"


class _BadData(Exception):
    """The body cannot be read or decoded: 400 (gRPC: INTERNAL, a codec failure)."""


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _id(raw: bytes, size: int, what: str) -> str:
    if len(raw) not in (0, size):
        raise _BadData(f"invalid length for {what}")
    return (raw or bytes(size)).hex()


def _enum(wrapper: Any, value: int, prefix: str) -> str:
    try:
        return str(wrapper.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def _span(s: trace_pb2.Span, resource: dict[str, Any], scope: InstrumentationScope) -> Span:
    remote = None
    if s.flags & trace_pb2.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK:
        remote = bool(s.flags & trace_pb2.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK)
    links = [
        Link(_id(k.trace_id, 16, "TraceID"), _id(k.span_id, 8, "SpanID"), _attributes(k.attributes))
        for k in s.links
    ]
    return Span(
        name=s.name,
        kind=_enum(trace_pb2.Span.SpanKind, s.kind, "SPAN_KIND_"),
        trace_id=_id(s.trace_id, 16, "TraceID"),
        span_id=_id(s.span_id, 8, "SpanID"),
        parent_span_id=_id(s.parent_span_id, 8, "SpanID") if s.parent_span_id else None,
        start_ns=s.start_time_unix_nano,
        end_ns=s.end_time_unix_nano,
        attributes=_attributes(s.attributes),
        status_code=_enum(trace_pb2.Status.StatusCode, s.status.code, "STATUS_CODE_"),
        status_message=s.status.message,
        events=[Event(e.name, _attributes(e.attributes)) for e in s.events],
        links=links,
        resource=dict(resource),
        scope_name=scope.name,
        scope_version=scope.version,
        trace_state=s.trace_state,
        parent_is_remote=remote,
    )


def decode_spans(request: ExportTraceServiceRequest) -> list[Span]:
    """The spans of one export, in order, each with its resource and scope."""
    return [
        _span(span, _attributes(resource.resource.attributes), scope.scope)
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]


def _hex_ids_to_base64(node: object) -> None:
    """OTLP/JSON writes span and link ids in hex; json_format reads bytes fields as base64."""
    if isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key not in _ID_FIELDS:
                _hex_ids_to_base64(value)
            elif isinstance(value, str) and _HEX.fullmatch(value):
                node[key] = base64.b64encode(bytes.fromhex(value)).decode()
            else:
                raise _BadData(f"{key}: not a hex string: {value!r}")


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    """An `ExportTraceServiceRequest` from OTLP/JSON (hex ids, unknown fields ignored)."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise _BadData(str(exc)) from None
    if not isinstance(document, dict):
        raise _BadData("the body is not a JSON object")
    _hex_ids_to_base64(document)
    try:
        return json_format.ParseDict(
            document, ExportTraceServiceRequest(), ignore_unknown_fields=True
        )
    except json_format.ParseError as exc:
        raise _BadData(str(exc)) from None


def _inflate(data: bytes, wbits: int) -> bytes:
    out = bytearray()
    while data:  # gzip: Go reads every member of a multi-member stream
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(data, MAX_BODY + 1 - len(out))
        except zlib.error as exc:
            raise _BadData(str(exc)) from None
        if len(out) > MAX_BODY:
            raise _BadData("http: request body too large")
        if not inflater.eof:
            raise _BadData("unexpected EOF")
        data = inflater.unused_data if wbits == _INFLATE["gzip"] else b""
    return bytes(out)


class OtlpCollector:
    """The double; see the module docstring. `async with OtlpCollector() as collector:` serves
    OTLP/HTTP; `grpc=True` adds OTLP/gRPC (Jaeger listens on both); `http=False` drops HTTP."""

    def __init__(self, *, http: bool = True, grpc: bool = False) -> None:
        if not (http or grpc):
            raise ValueError("enable http, grpc or both")
        self.spans: list[Span] = []
        self.requests: list[RecordedRequest] = []
        self._want_http, self._want_grpc = http, grpc
        self._http_port: int | None = None
        self._grpc_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._grpc_server: Any = None
        self._failures: list[tuple[int, int | None]] = []
        self._open = asyncio.Event()
        self._open.set()
        self._changed = asyncio.Event()

    # --- life ----------------------------------------------------------------------------------

    async def start(self) -> Self:
        if self._want_http:
            app = web.Application(client_max_size=MAX_BODY)
            app.router.add_route("*", "/{tail:.*}", self._handle_http)
            self._runner = web.AppRunner(
                app, access_log=None, handle_signals=False, auto_decompress=False
            )
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", 0).start()
            self._http_port = self._runner.addresses[0][1]
        if self._want_grpc:
            self._grpc_server = grpc.aio.server()
            servicer = SimpleNamespace(Export=self._export_grpc)  # the generated servicer's name
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
                servicer, self._grpc_server
            )
            self._grpc_port = self._grpc_server.add_insecure_port("127.0.0.1:0")
            await self._grpc_server.start()
        return self

    async def stop(self) -> None:
        self._open.set()  # held answers go out before the servers close
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=1.0)
            self._grpc_server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def http_endpoint(self) -> str:
        """The base URL, for OTEL_EXPORTER_OTLP_ENDPOINT (the SDK appends /v1/traces)."""
        if self._http_port is None:
            raise RuntimeError("OTLP/HTTP is not serving")
        return f"http://127.0.0.1:{self._http_port}"

    @property
    def traces_url(self) -> str:
        """The full URL, for an exporter's `endpoint=` (used as is)."""
        return self.http_endpoint + TRACES_PATH

    @property
    def grpc_endpoint(self) -> str:
        if self._grpc_port is None:
            raise RuntimeError("OTLP/gRPC is not serving")
        return f"http://127.0.0.1:{self._grpc_port}"

    # --- test controls -------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 503, *, retry_after: int | None = None) -> None:
        """Answer the next n exports with `status` (their spans are not stored). `retry_after`
        (429/503 only, as the Collector): HTTP `Retry-After` seconds; gRPC a RetryInfo in the
        status details."""
        if retry_after is not None and status not in (429, 503):
            raise ValueError("the Collector sends Retry-After only with 429 and 503")
        self._failures += [(status, retry_after)] * n

    def pause(self) -> None:
        """Hold every answer (requests are recorded on arrival) until `resume`."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    def clear(self) -> None:
        self.spans.clear()
        self.requests.clear()

    # --- queries -------------------------------------------------------------------------------

    def by_name(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def children(self, span: Span) -> list[Span]:
        return [s for s in self.trace(span.trace_id) if s.parent_span_id == span.span_id]

    async def wait_until(self, condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
        """Return once `condition()` holds (checked at each change); AssertionError after
        `timeout` seconds, listing what arrived."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"not reached within {timeout} s; {self._summary()}") from None

    async def wait_for(
        self,
        predicate: Callable[[Span], bool] | str | None = None,
        *,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[Span]:
        """The received spans that match (a predicate, or a span name), once at least `count`
        have arrived."""

        def check(span: Span) -> bool:
            if isinstance(predicate, str):
                return span.name == predicate
            return predicate is None or predicate(span)

        await self.wait_until(lambda: sum(map(check, self.spans)) >= count, timeout=timeout)
        return [s for s in self.spans if check(s)]

    def _summary(self) -> str:
        spans = "".join(f"\n  {s}" for s in self.spans) or " none"
        requests = "".join(f"\n  {r}" for r in self.requests) or " none"
        return f"spans:{spans}\nrequests:{requests}"

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- receiving -----------------------------------------------------------------------------

    def _arrived(self, record: RecordedRequest) -> RecordedRequest:
        self.requests.append(record)
        self._wake()
        return record

    async def _accept(self, record: RecordedRequest, spans: list[Span]) -> tuple[int, int | None]:
        """Hold while paused, then fail on purpose or store: (HTTP status, retry_after)."""
        record.span_count = len(spans)
        await self._open.wait()
        status, retry_after = self._failures.pop(0) if self._failures else (200, None)
        if status == 200:
            self.spans += spans
        record.status = status
        self._wake()
        return status, retry_after

    async def _handle_http(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = self._arrived(RecordedRequest("http", request.method, request.path, headers))
        response = await self._answer_http(request, record)
        if record.status is None:
            record.status = response.status
            self._wake()
        return response

    async def _answer_http(self, request: web.Request, record: RecordedRequest) -> web.Response:
        raw_type = request.headers.get("Content-Type", "")
        media = request.content_type if raw_type else ""
        encoding = request.headers.get("Content-Encoding", "")
        if encoding and encoding not in _INFLATE:
            message = f"unsupported Content-Encoding: {encoding}"
            if media in ("", JSON, PROTOBUF):  # the Collector's errorHandler: JSON if unset
                return _status(400, message, media or JSON)
            body = b'{"code": 13, "message": "failed to marshal error message"}'
            return web.Response(status=500, body=body, content_type=JSON)
        if request.path != TRACES_PATH:
            return web.Response(status=404, text="404 page not found\n", charset="utf-8")
        if request.method != "POST":
            return _plain(405, "405 method not allowed, supported: [POST]")
        if media not in (JSON, PROTOBUF):
            return _plain(415, f"415 unsupported media type, supported: [{JSON}, {PROTOBUF}]")
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise _BadData("http: request body too large") from None
            if encoding:
                body = _inflate(body, _INFLATE[encoding])
            if media == JSON:
                export = parse_json(body)
            else:
                try:
                    export = ExportTraceServiceRequest.FromString(body)
                except DecodeError as exc:
                    raise _BadData(str(exc)) from None
            spans = decode_spans(export)
        except _BadData as exc:
            return _status(400, str(exc), media)
        status, retry_after = await self._accept(record, spans)
        if status != 200:
            response = _status(status, "injected failure", media)
            if retry_after is not None:
                response.headers["Retry-After"] = str(retry_after)
            return response
        answer = ExportTraceServiceResponse()
        if media == JSON:
            return web.Response(body=json_format.MessageToJson(answer).encode(), content_type=JSON)
        return web.Response(body=answer.SerializeToString(), content_type=PROTOBUF)

    async def _export_grpc(
        self, request: ExportTraceServiceRequest, context: Any
    ) -> ExportTraceServiceResponse:
        metadata = {str(m.key).lower(): str(m.value) for m in context.invocation_metadata()}
        record = self._arrived(RecordedRequest("grpc", "POST", GRPC_METHOD, metadata))
        try:
            spans = decode_spans(request)
        except _BadData as exc:
            record.status = 500  # INTERNAL, as the Collector maps it to HTTP
            self._wake()
            message = f"grpc: error unmarshalling request: {exc}"
            await context.abort(grpc.StatusCode.INTERNAL, message)  # raises
        status, retry_after = await self._accept(record, spans)
        if status != 200:
            code = grpc.StatusCode[_GRPC_CODE.get(status, "UNKNOWN")]
            detail = Status(code=code.value[0], message="injected failure")
            if retry_after is not None:
                detail.details.add().Pack(RetryInfo(retry_delay=Duration(seconds=retry_after)))
            trailer = (("grpc-status-details-bin", detail.SerializeToString()),)
            await context.abort(code, "injected failure", trailing_metadata=trailer)
        return ExportTraceServiceResponse()

    def __repr__(self) -> str:
        http = self._http_port and self.http_endpoint
        grpc_ = self._grpc_port and self.grpc_endpoint
        return (
            f"<OtlpCollector http={http} grpc={grpc_} spans={len(self.spans)} "
            f"requests={len(self.requests)} paused={self.paused} failing={len(self._failures)}>"
        )


def _status(http_status: int, message: str, media: str) -> web.Response:
    """A google.rpc.Status in the request's encoding, its code paired with `http_status`."""
    code = grpc.StatusCode[_GRPC_CODE.get(http_status, "UNKNOWN")].value[0]
    status = Status(code=code, message=message)
    body = json_format.MessageToJson(status, indent=None) if media == JSON else None
    return web.Response(
        status=http_status,
        body=body.encode() if body else status.SerializeToString(),
        content_type=media,
    )


def _plain(http_status: int, text: str) -> web.Response:
    """Go's `writeResponse(w, "text/plain", ...)`: no charset parameter."""
    return web.Response(
        status=http_status, body=text.encode(), headers={"Content-Type": "text/plain"}
    )
