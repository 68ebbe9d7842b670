"""Tracing without the SDK on the hot path: W3C parsing, sampling as the SDK samples,
span records turned into SDK spans off the loop, a bounded export queue, and the
`telemetry.tracing` configuration with OpenTelemetry's environment variables."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

import pytest
import structlog.testing
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBasedTraceIdRatio,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, StatusCode

from sidecar.config import Config, config_from_mapping
from sidecar.errors import ConfigError
from sidecar.telemetry import tracing
from sidecar.telemetry.tracing import (
    CLIENT,
    SERVER,
    Sampler,
    SpanRecord,
    Tracer,
    format_traceparent,
    parse_traceparent,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def config(tracing: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Config:
    data: dict[str, Any] = {"service": {"name": "orders", "id": "orders-1"}}
    data["consul"] = {"enabled": False}
    if tracing is not None:
        data["telemetry"] = {"tracing": tracing}
    return config_from_mapping(data, env or {})


class Recorder(SpanExporter):
    """An exporter keeping what it is given; it can be told to fail or to block."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.gate.wait(10)
        if self.fail:
            return SpanExportResult.FAILURE
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def tracer(tracing: dict[str, Any] | None = None, **env: str) -> tuple[Tracer, Recorder]:
    recorder = Recorder()
    settings = {"exporter": "console"} | (tracing or {})
    return Tracer(config(settings, env), exporter=recorder), recorder


class TestTraceparent:
    def test_a_valid_header_gives_its_ids_and_sampled_flag(self) -> None:
        """Version 00, lower-case hex: trace id, parent id and the sampled bit."""
        header = f"00-{TRACE}-{PARENT}-01".encode()
        assert parse_traceparent(header) == (int(TRACE, 16), int(PARENT, 16), True)
        assert parse_traceparent(f"00-{TRACE}-{PARENT}-00".encode()) == (
            int(TRACE, 16),
            int(PARENT, 16),
            False,
        )

    @pytest.mark.parametrize(
        "header",
        [
            b"",
            b"garbage",
            f"00-{TRACE.upper()}-{PARENT}-01".encode(),  # upper-case hex
            f"00-{'0' * 32}-{PARENT}-01".encode(),  # all-zero trace id
            f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero parent id
            f"ff-{TRACE}-{PARENT}-01".encode(),  # version ff is invalid
            f"00-{TRACE}-{PARENT}-01-extra".encode(),  # version 00 has exactly 4 fields
            f"00-{TRACE}-{PARENT}-0g".encode(),  # bad flags
            f"00_{TRACE}-{PARENT}-01".encode(),  # bad separator
            f"01-{TRACE}-{PARENT}-01x".encode(),  # a later version's extra needs a dash
        ],
    )
    def test_an_invalid_header_is_ignored(self, header: bytes) -> None:
        """W3C Trace Context §3.2: an invalid traceparent counts as absent."""
        assert parse_traceparent(header) is None

    def test_a_later_version_may_carry_more_fields(self) -> None:
        """§3.2.4: a parser reads the known part of a higher version."""
        header = f"01-{TRACE}-{PARENT}-01-whatever".encode()
        assert parse_traceparent(header) == (int(TRACE, 16), int(PARENT, 16), True)

    def test_format_round_trips(self) -> None:
        """What the sidecar writes, it (and any W3C parser) reads back."""
        header = format_traceparent(int(TRACE, 16), int(PARENT, 16), True)
        assert header == f"00-{TRACE}-{PARENT}-01".encode()
        assert parse_traceparent(format_traceparent(1, 2, False)) == (1, 2, False)


class TestSampler:
    @pytest.mark.parametrize("ratio", [0.0, 0.01, 0.25, 0.5, 0.999, 1.0])
    def test_ratio_decisions_match_the_sdk(self, ratio: float) -> None:
        """Same trace ids, same decisions as the SDK's TraceIdRatioBased, so a trace
        sampled by an SDK-instrumented service at a ratio is sampled here too."""
        ours = Sampler("traceidratio", ratio)
        sdk = TraceIdRatioBased(ratio)
        rng = random.Random(7)
        for _ in range(2000):
            trace_id = rng.getrandbits(128)
            theirs = sdk.should_sample(None, trace_id, "x").decision is Decision.RECORD_AND_SAMPLE
            assert ours.decide(trace_id, None) == theirs

    def test_parent_based_follows_the_parent_and_ratio_decides_roots(self) -> None:
        """parentbased_traceidratio: a parent's flag wins; a root goes by the ratio."""
        sampler = Sampler("parentbased_traceidratio", 0.0)
        sdk = ParentBasedTraceIdRatio(0.0)
        assert sampler.decide(1, True) is True
        assert sampler.decide(1, False) is False
        root = sdk.should_sample(None, 1, "x").decision is Decision.RECORD_AND_SAMPLE
        assert sampler.decide(1, None) is root

    def test_samplers_that_ignore_the_parent(self) -> None:
        """always_on / always_off / traceidratio decide alone, parent or not."""
        assert Sampler("always_on", 0.0).decide(5, False) is True
        assert Sampler("always_off", 1.0).decide(5, True) is False
        assert Sampler("parentbased_always_off", 1.0).decide(5, None) is False
        assert Sampler("parentbased_always_off", 1.0).decide(5, True) is True


class TestBegin:
    @pytest.mark.parametrize("ratio", [0.0, 0.01, 0.3, 1.0])
    def test_new_traces_are_sampled_as_the_sdk_decides_their_ids(self, ratio: float) -> None:
        """A request without a context: the trace id begin() makes is sampled exactly
        when the SDK's TraceIdRatioBased would sample it (so the share is the ratio)."""
        t, _ = tracer({"sampler_ratio": ratio})
        sdk = TraceIdRatioBased(ratio)
        sampled = 0
        for _ in range(3000):
            context = t.begin(None, None, "GET", SERVER)
            expected = sdk.should_sample(None, context.trace_id, "x").decision
            assert context.sampled is (expected is Decision.RECORD_AND_SAMPLE)
            sampled += context.sampled
        assert abs(sampled / 3000 - ratio) < 0.05

    def test_an_unsampled_request_with_a_valid_parent_carries_it_on_unchanged(self) -> None:
        """Not recording, the sidecar adds no hop: the app's header goes on as it is."""
        t, _ = tracer({"sampler": "parentbased_always_on"})
        header = f"00-{TRACE}-{PARENT}-00".encode()
        context = t.begin(header, b"vendor=1", "GET", SERVER)
        assert context.span is None
        assert context.header == header
        assert context.tracestate == "vendor=1"

    def test_an_unsampled_root_gets_a_fresh_context_flagged_not_sampled(self) -> None:
        """No (or an invalid) parent and the ratio says no: a new trace id goes on, with
        the sampled flag off, so the next hop can still correlate its logs."""
        t, _ = tracer({"sampler_ratio": 0.0})
        context = t.begin(b"00-bad", b"dropped=1", "GET", SERVER)
        parsed = parse_traceparent(context.header)
        assert parsed is not None
        assert parsed[0] == context.trace_id
        assert parsed[2] is False
        assert context.tracestate == ""  # an invalid traceparent invalidates tracestate

    @pytest.mark.parametrize(
        "bits",
        [
            0x0123456789ABCDEF_FEDCBA9876543210_0011223344556677,
            0x00000000000000000000000000000001_0000000000000001,  # leading zeros in both
            0x0123456789ABCDEF_FEDCBA9876543210_0000000000000000,  # span id all zeros
            0x00000000000000000000000000000000_0011223344556677,  # trace id all zeros
            0,
            (1 << 192) - 1,
        ],
    )
    def test_an_unsampled_roots_header_carries_its_ids_in_hex(self, bits: int) -> None:
        """A new unsampled trace's header is `00-<trace id>-<span id>-00` in lower-case
        hex, the ids those the context records, neither ever all zeros (W3C)."""
        t, _ = tracer({"sampler_ratio": 0.0})
        t._rand = lambda _: bits
        context = t.begin(None, None, "GET", SERVER)
        trace_id, span_id = (bits >> 64) or 1, (bits & ((1 << 64) - 1)) or 1
        assert (context.trace_id, context.span_id) == (trace_id, span_id)
        assert context.header == b"00-%032x-%016x-00" % (trace_id, span_id)
        assert parse_traceparent(context.header) == (trace_id, span_id, False)

    def test_a_sampled_request_continues_the_callers_trace(self) -> None:
        """The SERVER span's parent is the caller's span; the header carries ours on."""
        t, _ = tracer()
        context = t.begin(f"00-{TRACE}-{PARENT}-01".encode(), b"k=v", "GET", SERVER)
        assert context.span is not None
        assert context.trace_id == int(TRACE, 16)
        assert context.span.parent_id == int(PARENT, 16)
        assert context.span.parent_remote is True
        assert context.header == format_traceparent(int(TRACE, 16), context.span_id, True)
        assert context.tracestate == "k=v"

    def test_a_child_shares_the_trace_and_names_its_parent(self) -> None:
        """A CLIENT attempt is a child of the SERVER span, with its own id."""
        t, _ = tracer()
        server = t.begin(None, None, "GET", SERVER)
        client = t.child(server, "GET", CLIENT, {})
        assert client.span is not None
        assert client.trace_id == server.trace_id
        assert client.span.parent_id == server.span_id
        assert client.span_id != server.span_id


class TestLogIds:
    @pytest.mark.parametrize(
        ("ratio", "traceparent", "bits"),
        [
            (0.0, None, 0x0123456789ABCDEF_FEDCBA9876543210_0011223344556677),  # new, unsampled
            (0.0, None, 0x00000000000000000000000000000000_0000000000000000),  # ids of 1
            (0.0, b"00-bad", None),  # an invalid header: a new trace
            (0.0, f" 00-{TRACE}-{PARENT}-00 ".encode(), None),  # carried on unchanged
            (0.0, f"cc-{TRACE}-{PARENT}-00-future".encode(), None),  # a later version
            (1.0, None, None),  # a sampled root
            (1.0, f"00-{TRACE}-{PARENT}-01".encode(), None),  # sampled, the app's parent
        ],
    )
    def test_bound_ids_are_the_contexts_on_every_way_it_is_made(
        self, ratio: float, traceparent: bytes | None, bits: int | None
    ) -> None:
        """`bind_log_ids` cuts the ids from the header: for every way `begin` and `child`
        make a context they are exactly `log_ids()`, on a log line until unbound."""
        t, _ = tracer({"sampler": "parentbased_traceidratio", "sampler_ratio": ratio})
        if bits is not None:
            t._rand = lambda _: bits
        server = t.begin(traceparent, None, "GET", SERVER)
        contexts = [server] + ([t.child(server, "GET", CLIENT, {})] if server.sampled else [])
        log = structlog.get_logger("test")
        with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            for context in contexts:
                tokens = context.bind_log_ids()
                log.info("inside")
                tracing.unbind_log_ids(tokens)
                log.info("after")
        assert 2 * len(contexts) == len(logs)
        for context, inside, after in zip(contexts, logs[::2], logs[1::2], strict=True):
            assert context.log_ids() == {k: inside[k] for k in ("trace_id", "span_id")}
            assert not {"trace_id", "span_id"} & after.keys()

    def test_binding_nests_and_unbinding_restores_the_outer_ids(self) -> None:
        """A retried request's task binds its ids inside a context that may have others
        bound: unbinding gives the outer ones back, as `reset_contextvars` does."""
        t, _ = tracer({"sampler_ratio": 1.0})
        outer, inner = t.begin(None, None, "GET", SERVER), t.begin(None, None, "GET", SERVER)
        log = structlog.get_logger("test")
        with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            first = outer.bind_log_ids()
            second = inner.bind_log_ids()
            log.info("inner")
            tracing.unbind_log_ids(second)
            log.info("outer")
            tracing.unbind_log_ids(first)
        assert [inner.log_ids()["span_id"], outer.log_ids()["span_id"]] == [
            entry["span_id"] for entry in logs
        ]


class TestExport:
    def test_spans_are_encoded_when_they_end_and_the_thread_only_sends(self) -> None:
        """With an OTLP transport, a span is encoded by `put` on the caller's thread (the
        event loop's) and the export thread only joins the bytes and sends them: it never
        holds the GIL for long while the loop's thread waits for it."""
        sent: list[tuple[str, bytes]] = []

        class Transport:
            def send(self, body: bytes, deadline: float) -> None:
                sent.append((threading.current_thread().name, body))

            def close(self) -> None:
                pass

        encoded: list[str] = []
        queue = tracing.SpanQueue(
            config({"exporter": "otlp"}).telemetry.tracing,
            {"service.name": "orders"},
            transport=Transport(),
        )
        span = queue.encoder.span

        def spy(record: SpanRecord) -> bytes:
            encoded.append(threading.current_thread().name)
            return span(record)

        queue.encoder.span = spy  # type: ignore[method-assign]
        queue.start()
        records = [
            SpanRecord(
                "s", SERVER, trace_id=1, span_id=i + 1, parent_id=0, start_ns=i, attributes={}
            )
            for i in range(3)
        ]
        for record in records:
            queue.put(record)
        assert ["MainThread"] * 3 == encoded
        queue.shutdown(5.0)

        assert ["span-export"] == [thread for thread, _ in sent]
        ours = ExportTraceServiceRequest.FromString(sent[0][1])
        assert ExportTraceServiceRequest.FromString(queue.encoder.requests(records)[0]) == ours
        assert 3 == queue.exported

    def test_a_span_that_cannot_be_encoded_is_counted_failed_not_raised(self) -> None:
        """Encoding runs on the request's path: a span it cannot encode (here a name that
        is not valid Unicode) is counted as failed and logged; the others go out."""
        sent: list[bytes] = []

        class Transport:
            def send(self, body: bytes, deadline: float) -> None:
                sent.append(body)

            def close(self) -> None:
                pass

        queue = tracing.SpanQueue(
            config({"exporter": "otlp"}).telemetry.tracing, {}, transport=Transport()
        )
        bad = SpanRecord(
            "\ud800", SERVER, trace_id=1, span_id=1, parent_id=0, start_ns=0, attributes={}
        )
        good = SpanRecord(
            "ok", SERVER, trace_id=1, span_id=2, parent_id=0, start_ns=0, attributes={}
        )
        with structlog.testing.capture_logs() as logs:
            queue.put(bad)
            queue.put(good)
        queue.shutdown(5.0)

        assert (1, 1) == (queue.unencodable, queue.exported)
        failed = next(m for m in queue.collect() if m.name == "sidecar_trace_spans")
        assert 1.0 == next(s.value for s in failed.samples if s.labels["outcome"] == "failed")
        (spans,) = [
            r.scope_spans[0].spans
            for r in ExportTraceServiceRequest.FromString(sent[0]).resource_spans
        ]
        assert ["ok"] == [s.name for s in spans]
        (line,) = [e for e in logs if e["event"] == "span_export_failed"]
        assert "cannot encode span" in line["error"]
        assert 1 == line["spans"]

    @pytest.mark.parametrize("refused", [0, 1])
    def test_each_request_of_a_split_batch_counts_its_own_spans(self, refused: int) -> None:
        """A batch too big for one request goes out as several, each an export of its
        own: the collector refusing one fails that request's spans only, the others are
        still sent and counted exported, and the log line gives the spans lost."""
        from sidecar.telemetry.otlp import ExportError  # noqa: PLC0415

        sent: list[int] = []

        class Transport:
            def __init__(self) -> None:
                self.calls = 0

            def send(self, body: bytes, deadline: float) -> None:
                call, self.calls = self.calls, self.calls + 1
                if call == refused:
                    raise ExportError("HTTP 400: b'too big'")
                sent.append(
                    len(
                        ExportTraceServiceRequest.FromString(body)
                        .resource_spans[0]
                        .scope_spans[0]
                        .spans
                    )
                )

            def close(self) -> None:
                pass

        queue = tracing.SpanQueue(
            config({"exporter": "otlp", "max_export_batch_size": 512}).telemetry.tracing,
            {},
            transport=Transport(),
        )
        for i in range(500):  # about 12 KB each, 2 MiB a request: three requests
            queue.put(
                SpanRecord(
                    "GET",
                    SERVER,
                    trace_id=1,
                    span_id=i + 1,
                    parent_id=0,
                    start_ns=0,
                    attributes={f"a{n}": "x" * 4000 for n in range(3)},
                )
            )
        with structlog.testing.capture_logs() as logs:
            queue.shutdown(5.0)

        assert len(sent) >= 2  # every request but the refused one went out
        assert (sum(sent), 500 - sum(sent)) == (queue.exported, queue.failed)
        assert queue.failed > 0
        (line,) = [e for e in logs if e["event"] == "span_export_failed"]
        assert queue.failed == line["spans"]

    @pytest.mark.parametrize("fail", [False, True])
    def test_tracing_stopped_says_what_the_shutdown_exported(self, fail: bool) -> None:
        """`flushed` is what was exported after the shutdown began (a batch being sent
        then included), `failed` what was given up on meanwhile: never a negative count,
        and never spans the collector did not take."""
        t, recorder = tracer({"max_export_batch_size": 4})
        recorder.gate.clear()
        t.start()
        for _ in range(4):
            t.end(t.begin(None, None, "GET", SERVER))
        for _ in range(500):  # the export thread is sending these four
            if t.queue.sending:
                break
            threading.Event().wait(0.01)
        for _ in range(2):
            t.end(t.begin(None, None, "GET", SERVER))
        recorder.fail = fail
        with structlog.testing.capture_logs() as logs:
            stopping = threading.Thread(target=t.shutdown, args=(5.0,))
            stopping.start()
            for _ in range(500):  # the shutdown has begun (its counts are taken)
                if t.queue._stop_by != float("inf"):
                    break
                threading.Event().wait(0.01)
            recorder.gate.set()
            stopping.join(10)
        (line,) = [e for e in logs if e["event"] == "tracing_stopped"]
        expected = (0, 6, 0) if fail else (6, 0, 6)
        assert expected == (line["flushed"], line["failed"], line["exported"])

    def test_records_become_sdk_spans_with_ids_kinds_links_and_status(self) -> None:
        """The export thread builds ReadableSpans the OTLP exporter can encode."""
        t, recorder = tracer()
        server = t.begin(f"00-{TRACE}-{PARENT}-01".encode(), None, "GET", SERVER, {"a": 1})
        client = t.child(server, "GET", CLIENT, {"http.response.status_code": 503})
        assert client.span is not None
        client.span.links = ((int(TRACE, 16), int(PARENT, 16), True),)
        t.end(client, "503")
        t.end(server)
        t.shutdown(5.0)
        spans = {s.kind: s for s in recorder.spans}
        assert set(spans) == {SpanKind.SERVER, SpanKind.CLIENT}
        srv, cli = spans[SpanKind.SERVER], spans[SpanKind.CLIENT]
        assert srv.context is not None
        assert cli.context is not None
        assert cli.parent is not None
        assert srv.context.trace_id == int(TRACE, 16)
        assert srv.parent is not None
        assert srv.parent.span_id == int(PARENT, 16)
        assert srv.parent.is_remote
        assert cli.parent.span_id == srv.context.span_id
        assert cli.status.status_code == StatusCode.ERROR
        assert srv.status.status_code == StatusCode.UNSET
        assert [link.context.span_id for link in cli.links] == [int(PARENT, 16)]
        assert srv.resource.attributes["service.name"] == "orders"
        assert srv.resource.attributes["service.instance.id"] == "orders-1"
        assert srv.start_time is not None
        assert srv.end_time is not None
        assert srv.start_time <= srv.end_time

    def test_a_full_queue_drops_and_counts_instead_of_growing(self) -> None:
        """Bounded memory: beyond max_queue_size a span is dropped and counted."""
        t, recorder = tracer({"max_queue_size": 4, "max_export_batch_size": 2})
        for _ in range(10):
            t.end(t.begin(None, None, "GET", SERVER))
        assert len(t.queue) == 4
        assert t.queue.dropped_full == 6
        t.shutdown(5.0)
        assert len(recorder.spans) == 4
        metrics = {m.name: m for m in t.collect()}
        counts = {s.labels["outcome"]: s.value for s in metrics["sidecar_trace_spans"].samples}
        assert counts == {"exported": 4, "dropped": 6, "failed": 0}

    def test_a_failing_exporter_counts_failures_and_the_thread_keeps_going(self) -> None:
        """Export failures are counted; later batches still go out."""
        t, recorder = tracer({"max_export_batch_size": 1})
        recorder.fail = True
        t.end(t.begin(None, None, "GET", SERVER))
        t.queue._drain()
        recorder.fail = False
        t.end(t.begin(None, None, "GET", SERVER))
        t.shutdown(5.0)
        assert t.queue.failed == 1
        assert t.queue.exported == 1

    def test_shutdown_gives_up_after_its_timeout(self) -> None:
        """A collector that hangs cannot hold the exit past the grace period."""
        t, recorder = tracer({"max_export_batch_size": 1})
        recorder.gate.clear()
        t.start()
        for _ in range(3):
            t.end(t.begin(None, None, "GET", SERVER))
        t.queue._wake.set()
        t.shutdown(0.3)
        assert len(t.queue) >= 1  # left behind, not waited for
        recorder.gate.set()

    def test_unsampled_work_records_nothing(self) -> None:
        """Ending an unsampled context queues nothing."""
        t, _ = tracer({"sampler": "always_off"})
        t.end(t.begin(None, None, "GET", SERVER))
        assert len(t.queue) == 0


class TestTracingConfig:
    def test_no_endpoint_means_tracing_off(self) -> None:
        """The default exporter is otlp; without an endpoint there is nothing to send to."""
        assert config().telemetry.tracing.enabled is False
        assert config({"otlp_endpoint": "http://jaeger:4318"}).telemetry.tracing.enabled

    def test_http_endpoints_get_the_traces_path_and_the_specific_variable_wins(self) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT is a base URL (+/v1/traces for HTTP);
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is taken as it is, and wins."""
        base = config(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318/"})
        assert base.telemetry.tracing.endpoint == "http://jaeger:4318/v1/traces"
        both = config(
            {"otlp_endpoint": "http://file:4318"},
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:9999/custom",
            },
        )
        assert both.telemetry.tracing.endpoint == "http://collector:9999/custom"

    def test_grpc_endpoint_is_kept_as_is(self) -> None:
        """gRPC takes host:port; no path is appended."""
        tracing = config(
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://j:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            }
        ).telemetry.tracing
        assert (tracing.protocol, tracing.endpoint) == ("grpc", "http://j:4317")

    def test_service_name_resource_and_sampler_from_the_environment(self) -> None:
        """OTEL_SERVICE_NAME beats OTEL_RESOURCE_ATTRIBUTES' service.name, which beats
        service.name; OTEL_TRACES_SAMPLER(_ARG) beat the file; OTEL_SDK_DISABLED turns
        tracing off."""
        env = {
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,deployment.environment=prod",
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
        }
        tracing = config({"exporter": "console", "sampler_ratio": 1.0}, env).telemetry.tracing
        assert tracing.service_name == "from-attrs"
        assert ("deployment.environment", "prod") in tracing.resource_attributes
        assert (tracing.sampler, tracing.sampler_ratio) == ("traceidratio", 0.01)
        named = config({"exporter": "console"}, env | {"OTEL_SERVICE_NAME": "svc"})
        assert named.telemetry.tracing.service_name == "svc"
        off = config({"exporter": "console"}, {"OTEL_SDK_DISABLED": "true"})
        assert off.telemetry.tracing.enabled is False

    def test_every_problem_is_reported_with_its_source(self) -> None:
        """Bad values in the file and in OTEL_* variables are all listed (exit 64)."""
        with pytest.raises(ConfigError) as caught:
            config(
                {"otlp_endpoint": "jaeger:4318", "sampler_ratio": 2, "protocol": "thrift"},
                {"OTEL_BSP_SCHEDULE_DELAY": "soon", "OTEL_TRACES_SAMPLER": "jaeger_remote"},
            )
        text = str(caught.value)
        for where in (
            "telemetry.tracing.otlp_endpoint",
            "telemetry.tracing.sampler_ratio",
            "telemetry.tracing.protocol",
            "OTEL_BSP_SCHEDULE_DELAY",
            "OTEL_TRACES_SAMPLER",
        ):
            assert where in text

    def test_headers_from_the_environment_are_kept_out_of_the_repr(self) -> None:
        """OTEL_EXPORTER_OTLP_HEADERS may hold a token: parsed, never shown."""
        tracing = config(
            {"exporter": "console"},
            {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret,x-team=a"},
        ).telemetry.tracing
        assert dict(tracing.headers) == {"authorization": "Bearer s3cret", "x-team": "a"}
        assert "s3cret" not in repr(tracing)


class TestOtlpEncoder:
    def records(self) -> list[SpanRecord]:
        t, _ = tracer()
        server = t.begin(
            f"00-{TRACE}-{PARENT}-01".encode(),
            b"vendor=1,other=x",
            "GET /v1/invoke/billing/*",
            SERVER,
            {
                "http.request.method": "GET",
                "http.response.status_code": 503,
                "ratio": 0.25,
                "retried": True,
                "negative": -7,
                "list": ["a", "b"],
                "ünïcode": "välue",
            },
        )
        client = t.child(server, "GET", CLIENT, {"server.port": 8080})
        assert server.span is not None
        assert client.span is not None
        client.span.links = ((int(TRACE, 16), int(PARENT, 16), True), (7, 9, False))
        client.span.error = "UPSTREAM_TIMEOUT"
        server.span.end_ns = client.span.end_ns = server.span.start_ns + 12345
        return [server.span, client.span]

    def test_the_wire_bytes_decode_to_what_the_sdk_encoder_makes(self) -> None:
        """Our encoding of span records parses (official protobuf classes) to the same
        ExportTraceServiceRequest the SDK's OTLP encoder makes from the same spans."""
        records = self.records()
        queue = tracer()[0].queue
        [body] = queue.encoder.requests(records)
        ours = ExportTraceServiceRequest.FromString(body)
        theirs = encode_spans([queue.readable(r) for r in records])
        assert MessageToDict(ours) == MessageToDict(theirs)

    def test_lengths_either_side_of_one_byte_decode_alike(self) -> None:
        """Fields whose length (or the length of a message holding them) is 127, 128 or
        near: one varint byte or two, the same message as the SDK's encoder makes."""
        t, _ = tracer()
        records = []
        for n in range(118, 140):
            context = t.begin(None, None, "n" * n, SERVER, {"k" * (n - 110): "v" * n})
            assert context.span is not None
            context.span.end_ns = context.span.start_ns + n
            records.append(context.span)
        queue = t.queue
        [body] = queue.encoder.requests(records)
        ours = ExportTraceServiceRequest.FromString(body)
        theirs = encode_spans([queue.readable(r) for r in records])
        assert MessageToDict(ours) == MessageToDict(theirs)

    @pytest.mark.parametrize(
        ("value", "wire"),
        [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02")],
    )
    def test_varints_as_protobuf_writes_them(self, value: int, wire: bytes) -> None:
        from sidecar.telemetry.otlp import _varint  # noqa: PLC0415

        assert wire == _varint(value)

    def test_a_negative_varint_is_refused_not_misencoded(self) -> None:
        from sidecar.telemetry.otlp import _varint  # noqa: PLC0415

        with pytest.raises(ValueError, match="unsigned"):
            _varint(-1)

    def test_large_values_and_many_spans_stay_valid(self) -> None:
        """Varint lengths past one byte, 64-bit ids and times, a big batch."""
        t, _ = tracer()
        records = []
        for i in range(300):
            context = t.begin(None, None, "x" * 300, SERVER, {"k": "v" * 5000, "n": 2**62})
            assert context.span is not None
            context.span.end_ns = context.span.start_ns + i
            records.append(context.span)
        [body] = t.queue.encoder.requests(records)
        decoded = ExportTraceServiceRequest.FromString(body)
        spans = decoded.resource_spans[0].scope_spans[0].spans
        assert len(spans) == 300
        assert spans[0].name == "x" * 300
        assert spans[299].end_time_unix_nano - spans[299].start_time_unix_nano == 299
        assert spans[5].attributes[1].value.int_value == 2**62


class TestReviewFindings:
    @pytest.mark.parametrize(
        ("header", "kept"),
        [
            (b"vendor=1,other@sys=x y", "vendor=1,other@sys=x y"),
            (b"a=1,,b=2", "a=1,,b=2"),
            (b"this is not valid", ""),
            (",".join(f"k{i}=v" for i in range(33)).encode(), ""),  # over 32 members
            ("k=caf\u00e9".encode(), ""),  # not ASCII
            (b"Upper=1", ""),  # keys are lower-case
        ],
    )
    def test_an_invalid_tracestate_is_dropped_whole(self, header: bytes, kept: str) -> None:
        """W3C §3.3: a valid tracestate goes on as sent; an invalid one is discarded."""
        t, _ = tracer()
        context = t.begin(f"00-{TRACE}-{PARENT}-01".encode(), header, "GET", SERVER)
        assert context.tracestate == kept

    def test_a_huge_attribute_is_cut_and_a_big_batch_is_split(self) -> None:
        """A 60 KB path becomes 4096 characters on the wire, and a batch larger than the
        request budget goes out as several requests, none over it by more than a span."""
        from sidecar.telemetry.otlp import MAX_REQUEST_BYTES, MAX_VALUE_CHARS  # noqa: PLC0415

        t, _ = tracer()
        records = []
        for _ in range(1000):
            context = t.begin(None, None, "GET", SERVER, {"url.path": "/" + "p" * 60_000})
            assert context.span is not None
            records.append(context.span)
        bodies = t.queue.encoder.requests(records)
        assert len(bodies) > 1
        assert all(len(b) <= MAX_REQUEST_BYTES + 10_000 for b in bodies)
        spans = [
            span
            for body in bodies
            for span in ExportTraceServiceRequest.FromString(body)
            .resource_spans[0]
            .scope_spans[0]
            .spans
        ]
        assert len(spans) == 1000
        assert len(spans[0].attributes[0].value.string_value) == MAX_VALUE_CHARS

    def test_spans_being_sent_are_counted_until_the_send_ends(self) -> None:
        """Taken from the queue but not yet accepted: still in the queue gauge, so every
        span is in exactly one of exported, dropped, failed or waiting."""
        t, recorder = tracer({"max_export_batch_size": 4})
        recorder.gate.clear()
        t.start()
        for _ in range(4):
            t.end(t.begin(None, None, "GET", SERVER))
        metrics: dict[str, Any] = {}
        for _ in range(500):
            metrics = {m.name: m for m in t.collect()}
            if t.queue.sending:
                break
            threading.Event().wait(0.01)
        assert metrics["sidecar_trace_export_queue_spans"].samples[0].value == 4
        recorder.gate.set()
        t.shutdown(5.0)
        assert t.queue.exported == 4

    def test_export_headers_are_checked_at_start(self) -> None:
        """A header value with a line break, non-ASCII, or gRPC binary metadata would fail
        every export: it is a config error instead."""
        for env in (
            {"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a%0D%0AInjected:%201"},
            {"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=caf%C3%A9"},
            {"OTEL_EXPORTER_OTLP_HEADERS": "x-b-bin=abc", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        ):
            with pytest.raises(ConfigError, match="x-"):
                config({"otlp_endpoint": "http://collector:4318"}, env)

    def test_an_endpoint_whose_host_has_no_idna_form_is_refused(self) -> None:
        """The exporter names the collector in IDNA (Host, TLS, DNS): a host name that
        has no such form is a config error, not a traceback at start."""
        with pytest.raises(ConfigError, match="IDNA"):
            config({"otlp_endpoint": "http://\u00e4..b:4318/v1/traces"})

    @pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding", "Connection"])
    def test_export_headers_that_frame_the_request_are_refused(self, name: str) -> None:
        """The exporter frames its own requests: a configured Content-Length (or the
        like) would make the collector misread every export."""
        env = {"OTEL_EXPORTER_OTLP_HEADERS": f"{name}=5"}
        with pytest.raises(ConfigError, match="the exporter sets it itself"):
            config({"otlp_endpoint": "http://collector:4318"}, env)

    def test_a_grpc_endpoint_may_be_a_bare_host_and_port(self) -> None:
        """As the gRPC exporters accept it: 127.0.0.1:4317."""
        tracing = config(
            env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "j:4317"}
        ).telemetry.tracing
        assert tracing.endpoint == "http://j:4317"


class TestNewTraceIds:
    def test_new_traces_draw_their_ids_a_batch_at_a_time(self) -> None:
        """A new trace takes the next 192 bits of one draw made for many: every id
        distinct and valid, the context's ids those of its header, one draw a batch."""
        t, _ = tracer({"sampler_ratio": 0.0})
        real = t._rand
        draws: list[int] = []

        def counted(bits: int) -> int:
            draws.append(bits)
            return real(bits)

        t._rand = counted
        contexts = [t.begin(None, None, "GET", SERVER) for _ in range(3 * tracing._ID_BATCH + 1)]
        assert [192 * tracing._ID_BATCH] * 4 == draws
        assert len(contexts) == len({c.header for c in contexts})
        for context in contexts:
            assert parse_traceparent(context.header) == (context.trace_id, context.span_id, False)
            assert context.log_ids() == {
                "trace_id": context.header[3:35].decode(),
                "span_id": context.header[36:52].decode(),
            }

    @pytest.mark.parametrize("ratio", [0.0, 0.01, 0.5, 1.0])
    def test_a_new_trace_is_sampled_as_sample_root_decides(self, ratio: float) -> None:
        """Decided on the hex digits of the trace id's low 64 bits, as `Sampler.sample_root`
        decides on the integer: also for ids one under, at and over the bound."""
        t, _ = tracer({"sampler_ratio": ratio})
        bound = t.sampler.bound
        edges = [low for low in (bound - 1, bound, bound + 1) if 0 < low < 1 << 64]
        for low in [*edges, *(random.getrandbits(64) or 1 for _ in range(300))]:
            bits = (random.getrandbits(64) or 1) << 128 | low << 64 | 0x0123

            def draw(_: int, bits: int = bits) -> int:
                return bits  # the batch's lowest 192 bits: this trace's

            t._rand = draw
            t._ids_end = 0  # a new draw for each
            context = t.begin(None, None, "GET", SERVER)
            assert context.trace_id == bits >> 64
            assert context.sampled == t.sampler.sample_root(bits >> 64) == (low < bound)
