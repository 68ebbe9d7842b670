"""The OTLP collector double against clients nobody here wrote: the OpenTelemetry SDK's
OTLP/HTTP and OTLP/gRPC span exporters (blocking, so they run in a thread while the double
serves on the loop), and raw aiohttp requests for the receiver's strictness. Each rule the
double copies from the Collector (`receiver/otlpreceiver`, `config/confighttp`) or the OTLP
specification is pinned here."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format
from google.rpc.status_pb2 import Status  # type: ignore[import-untyped]
from multidict import CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.doubles.otlp import MAX_BODY, Link, OtlpCollector, Span

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
RESOURCE = {"service.name": "checkout", "deployment.environment.name": "test"}
Work = Callable[[trace.Tracer], None]


# --- helpers ----------------------------------------------------------------------------------


def make_spans(work: Work) -> Sequence[ReadableSpan]:
    """Finished SDK spans from `work`, kept in memory (no export yet)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    try:
        work(provider.get_tracer("tests.otlp", "1.2.3"))
    finally:
        provider.shutdown()
    return memory.get_finished_spans()


async def run_pipeline(exporter: SpanExporter, work: Work, *, batch: bool = False) -> None:
    """The SDK pipeline a service runs: a provider, a span processor, the exporter. `work`
    and the shutdown (which flushes a batch processor) run in a thread: exports block."""
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    try:
        await asyncio.to_thread(work, provider.get_tracer("tests.otlp", "1.2.3"))
    finally:
        await asyncio.to_thread(provider.shutdown)


async def export_once(exporter: SpanExporter, spans: Sequence[ReadableSpan]) -> SpanExportResult:
    """One `export()` call, retries included, then shut the exporter down."""
    try:
        return await asyncio.to_thread(exporter.export, spans)
    finally:
        await asyncio.to_thread(exporter.shutdown)


def one_span(tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("op"):
        pass


def parent_and_child(tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("parent"), tracer.start_as_current_span("child"):
        pass


def http_exporter(collector: OtlpCollector, **kwargs: Any) -> OTLPSpanExporter:
    return OTLPSpanExporter(endpoint=collector.traces_url, **kwargs)


def grpc_exporter(collector: OtlpCollector, **kwargs: Any) -> GrpcSpanExporter:
    return GrpcSpanExporter(endpoint=collector.grpc_endpoint, insecure=True, **kwargs)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer from the double, read whole."""

    status: int
    body: bytes
    headers: CIMultiDictProxy[str]

    @property
    def text(self) -> str:
        return self.body.decode()

    def rpc_status(self) -> Any:
        """The body as a `google.rpc.Status`, in the encoding the answer declares."""
        status = Status()
        if self.headers["Content-Type"] == JSON:
            json_format.Parse(self.body, status)
        else:
            status.ParseFromString(self.body)
        return status


class Raw:
    """Raw HTTP against the double, for what the SDK never sends."""

    def __init__(self, session: aiohttp.ClientSession, collector: OtlpCollector) -> None:
        self.session = session
        self.collector = collector

    async def send(
        self,
        body: bytes = b"",
        *,
        content_type: str | None = PROTOBUF,
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
        path: str = "/v1/traces",
    ) -> Answer:
        sent = dict(headers or {})
        if content_type is not None:
            sent["Content-Type"] = content_type
        async with self.session.request(
            method,
            self.collector.http_endpoint + path,
            data=io.BytesIO(body),  # aiohttp warns on large bytes bodies
            headers=sent,
            skip_auto_headers=("Content-Type",),
            auto_decompress=False,
        ) as response:
            return Answer(response.status, await response.read(), response.headers)

    async def send_json(self, document: object, **kwargs: Any) -> Answer:
        kwargs.setdefault("content_type", JSON)
        return await self.send(json.dumps(document).encode(), **kwargs)


def otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """OTLP/JSON for SDK spans: the proto3 JSON mapping, then ids in hex as OTLP wants."""
    document = json_format.MessageToDict(encode_spans(spans))
    for resource in document["resourceSpans"]:
        for scope in resource["scopeSpans"]:
            for span in scope["spans"]:
                for item in [span, *span.get("links", [])]:
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in item:
                            item[key] = base64.b64decode(item[key]).hex()
    return document


def json_span(**fields: Any) -> dict[str, Any]:
    """A minimal OTLP/JSON request holding one span with `fields`."""
    span: dict[str, Any] = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
    }
    span |= {"name": "op", "kind": 2, "startTimeUnixNano": "1", "endTimeUnixNano": "2", **fields}
    return {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's OTEL_* settings (endpoint, headers, compression) must not leak in."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)


@pytest.fixture
async def collector() -> AsyncIterator[OtlpCollector]:
    async with OtlpCollector() as double:
        yield double


@pytest.fixture
async def grpc_collector() -> AsyncIterator[OtlpCollector]:
    async with OtlpCollector(http=False, grpc=True) as double:
        yield double


@pytest.fixture
async def raw(collector: OtlpCollector) -> AsyncIterator[Raw]:
    async with aiohttp.ClientSession() as session:
        yield Raw(session, collector)


# --- the SDK over OTLP/HTTP ---------------------------------------------------------------


class TestHttpExport:
    async def test_parent_and_child_share_a_trace(self, collector: OtlpCollector) -> None:
        """A child carries its parent's trace id and the parent's span id; ids are lowercase
        hex, 32 and 16 characters; `trace` and `children` follow them."""
        await run_pipeline(http_exporter(collector), parent_and_child)
        [parent] = collector.by_name("parent")
        [child] = collector.by_name("child")
        assert (parent.trace_id, parent.span_id) == (child.trace_id, child.parent_span_id)
        assert None is parent.parent_span_id
        assert (32, 16) == (len(child.trace_id), len(child.span_id))
        assert child.trace_id == child.trace_id.lower()
        assert [child] == collector.children(parent)
        assert {"parent", "child"} == {s.name for s in collector.trace(parent.trace_id)}

    async def test_spans_arrive_in_export_order(self, collector: OtlpCollector) -> None:
        """`spans` is in arrival order: a simple processor exports each span as it ends."""
        await run_pipeline(http_exporter(collector), parent_and_child)
        assert ["child", "parent"] == [s.name for s in collector.spans]

    async def test_attributes_of_every_value_type(self, collector: OtlpCollector) -> None:
        """string, bool, int, double, bytes, arrays (also mixed and nested), maps (kvlist)
        and an empty value decode to the Python values the SDK was given (arrays as lists)."""
        attributes: dict[str, Any] = {
            "s": "text",
            "b": True,
            "i": -7,
            "f": 1.5,
            "raw": b"\x00\xff",
            "strings": ["a", "b"],
            "bools": [True, False],
            "ints": [1, 2],
            "floats": [0.5],
            "mixed": [1, "a"],
            "nested": [[1], [2]],
            "map": {"k": "v", "inner": {"n": 1}},
            "none": None,
        }

        def work(tracer: trace.Tracer) -> None:
            with tracer.start_as_current_span("op", attributes=attributes):
                pass

        await run_pipeline(http_exporter(collector), work)
        assert attributes == collector.spans[0].attributes

    async def test_resource_and_scope(self, collector: OtlpCollector) -> None:
        """Resource attributes come with every span; the scope is the tracer's name/version."""
        await run_pipeline(http_exporter(collector), one_span)
        span = collector.spans[0]
        assert RESOURCE.items() <= span.resource.items()
        assert "python" == span.resource["telemetry.sdk.language"]
        assert ("tests.otlp", "1.2.3") == (span.scope_name, span.scope_version)

    async def test_span_kinds(self, collector: OtlpCollector) -> None:
        """Each SpanKind arrives by its short name."""
        kinds = ["SERVER", "CLIENT", "PRODUCER", "CONSUMER", "INTERNAL"]

        def work(tracer: trace.Tracer) -> None:
            for kind in kinds:
                with tracer.start_as_current_span(kind.lower(), kind=trace.SpanKind[kind]):
                    pass

        await run_pipeline(http_exporter(collector), work)
        assert kinds == [s.kind for s in collector.spans]

    async def test_status_events_and_exceptions(self, collector: OtlpCollector) -> None:
        """UNSET by default; OK; ERROR with its message; events keep their attributes, and a
        recorded exception is an `exception` event."""

        def work(tracer: trace.Tracer) -> None:
            with tracer.start_as_current_span("unset") as span:
                span.add_event("retry", {"attempt": 2})
            with tracer.start_as_current_span("ok") as span:
                span.set_status(trace.StatusCode.OK)
            with tracer.start_as_current_span("error") as span:
                span.set_status(trace.Status(trace.StatusCode.ERROR, "upstream refused"))
                span.record_exception(ConnectionRefusedError("no"))

        await run_pipeline(http_exporter(collector), work)
        unset, ok, error = collector.spans
        statuses = [(s.status_code, s.status_message) for s in collector.spans]
        assert [("UNSET", ""), ("OK", ""), ("ERROR", "upstream refused")] == statuses
        assert [("retry", {"attempt": 2})] == unset.events
        [exception] = error.events
        assert "exception" == exception.name
        assert "ConnectionRefusedError" == exception.attributes["exception.type"]
        assert [] == ok.events
        assert unset.start_ns <= unset.end_ns

    async def test_links(self, collector: OtlpCollector) -> None:
        """A link names the linked span's trace and span ids and keeps its attributes."""

        def work(tracer: trace.Tracer) -> None:
            with tracer.start_as_current_span("publish", kind=trace.SpanKind.PRODUCER) as sent:
                context = sent.get_span_context()
            link = trace.Link(context, {"messaging.operation.type": "receive"})
            with tracer.start_as_current_span("deliver", links=[link]):
                pass

        await run_pipeline(http_exporter(collector), work)
        publish, deliver = collector.spans
        expected = Link(publish.trace_id, publish.span_id, {"messaging.operation.type": "receive"})
        assert [expected] == deliver.links
        assert publish.trace_id != deliver.trace_id

    async def test_remote_parent_and_trace_state(self, collector: OtlpCollector) -> None:
        """A parent from `traceparent` is remote (SpanFlags), a local one is not; the span
        inherits the incoming `tracestate`."""
        incoming = {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "congo=t61rcWkgMzE",
        }

        def work(tracer: trace.Tracer) -> None:
            context = TraceContextTextMapPropagator().extract(incoming)
            with tracer.start_as_current_span("server", context=context):
                one_span(tracer)

        await run_pipeline(http_exporter(collector), work)
        [server] = collector.by_name("server")
        [local] = collector.by_name("op")
        assert "0af7651916cd43dd8448eb211c80319c" == server.trace_id
        assert ("b7ad6b7169203331", True) == (server.parent_span_id, server.parent_is_remote)
        assert False is local.parent_is_remote
        assert "congo=t61rcWkgMzE" == server.trace_state

    @pytest.mark.parametrize("compression", [Compression.Gzip, Compression.Deflate])
    async def test_compressed_exports(
        self, collector: OtlpCollector, compression: Compression
    ) -> None:
        """gzip and deflate bodies (Content-Encoding set by the SDK) are inflated."""
        await run_pipeline(http_exporter(collector, compression=compression), parent_and_child)
        assert 2 == len(collector.spans)
        assert compression.value == collector.requests[0].headers["content-encoding"]

    async def test_batch_processor_sends_one_request(self, collector: OtlpCollector) -> None:
        """A batch processor flushes all spans in one request at shutdown."""

        def work(tracer: trace.Tracer) -> None:
            for _ in range(5):
                one_span(tracer)

        await run_pipeline(http_exporter(collector), work, batch=True)
        assert [(200, 5)] == [(r.status, r.span_count) for r in collector.requests]

    async def test_headers_are_recorded(self, collector: OtlpCollector) -> None:
        """Each request keeps its headers (keys lower-cased): the SDK's User-Agent, the
        exporter's custom headers, the media type."""
        exporter = http_exporter(collector, headers={"Authorization": "Bearer t0ken"})
        await run_pipeline(exporter, one_span)
        [request] = collector.requests
        assert ("http", "POST", "/v1/traces") == (request.transport, request.method, request.path)
        assert request.headers["user-agent"].startswith("OTel-OTLP-Exporter-Python/")
        assert "Bearer t0ken" == request.headers["authorization"]
        assert PROTOBUF == request.headers["content-type"]

    async def test_the_base_endpoint_from_the_environment(
        self, collector: OtlpCollector, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT=http_endpoint: the SDK appends /v1/traces itself."""
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.http_endpoint)
        await run_pipeline(OTLPSpanExporter(), one_span)
        assert [("/v1/traces", 200)] == [(r.path, r.status) for r in collector.requests]

    async def test_a_base_url_as_endpoint_argument_is_404(self, collector: OtlpCollector) -> None:
        """`endpoint=` is used as is: the base URL posts to `/`, which is 404 (a misconfigured
        exporter shows up in `requests`)."""
        result = await export_once(
            OTLPSpanExporter(endpoint=collector.http_endpoint), make_spans(one_span)
        )
        assert SpanExportResult.FAILURE == result
        assert [("/", 404)] == [(r.path, r.status) for r in collector.requests]
        assert [] == collector.spans


# --- the SDK over OTLP/gRPC ---------------------------------------------------------------


class TestGrpcExport:
    async def test_spans_and_metadata(self, grpc_collector: OtlpCollector) -> None:
        """Spans decode as over HTTP; the request's metadata is kept as its headers."""
        exporter = grpc_exporter(grpc_collector, headers=(("authorization", "Bearer t0ken"),))
        await run_pipeline(exporter, parent_and_child)
        [parent] = grpc_collector.by_name("parent")
        assert [parent.span_id] == [s.parent_span_id for s in grpc_collector.children(parent)]
        assert RESOURCE.items() <= parent.resource.items()
        first = grpc_collector.requests[0]
        assert ("grpc", 200, 1) == (first.transport, first.status, first.span_count)
        assert "Bearer t0ken" == first.headers["authorization"]
        assert first.headers["user-agent"].startswith("OTel-OTLP-Exporter-Python/")

    async def test_gzip(self, grpc_collector: OtlpCollector) -> None:
        """A gzip-compressed gRPC export arrives whole."""
        exporter = grpc_exporter(grpc_collector, compression=grpc.Compression.Gzip)
        await run_pipeline(exporter, parent_and_child, batch=True)
        assert {"parent", "child"} == {s.name for s in grpc_collector.spans}

    async def test_both_transports_share_one_store(self) -> None:
        """`OtlpCollector(grpc=True)` serves both, like Jaeger; spans land in one list."""
        async with OtlpCollector(grpc=True) as both:
            await run_pipeline(http_exporter(both), one_span)
            await run_pipeline(grpc_exporter(both), one_span)
            assert ["http", "grpc"] == [r.transport for r in both.requests]
            assert 2 == len(both.by_name("op"))

    async def test_invalid_argument_is_not_retried(self, grpc_collector: OtlpCollector) -> None:
        """`fail_next(1, 400)` is INVALID_ARGUMENT over gRPC: the SDK gives up at once and
        the spans are not stored."""
        grpc_collector.fail_next(1, 400)
        result = await export_once(grpc_exporter(grpc_collector), make_spans(one_span))
        assert SpanExportResult.FAILURE == result
        assert [400] == [r.status for r in grpc_collector.requests]
        assert [] == grpc_collector.spans

    async def test_a_trace_id_of_the_wrong_length_is_internal(
        self, grpc_collector: OtlpCollector
    ) -> None:
        """Through the generated stub: a 15-byte trace id fails to unmarshal, INTERNAL (the
        codec's error in grpc-go), and nothing is stored."""
        request = encode_spans(make_spans(one_span))
        request.resource_spans[0].scope_spans[0].spans[0].trace_id = b"\x01" * 15
        target = grpc_collector.grpc_endpoint.removeprefix("http://")
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await TraceServiceStub(channel).Export(request)  # type: ignore[no-untyped-call]
        assert grpc.StatusCode.INTERNAL == failure.value.code()
        assert "invalid length for TraceID" in failure.value.details()
        assert ([500], []) == ([r.status for r in grpc_collector.requests], grpc_collector.spans)

    async def test_unavailable_is_retried_after_the_sdks_backoff(
        self, grpc_collector: OtlpCollector
    ) -> None:
        """503 is UNAVAILABLE: retried. The Collector's RetryInfo rides in
        `grpc-status-details-bin`, which the Python SDK does not read (it looks for
        `google.rpc.retryinfo-bin`), so it waits its own first backoff, 0.8-1.2 s."""
        grpc_collector.fail_next(1, 503, retry_after=0)
        started = time.monotonic()
        result = await export_once(grpc_exporter(grpc_collector), make_spans(one_span))
        assert SpanExportResult.SUCCESS == result
        assert time.monotonic() - started >= 0.8
        assert [503, 200] == [r.status for r in grpc_collector.requests]
        assert 1 == len(grpc_collector.spans)


# --- failures on purpose and a slow collector ----------------------------------------------


class TestFailures:
    @pytest.mark.parametrize("status", [429, 503])
    async def test_retry_after_zero_is_retried_at_once(
        self, collector: OtlpCollector, status: int
    ) -> None:
        """The SDK retries 429/503 and honours Retry-After: with 0 it retries at once; the
        spans are stored once, from the request that succeeded."""
        collector.fail_next(2, status, retry_after=0)
        result = await export_once(http_exporter(collector), make_spans(parent_and_child))
        assert SpanExportResult.SUCCESS == result
        assert [status, status, 200] == [r.status for r in collector.requests]
        assert 2 == len(collector.spans)

    @pytest.mark.parametrize("status", [400, 401, 500])
    async def test_other_statuses_are_not_retried(
        self, collector: OtlpCollector, status: int
    ) -> None:
        """A status outside 429/502/503/504 fails the export with no retry."""
        collector.fail_next(1, status)
        result = await export_once(http_exporter(collector), make_spans(one_span))
        assert SpanExportResult.FAILURE == result
        assert [status] == [r.status for r in collector.requests]
        assert [] == collector.spans

    async def test_an_injected_failure_is_a_status_with_retry_after(self, raw: Raw) -> None:
        """The failure body is a google.rpc.Status (503: UNAVAILABLE, 14) in the request's
        encoding, with `Retry-After` in whole seconds."""
        raw.collector.fail_next(1, 503, retry_after=7)
        answer = await raw.send(b"")
        assert (503, "7", PROTOBUF) == (
            answer.status,
            answer.headers["Retry-After"],
            answer.headers["Content-Type"],
        )
        assert (14, "injected failure") == (answer.rpc_status().code, answer.rpc_status().message)
        assert 200 == (await raw.send(b"")).status

    def test_retry_after_only_with_429_and_503(self) -> None:
        """The Collector sends Retry-After only with 429 and 503; asking for more is an error."""
        with pytest.raises(ValueError, match="429 and 503"):
            OtlpCollector().fail_next(1, 502, retry_after=1)

    async def test_paused_answers_are_held_until_resumed(self, collector: OtlpCollector) -> None:
        """While paused the request is recorded (status None) and unanswered; on resume it
        is answered and its spans stored."""
        collector.pause()
        exporting = asyncio.create_task(export_once(http_exporter(collector), make_spans(one_span)))
        await collector.wait_until(lambda: len(collector.requests) == 1)
        assert (None, [], True) == (collector.requests[0].status, collector.spans, collector.paused)
        collector.resume()
        assert SpanExportResult.SUCCESS == await exporting
        assert ["op"] == [s.name for s in collector.spans]

    async def test_an_exporter_times_out_on_a_paused_collector(
        self, collector: OtlpCollector
    ) -> None:
        """With a 0.3 s timeout the SDK gives up on a held answer (its 1 s backoff exceeds the
        time left); the held request still lands once resumed, as on a real collector."""
        collector.pause()
        exporter = http_exporter(collector, timeout=0.3)
        result = await export_once(exporter, make_spans(one_span))
        assert SpanExportResult.FAILURE == result
        assert {None} == {r.status for r in collector.requests}
        collector.resume()
        await collector.wait_for("op")


# --- OTLP/HTTP strictness -----------------------------------------------------------------


class TestHttpStrictness:
    @pytest.mark.parametrize("path", ["/", "/v1/traces/", "/v1/metrics", "/v1/logs", "/v1/trace"])
    async def test_other_paths_are_404(self, raw: Raw, path: str) -> None:
        """Only /v1/traces is served: Go's `404 page not found`."""
        answer = await raw.send(path=path)
        assert (404, "404 page not found\n") == (answer.status, answer.text)

    @pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
    async def test_other_methods_are_405(self, raw: Raw, method: str) -> None:
        """Only POST: 405 with the Collector's text/plain message."""
        answer = await raw.send(method=method)
        assert (405, "405 method not allowed, supported: [POST]") == (answer.status, answer.text)
        assert "text/plain" == answer.headers["Content-Type"]

    @pytest.mark.parametrize(
        "content_type", ["application/protobuf", "application/octet-stream", "text/plain", None]
    )
    async def test_other_media_types_are_415(self, raw: Raw, content_type: str | None) -> None:
        """Neither application/x-protobuf nor application/json (or none at all): 415."""
        answer = await raw.send(content_type=content_type)
        expected = (
            "415 unsupported media type, supported: [application/json, application/x-protobuf]"
        )
        assert (415, expected) == (answer.status, answer.text)

    async def test_media_type_parameters_are_ignored(self, raw: Raw) -> None:
        """`application/json; charset=utf-8` is JSON; the answer says plain application/json."""
        answer = await raw.send_json(json_span(), content_type=f"{JSON}; charset=utf-8")
        assert (200, JSON) == (answer.status, answer.headers["Content-Type"])

    async def test_success_is_an_empty_export_response(self, raw: Raw) -> None:
        """200, application/x-protobuf, an ExportTraceServiceResponse with no partial_success."""
        request = encode_spans(make_spans(one_span)).SerializeToString()
        answer = await raw.send(request)
        assert (200, PROTOBUF) == (answer.status, answer.headers["Content-Type"])
        assert False is ExportTraceServiceResponse.FromString(answer.body).HasField(
            "partial_success"
        )
        assert ["op"] == [s.name for s in raw.collector.spans]

    async def test_an_empty_request_succeeds(self, raw: Raw) -> None:
        """An empty body is an empty ExportTraceServiceRequest: success (the spec's SHOULD)."""
        answer = await raw.send(b"")
        assert (200, 0) == (answer.status, raw.collector.requests[0].span_count)

    async def test_garbage_protobuf_is_400_with_a_status(self, raw: Raw) -> None:
        """An undecodable protobuf body: 400, a google.rpc.Status (INVALID_ARGUMENT, 3) in
        protobuf, nothing stored."""
        answer = await raw.send(b"not a protobuf")
        assert (400, PROTOBUF) == (answer.status, answer.headers["Content-Type"])
        assert 3 == answer.rpc_status().code
        assert [] == raw.collector.spans

    @pytest.mark.parametrize("size", [15, 17, 8])
    async def test_a_trace_id_of_the_wrong_length_is_400(self, raw: Raw, size: int) -> None:
        """A trace id that is not 16 bytes is refused, as pdata's unmarshaller refuses it."""
        request = encode_spans(make_spans(one_span))
        request.resource_spans[0].scope_spans[0].spans[0].trace_id = b"\x01" * size
        answer = await raw.send(request.SerializeToString())
        assert (400, "invalid length for TraceID") == (
            answer.status,
            answer.rpc_status().message,
        )

    @pytest.mark.parametrize("encoding", ["br", "zstd", "identity", "GZIP"])
    async def test_unknown_content_encodings_are_400(self, raw: Raw, encoding: str) -> None:
        """Content-Encoding is matched exactly against "", gzip, deflate, zlib here: anything
        else is 400 with a Status (the Collector also takes zstd, snappy and lz4)."""
        answer = await raw.send(b"", headers={"Content-Encoding": encoding})
        assert 400 == answer.status
        assert f"unsupported Content-Encoding: {encoding}" == answer.rpc_status().message

    async def test_unknown_encoding_without_media_type_answers_json(self, raw: Raw) -> None:
        """The Collector's error handler falls back to JSON when Content-Type is absent."""
        answer = await raw.send(b"", content_type=None, headers={"Content-Encoding": "br"})
        assert (400, JSON) == (answer.status, answer.headers["Content-Type"])

    async def test_unknown_encoding_and_media_type_is_the_collectors_500(self, raw: Raw) -> None:
        """With a media type it cannot encode a Status in, the Collector's error handler
        answers 500 with its canned JSON."""
        answer = await raw.send(b"", content_type="text/plain", headers={"Content-Encoding": "br"})
        assert (500, "failed to marshal error message") == (
            answer.status,
            answer.rpc_status().message,
        )

    async def test_raw_gzip_and_zlib_bodies_decode(self, raw: Raw) -> None:
        """gzip, and zlib under both `deflate` and `zlib`, decode to the same spans."""
        request = encode_spans(make_spans(one_span)).SerializeToString()
        bodies = {"gzip": gzip.compress(request), "deflate": zlib.compress(request)}
        bodies["zlib"] = bodies["deflate"]
        for encoding, body in bodies.items():
            answer = await raw.send(body, headers={"Content-Encoding": encoding})
            assert 200 == answer.status, encoding
        assert 3 == len(raw.collector.by_name("op"))

    @pytest.mark.parametrize("body", [b"not gzip at all", gzip.compress(b"x" * 100)[:-12]])
    async def test_corrupt_or_truncated_gzip_is_400(self, raw: Raw, body: bytes) -> None:
        """A body that does not inflate: 400 with a Status."""
        answer = await raw.send(body, headers={"Content-Encoding": "gzip"})
        assert (400, PROTOBUF) == (answer.status, answer.headers["Content-Type"])

    async def test_a_body_over_20_mib_is_400(self, raw: Raw) -> None:
        """Over 20 MiB: 400 `http: request body too large` (the Collector reports its
        MaxBytesReader error as bad data, not 413)."""
        answer = await raw.send(b"\x00" * (MAX_BODY + 1))
        assert (400, "http: request body too large") == (
            answer.status,
            answer.rpc_status().message,
        )

    async def test_a_gzip_bomb_is_400(self, raw: Raw) -> None:
        """The 20 MiB limit holds after inflating too."""
        bomb = gzip.compress(b"\x00" * (MAX_BODY + 1))
        answer = await raw.send(bomb, headers={"Content-Encoding": "gzip"})
        assert (400, "http: request body too large") == (
            answer.status,
            answer.rpc_status().message,
        )


# --- OTLP/JSON ------------------------------------------------------------------------------


class TestJsonEncoding:
    async def test_json_decodes_like_protobuf(self, raw: Raw) -> None:
        """The SDK's spans sent as OTLP/JSON (hex ids) decode to the same spans as the
        protobuf export of the same spans."""
        spans = make_spans(parent_and_child)
        json_answer = await raw.send_json(otlp_json(spans))
        await raw.send(encode_spans(spans).SerializeToString())
        assert (200, JSON, {}) == (
            json_answer.status,
            json_answer.headers["Content-Type"],
            json.loads(json_answer.body),
        )
        from_json, from_protobuf = raw.collector.spans[:2], raw.collector.spans[2:]
        assert from_protobuf == from_json
        assert from_json[0].parent_span_id == from_json[1].span_id

    async def test_hex_ids_are_case_insensitive(self, raw: Raw) -> None:
        """Upper-case hex is read; ids are stored in lowercase."""
        await raw.send_json(json_span(traceId="5B8EFFF798038103D269B633813FC60C"))
        assert "5b8efff798038103d269b633813fc60c" == raw.collector.spans[0].trace_id

    async def test_base64_ids_are_400(self, raw: Raw) -> None:
        """Ids in base64 (the plain proto3 JSON mapping) are not OTLP/JSON: 400, a JSON
        Status."""
        trace_id = base64.b64encode(bytes.fromhex("5b8efff798038103d269b633813fc60c")).decode()
        answer = await raw.send_json(json_span(traceId=trace_id))
        assert (400, JSON) == (answer.status, answer.headers["Content-Type"])
        assert 3 == answer.rpc_status().code

    async def test_a_hex_id_of_the_wrong_length_is_400(self, raw: Raw) -> None:
        """A 15-byte hex trace id is refused."""
        answer = await raw.send_json(json_span(traceId="5b8efff798038103d269b633813fc6"))
        assert (400, "invalid length for TraceID") == (
            answer.status,
            answer.rpc_status().message,
        )

    async def test_any_values_unknown_fields_and_snake_case(self, raw: Raw) -> None:
        """AnyValue in JSON (intValue as a string, bytes in base64, arrays, kvlists) decodes;
        unknown fields are ignored; snake_case keys are read too, like pdata."""
        attributes = [
            {"key": "i", "value": {"intValue": "42"}},
            {"key": "raw", "value": {"bytesValue": base64.b64encode(b"\x01").decode()}},
            {"key": "a", "value": {"arrayValue": {"values": [{"doubleValue": 0.5}]}}},
            {"key": "m", "value": {"kvlistValue": {"values": [{"key": "k", "value": {}}]}}},
        ]
        document = json_span(attributes=attributes, futureField=1)
        document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["parent_span_id"] = (
            "eee19b7ec3c1b175"
        )
        answer = await raw.send_json(document)
        assert 200 == answer.status
        span = raw.collector.spans[0]
        assert {"i": 42, "raw": b"\x01", "a": [0.5], "m": {"k": None}} == span.attributes
        assert ("SERVER", "eee19b7ec3c1b175") == (span.kind, span.parent_span_id)

    @pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"resourceSpans": 5}'])
    async def test_undecodable_json_is_400(self, raw: Raw, body: bytes) -> None:
        """Empty, broken, not an object, or the wrong shape: 400 with a JSON Status."""
        answer = await raw.send(body, content_type=JSON)
        assert (400, JSON) == (answer.status, answer.headers["Content-Type"])


# --- waiting and the API -----------------------------------------------------------------


class TestApi:
    async def test_wait_for_returns_when_spans_arrive(self, collector: OtlpCollector) -> None:
        """`wait_for` returns the matching spans once `count` have arrived, no earlier."""
        waiting = asyncio.create_task(collector.wait_for(lambda s: s.kind == "INTERNAL", count=2))
        await run_pipeline(http_exporter(collector), one_span)
        await collector.wait_until(lambda: len(collector.spans) == 1)
        assert False is waiting.done()
        await run_pipeline(http_exporter(collector), one_span)
        assert ["op", "op"] == [s.name for s in await waiting]

    async def test_wait_for_a_name(self, collector: OtlpCollector) -> None:
        """A string is a span name."""
        await run_pipeline(http_exporter(collector), parent_and_child)
        assert ["child"] == [s.name for s in await collector.wait_for("child")]

    async def test_wait_for_fails_with_what_arrived(self, collector: OtlpCollector) -> None:
        """On timeout: AssertionError naming the spans and requests that did arrive."""
        await run_pipeline(http_exporter(collector), one_span)
        with pytest.raises(AssertionError) as failure:
            await collector.wait_for("never", timeout=0.05)
        message = str(failure.value)
        assert "'op' INTERNAL" in message
        assert "http POST /v1/traces -> 200 (1)" in message

    async def test_endpoints(self) -> None:
        """`http_endpoint` is the base URL, `traces_url` adds /v1/traces; asking for a
        transport that is not serving is an error."""
        async with OtlpCollector() as http_only:
            assert http_only.http_endpoint.startswith("http://127.0.0.1:")
            assert http_only.http_endpoint + "/v1/traces" == http_only.traces_url
            with pytest.raises(RuntimeError, match="gRPC"):
                _ = http_only.grpc_endpoint
        async with OtlpCollector(http=False, grpc=True) as grpc_only:
            assert grpc_only.grpc_endpoint.startswith("http://127.0.0.1:")
            with pytest.raises(RuntimeError, match="HTTP"):
                _ = grpc_only.http_endpoint

    def test_no_transport_is_an_error(self) -> None:
        """A collector must serve something."""
        with pytest.raises(ValueError, match="http, grpc or both"):
            OtlpCollector(http=False)

    async def test_repr_and_clear(self, collector: OtlpCollector) -> None:
        """The repr shows the state; `clear` forgets spans and requests."""
        await run_pipeline(http_exporter(collector), one_span)
        collector.fail_next(2)
        assert (
            f"<OtlpCollector http={collector.http_endpoint} grpc=None spans=1 requests=1 "
            "paused=False failing=2>"
        ) == repr(collector)
        collector.clear()
        assert ([], []) == (collector.spans, collector.requests)

    def test_spans_are_frozen(self) -> None:
        """A received span cannot be changed by the code under test."""
        span = Span("op", "INTERNAL", "0" * 32, "0" * 16, None, 0, 0, {}, "UNSET", "", [], [],
                    {}, "", "", "", None)  # fmt: skip
        with pytest.raises(AttributeError):
            span.name = "other"  # type: ignore[misc]
