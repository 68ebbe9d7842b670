"""OpenTelemetry tracing that costs next to nothing for a request it does not sample.

The hot path never touches the SDK. `Tracer.begin` parses the app's `traceparent`
itself, decides sampling the way the SDK's samplers do (parent-based, trace-id
ratio), and makes W3C ids from a plain PRNG; a request that is not sampled only
carries the context on (the app's own header, or a fresh one). A sampled request
records its timestamps and attributes in `SpanRecord`s. When a span ends it is
encoded to OTLP protobuf on the caller's thread (`otlp.Encoder`, about 10 µs) and
the export thread only joins and sends the bytes (HTTP/protobuf or gRPC), so it
never holds the GIL for long against the event loop; for the console exporter
the thread turns records into SDK `ReadableSpan`s. The queue between the two is
bounded: a span that does not fit is dropped and counted, never held in
unbounded memory.
"""

from __future__ import annotations

import math
import random
import re
import sys
import threading
import time
from binascii import hexlify
from collections import deque
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Final

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidecar import __version__
from sidecar.config import Config, TracingConfig
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.otlp import Encoder, ExportError, Transport, transport

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

log = get_logger("sidecar.tracing")

# Span kinds, as the SDK's SpanKind member names.
SERVER: Final = "SERVER"
CLIENT: Final = "CLIENT"
PRODUCER: Final = "PRODUCER"
CONSUMER: Final = "CONSUMER"

_HEX: Final = frozenset(b"0123456789abcdef")
#: One tracestate list member (W3C Trace Context §3.3.1.3): a key (simple, or
#: tenant@system) and a value of printable ASCII without ',' and '=', not ending in a space.
_TRACESTATE_MEMBER: Final = re.compile(
    rb"[ \t]*(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e][ \t]*"
)
_TRACESTATE_MAX_MEMBERS: Final = 32
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16
_BOUND: Final = 1 << 64
_LOW64: Final = _BOUND - 1
#: A static of the compiled build (an imported name is looked up in the module dict).
_hexlify: Final = hexlify
#: New traces whose ids are drawn together (`Tracer._new_ids`).
_ID_BATCH: Final = 64


def parse_traceparent(value: bytes) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C `traceparent`, or None if invalid.

    Version 00 must be exactly 55 bytes; a later version may append fields after a
    dash (W3C Trace Context §3.2.4); version ff is invalid, as are all-zero ids and
    upper-case hex.
    """
    value = value.strip()
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version = value[:2]
    if version == b"ff" or not _HEX.issuperset(version):
        return None
    if version == b"00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55:56] != b"-":
        return None
    trace, span, flags = value[3:35], value[36:52], value[53:55]
    if not (_HEX.issuperset(trace) and _HEX.issuperset(span) and _HEX.issuperset(flags)):
        return None
    if trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    return int(trace, 16), int(span, 16), bool(int(flags, 16) & 1)


def valid_tracestate(value: bytes | None) -> str:
    """The `tracestate` to carry on: the header as sent when it is valid, else "" (W3C: an
    invalid tracestate is discarded, never half-kept)."""
    if not value:
        return ""
    members = [m for m in value.split(b",") if m.strip()]
    if len(members) > _TRACESTATE_MAX_MEMBERS:
        return ""
    for member in members:
        if not _TRACESTATE_MEMBER.fullmatch(member):
            return ""
    return value.decode("ascii")


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


class Sampler:
    """The SDK's built-in samplers (OTEL_TRACES_SAMPLER), decided on integer ids.

    `traceidratio` samples a trace when the low 64 bits of its id fall under
    `ratio * 2**64`, as the SDK's TraceIdRatioBased does, so every service using
    the same ratio agrees; the `parentbased_*` ones follow a parent's sampled flag.
    `always_on` and `always_off` are the same rule with the bound at 2**64 and 0.
    """

    __slots__ = ("bound", "name", "parent_based")

    def __init__(self, name: str, ratio: float) -> None:
        self.name = name
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")  # always_on, always_off or traceidratio
        bounds = {"always_on": _BOUND, "always_off": 0}
        self.bound = bounds[root] if root in bounds else round(ratio * _BOUND)

    def sample_root(self, trace_id: int) -> bool:
        return (trace_id & _LOW64) < self.bound

    def decide(self, trace_id: int, parent_sampled: bool | None) -> bool:
        """Sample a trace with this id, whose parent was sampled (True/False) or absent."""
        if parent_sampled is not None and self.parent_based:
            return parent_sampled
        return self.sample_root(trace_id)

    def __repr__(self) -> str:
        return f"<Sampler {self.name} bound={self.bound / _BOUND:g}>"


class SpanRecord:
    """What the hot path records for one sampled span; turned into an SDK span later."""

    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "kind",
        "links",
        "name",
        "parent_id",
        "parent_remote",
        "span_id",
        "start_ns",
        "trace_id",
        "tracestate",
    )

    def __init__(
        self,
        name: str,
        kind: str,
        *,
        trace_id: int,
        span_id: int,
        parent_id: int,
        start_ns: int,
        attributes: dict[str, Any],
        parent_remote: bool = False,
        tracestate: str = "",
    ) -> None:
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # 0: a root span
        self.parent_remote = parent_remote
        self.start_ns = start_ns
        self.end_ns = 0
        self.attributes = attributes
        self.error: str | None = None  # status ERROR with this description
        self.links: tuple[tuple[int, int, bool], ...] = ()  # (trace id, span id, sampled)
        self.tracestate = tracestate

    def __repr__(self) -> str:
        return f"<SpanRecord {self.kind} {self.name!r} {self.trace_id:032x}/{self.span_id:016x}>"


class TraceContext:
    """One traced unit of work (an app request, a delivery): its trace and the span the
    sidecar records for it (`span_id`); `header` is the `traceparent` that carries it on.

    Not sampled: `span` is None and `header` is what the next hop receives.
    """

    __slots__ = ("_span_id", "_trace_id", "header", "span", "tracestate")

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        header: bytes,
        span: SpanRecord | None,
        tracestate: str = "",
    ) -> None:
        # 0 (never a valid id): the id is the header's, read when asked for. A new
        # unsampled trace is made so (`Tracer.begin`); its ids are rarely asked for.
        self._trace_id = trace_id
        self._span_id = span_id
        self.header = header
        self.span = span
        self.tracestate = tracestate

    @property
    def trace_id(self) -> int:
        return self._trace_id or int(self.header[3:35], 16)

    @property
    def span_id(self) -> int:
        return self._span_id or int(self.header[36:52], 16)

    @property
    def sampled(self) -> bool:
        return self.span is not None

    def log_ids(self) -> dict[str, str]:
        """`trace_id` and `span_id` as the log lines carry them (hex)."""
        return {"trace_id": f"{self.trace_id:032x}", "span_id": f"{self.span_id:016x}"}

    def bind_log_ids(self) -> LogIdTokens:
        """Put `log_ids` on every log line written in this context until `unbind_log_ids`,
        as `structlog.contextvars.bind_contextvars(**self.log_ids())` would, at a tenth
        of its cost: the ids are cut from `header`, which holds them in hex whichever
        way the context was made (W3C: `version-trace-span-flags`, fixed widths), and
        structlog's two context variables are set directly."""
        header = self.header
        return (
            _LOG_TRACE_ID.set(header[3:35].decode("ascii")),
            _LOG_SPAN_ID.set(header[36:52].decode("ascii")),
        )


#: What `TraceContext.bind_log_ids` returns, for `unbind_log_ids`.
LogIdTokens = tuple[Token[Any], Token[Any]]


def unbind_log_ids(tokens: LogIdTokens) -> None:
    """Take the ids `bind_log_ids` put on log lines off again."""
    _LOG_TRACE_ID.reset(tokens[0])
    _LOG_SPAN_ID.reset(tokens[1])


def _structlog_variables() -> tuple[ContextVar[Any], ContextVar[Any]]:
    """The context variables structlog keeps `trace_id` and `span_id` in (found through
    its public API: a bind's tokens name their variables; `merge_contextvars` puts them
    on each log line)."""
    tokens = structlog.contextvars.bind_contextvars(trace_id=None, span_id=None)
    structlog.contextvars.reset_contextvars(**tokens)
    return tokens["trace_id"].var, tokens["span_id"].var


_LOG_VARIABLES: Final = _structlog_variables()
_LOG_TRACE_ID: Final = _LOG_VARIABLES[0]
_LOG_SPAN_ID: Final = _LOG_VARIABLES[1]


class Tracer:
    """Sampling, ids and span records for the proxy, the relay and the subscriptions."""

    def __init__(self, config: Config, exporter: SpanExporter | None = None) -> None:
        tracing = config.telemetry.tracing
        self.config = tracing
        self.sampler = Sampler(tracing.sampler, tracing.sampler_ratio)
        self._rand = random.Random().getrandbits
        # New traces' ids, drawn `_ID_BATCH` at a time (`_new_ids`): their hex digits,
        # and where the ones not yet taken end (taken from the end down).
        self._ids = b""
        self._ids_end = 0
        # The sampler's decision on a trace id's low 64 bits, as its 16 hex digits
        # compare: unsampled from this one up (a hex digit sorts below `g`).
        bound = self.sampler.bound
        self._unsampled_from = b"%016x" % bound if bound < _BOUND else b"g"
        resource = resource_attributes(config)
        if exporter is None and tracing.exporter == "console":
            exporter = _console()
        if exporter is not None:
            self.queue = SpanQueue(tracing, resource, exporter=exporter)
        else:
            self.queue = SpanQueue(tracing, resource, transport=transport(tracing))

    # -- ids ---------------------------------------------------------------------------------

    def _new_ids(self) -> int:
        """Draw the ids of the next `_ID_BATCH` new traces; where their hex digits end.

        One draw and one conversion to hex for them all: per trace, they cost a
        tenth of what a draw of 192 bits, `to_bytes` and `hexlify` did (docs/
        performance.md, "An eleventh machine"). The same generator's bits, in order:
        a trace takes the lowest 192 not yet taken."""
        size = 24 * _ID_BATCH
        self._ids = _hexlify(self._rand(8 * size).to_bytes(size, "big"))
        return 2 * size

    def new_span_id(self) -> int:
        while True:
            span_id = self._rand(64)
            if span_id:
                return span_id

    # -- spans -------------------------------------------------------------------------------

    def begin(
        self,
        traceparent: bytes | None,
        tracestate: bytes | None = None,
        name: str = "",
        kind: str = SERVER,
        attributes: dict[str, Any] | None = None,
    ) -> TraceContext:
        """Continue the caller's trace (or start one) for a span of ours.

        Not sampled and the caller's context is valid: that context is carried on as
        it is (the sidecar records nothing, so it adds no hop to the trace). On the
        hot path: the unsampled branches make no span and no dict.
        """
        rand = self._rand
        if not traceparent:
            # The common case, inlined: a new trace. Its ids (a trace id, then a span id
            # that only the next hop sees, as its parent) are the next 48 hex digits.
            end = self._ids_end or self._new_ids()
            start = self._ids_end = end - 48
            ids = self._ids
            trace_hex = ids[start : start + 32]
            span_hex = ids[start + 32 : end]
            if (
                trace_hex != _ZERO_TRACE
                and span_hex != _ZERO_SPAN
                # Decided as Sampler.sample_root does, on the low 64 bits' hex digits.
                and ids[start + 16 : start + 32] >= self._unsampled_from
            ):
                return TraceContext(0, 0, b"00-%s-%s-00" % (trace_hex, span_hex), None)
            # Sampled, or an id is all zeros (invalid, W3C: 1 instead): as integers.
            bits = int(ids[start:end], 16)
            trace_id = (bits >> 64) or 1
            if (trace_id & _LOW64) >= self.sampler.bound:
                span_id = (bits & _LOW64) or 1  # not recorded: the next hop's parent id
                header = b"00-%032x-%016x-00" % (trace_id, span_id)
                return TraceContext(trace_id, span_id, header, None)
            return self._sampled(
                name,
                kind,
                trace_id,
                parent_id=0,
                remote=False,
                state="",
                attributes=attributes,
            )
        parent = parse_traceparent(traceparent)
        if parent is None:  # an invalid header: a new trace, its tracestate dropped
            trace_id = rand(128) or 1
            if not self.sampler.decide(trace_id, None):
                span_id = rand(64) or 1
                header = b"00-%032x-%016x-00" % (trace_id, span_id)
                return TraceContext(trace_id, span_id, header, None)
            parent_id, remote, state = 0, False, ""
        else:
            trace_id, parent_id, parent_sampled = parent
            state = valid_tracestate(tracestate) if tracestate else ""
            if not self.sampler.decide(trace_id, parent_sampled):
                assert traceparent is not None
                return TraceContext(trace_id, parent_id, traceparent.strip(), None, state)
            remote = True
        return self._sampled(
            name,
            kind,
            trace_id,
            parent_id=parent_id,
            remote=remote,
            state=state,
            attributes=attributes,
        )

    def _sampled(
        self,
        name: str,
        kind: str,
        trace_id: int,
        *,
        parent_id: int,
        remote: bool,
        state: str,
        attributes: dict[str, Any] | None,
    ) -> TraceContext:
        span_id = self._rand(64) or 1
        record = SpanRecord(
            name,
            kind,
            trace_id=trace_id,
            span_id=span_id,
            parent_id=parent_id,
            start_ns=time.time_ns(),
            attributes=attributes if attributes is not None else {},
            parent_remote=remote,
            tracestate=state,
        )
        header = b"00-%032x-%016x-01" % (trace_id, span_id)
        return TraceContext(trace_id, span_id, header, record, state)

    def child(
        self, parent: TraceContext, name: str, kind: str, attributes: dict[str, Any]
    ) -> TraceContext:
        """A span under a sampled `parent` (a CLIENT attempt, a PRODUCER publish)."""
        assert parent.span is not None
        span_id = self.new_span_id()
        record = SpanRecord(
            name,
            kind,
            trace_id=parent.trace_id,
            span_id=span_id,
            parent_id=parent.span_id,
            start_ns=time.time_ns(),
            attributes=attributes,
            tracestate=parent.tracestate,
        )
        header = format_traceparent(parent.trace_id, span_id, True)
        return TraceContext(parent.trace_id, span_id, header, record, parent.tracestate)

    def end(self, context: TraceContext, error: str | None = None) -> None:
        """End the context's span now (if it is sampled) and queue it for export."""
        record = context.span
        if record is None:
            return
        record.end_ns = time.time_ns()
        if error is not None:
            record.error = error
        self.queue.put(record)

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        self.queue.start()

    def shutdown(self, timeout: float) -> None:
        """Export what is queued within `timeout` seconds (blocking: call it in a thread)."""
        self.queue.shutdown(timeout)

    def collect(self) -> Iterator[Metric]:
        yield from self.queue.collect()

    def __repr__(self) -> str:
        return f"<Tracer {self.config.exporter} {self.sampler!r} queued={len(self.queue)}>"


class SpanQueue:
    """A bounded queue of ended spans and the thread that exports them in batches.

    `put` is called on the event loop. With an OTLP transport it encodes the span
    there and then (`otlp.Encoder.span`, about 10 µs) and queues the bytes: the
    export thread only joins and sends them, so it never holds the GIL for long
    while the loop's thread waits for it (encoding in the thread, even a few spans
    at a time, cost the loop's requests more than the encoding itself, and widened
    their tail). With an SDK exporter (console, tests) it queues the record, which
    the thread turns into an SDK span. The thread wakes every `schedule_delay`, or
    as soon as a batch is full, and exports up to `max_export_batch_size` spans
    per call. Retries of a slow or failing collector run in this thread while the
    loop keeps queueing, and counting what no longer fits.
    """

    def __init__(
        self,
        config: TracingConfig,
        resource: dict[str, Any],
        *,
        exporter: SpanExporter | None = None,
        transport: Transport | None = None,
    ) -> None:
        assert (exporter is None) != (transport is None), "one way out"
        self.config = config
        self.resource = resource
        self.exporter = exporter
        self.transport = transport
        self.encoder = Encoder(resource)
        self.limit = config.max_queue_size
        self.batch = config.max_export_batch_size
        # Encoded spans (transport) or records (SDK exporter), in the order they ended.
        self._records: deque[Any] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stop_by = math.inf  # monotonic deadline of the final flush
        self._exporter: threading.Thread | None = None
        self.exported = 0
        self.dropped_full = 0
        self.failed = 0
        self.unencodable = 0  # counted with `failed` in the metric
        self.sending = 0  # spans taken from the queue by the export in progress
        self._sdk_resource: Any = None
        self._scope: Any = None
        self._logged_failure = 0.0

    def __len__(self) -> int:
        return len(self._records)

    def put(self, record: SpanRecord) -> None:
        records = self._records
        if len(records) >= self.limit:
            self.dropped_full += 1
            return
        if self.transport is None:
            records.append(record)
        else:
            try:
                records.append(self.encoder.span(record))
            except Exception as exc:  # never the request's problem: counted and logged
                self.unencodable += 1  # the loop's own count: `failed` is the thread's
                self._log_failure(1, f"cannot encode span {record!r}: {exc!r}")
                return
        if len(records) >= self.batch:
            self._wake.set()

    def start(self) -> None:
        if self._exporter is None:
            self._exporter = threading.Thread(target=self._run, name="span-export", daemon=True)
            self._exporter.start()

    def _run(self) -> None:
        delay = self.config.schedule_delay
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            self._drain()
        self._drain()  # the final flush, bounded by _stop_by

    def _drain(self) -> None:
        records = self._records
        while records:
            if time.monotonic() >= self._stop_by:
                return
            batch = [records.popleft() for _ in range(min(self.batch, len(records)))]
            self.sending = len(batch)
            try:
                self._export(batch)
            finally:
                self.sending = 0

    def _export(self, batch: list[Any]) -> None:
        """Export `batch`, counting each span exported or failed. Over the OTLP transport
        a batch too big for one request goes as several, each an export of its own: a
        refused one fails its own spans, and the others are still sent."""
        deadline = min(time.monotonic() + self.config.export_timeout, self._stop_by)
        exported = 0
        error = None
        try:
            if self.transport is None:
                error = self._export_sdk(batch)
                if error is None:
                    exported = len(batch)
            else:
                for body, spans in self.encoder.batch(batch):
                    try:
                        self.transport.send(body, deadline)
                    except ExportError as exc:
                        error = str(exc)
                    else:
                        exported += spans
        except Exception as exc:  # an exporter bug must not kill the thread
            error = f"{type(exc).__name__}: {exc}"
        self.exported += exported
        if error is not None:
            failed = len(batch) - exported
            self.failed += failed
            self._log_failure(failed, error)

    def _log_failure(self, spans: int, error: str) -> None:
        now = time.monotonic()
        if now - self._logged_failure >= 10.0:  # at most one line per 10 s
            self._logged_failure = now
            log.warning(
                "span_export_failed",
                spans=spans,
                endpoint=self.config.endpoint,
                protocol=self.config.protocol,
                error=error,
            )

    def _export_sdk(self, batch: list[SpanRecord]) -> str | None:
        from opentelemetry.sdk.trace.export import SpanExportResult  # noqa: PLC0415

        assert self.exporter is not None
        result = self.exporter.export([self.readable(r) for r in batch])
        return None if result == SpanExportResult.SUCCESS else "the exporter reported a failure"

    def readable(self, record: SpanRecord) -> ReadableSpan:
        """The record as an SDK span (for the console exporter, and to test the encoder)."""
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import ReadableSpan  # noqa: PLC0415
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: PLC0415
        from opentelemetry.trace import (  # noqa: PLC0415
            Link,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            TraceState,
        )

        if self._scope is None:
            self._scope = InstrumentationScope("hms-sidecar", __version__)
            self._sdk_resource = Resource(self.resource)
        state = TraceState.from_header([record.tracestate]) if record.tracestate else None
        sampled = TraceFlags(TraceFlags.SAMPLED)
        context = SpanContext(record.trace_id, record.span_id, False, sampled, state)
        parent = None
        if record.parent_id:
            parent = SpanContext(
                record.trace_id, record.parent_id, record.parent_remote, sampled, state
            )
        links = [
            Link(SpanContext(t, s, True, TraceFlags(1 if f else 0))) for t, s, f in record.links
        ]
        status = Status(StatusCode.ERROR, record.error) if record.error is not None else Status()
        return ReadableSpan(
            record.name,
            context,
            parent,
            resource=self._sdk_resource,
            attributes=record.attributes,
            links=links,
            kind=SpanKind[record.kind],
            status=status,
            start_time=record.start_ns,
            end_time=record.end_ns,
            instrumentation_scope=self._scope,
        )

    def shutdown(self, timeout: float) -> None:
        """Export what is left within `timeout` seconds, then stop (blocking: call it in a
        thread). A collector that hangs is given up on at the deadline."""
        exported, failed = self.exported, self.failed  # before anything can move them
        deadline = time.monotonic() + timeout
        self._stop_by = deadline
        thread = self._exporter
        if thread is None:
            self._drain()
        else:
            self._stop.set()
            self._wake.set()
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._records or (thread is not None and thread.is_alive()):
            lost = len(self._records) + self.sending
            log.warning("spans_not_flushed", spans=lost, timeout_s=timeout)
        elif self.transport is not None:
            self.transport.close()
        elif self.exporter is not None:
            self.exporter.shutdown()
        self._exporter = None
        log.info(
            "tracing_stopped",
            flushed=self.exported - exported,  # exported by this final flush
            failed=self.failed - failed,
            exported=self.exported,
        )

    def collect(self) -> Iterator[Metric]:
        spans = CounterMetricFamily(
            "sidecar_trace_spans",
            "Spans the sidecar recorded, by outcome: exported (accepted by the collector), "
            "dropped (the export queue was full), failed (the export gave up on them).",
            labels=["outcome"],
        )
        spans.add_metric(["exported"], self.exported)
        spans.add_metric(["dropped"], self.dropped_full)
        spans.add_metric(["failed"], self.failed + self.unencodable)
        yield spans
        queued = GaugeMetricFamily(
            "sidecar_trace_export_queue_spans",
            "Spans waiting for export: queued (at most max_queue_size) or being sent.",
        )
        queued.add_metric([], len(self._records) + self.sending)
        yield queued


def resource_attributes(config: Config) -> dict[str, Any]:
    """The traces' resource: OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (parsed by
    config), the instance id, the app's version, the SDK's identity."""
    tracing = config.telemetry.tracing
    attributes: dict[str, Any] = dict(tracing.resource_attributes)
    attributes["service.name"] = tracing.service_name
    attributes.setdefault("service.instance.id", config.service.id)
    version = config.service.meta.get("version")
    if version:
        attributes.setdefault("service.version", version)
    attributes.setdefault("telemetry.sdk.language", "python")
    attributes.setdefault("telemetry.sdk.name", "opentelemetry")
    attributes["sidecar.version"] = __version__
    return attributes


def _console() -> SpanExporter:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

    return ConsoleSpanExporter(out=sys.stdout, formatter=_one_line)


def _one_line(span: ReadableSpan) -> str:
    """The console exporter's line for a span: its JSON on one line."""
    return str(span.to_json(indent=None)) + "\n"


__all__ = [
    "CLIENT",
    "CONSUMER",
    "PRODUCER",
    "SERVER",
    "Sampler",
    "SpanQueue",
    "SpanRecord",
    "TraceContext",
    "Tracer",
    "format_traceparent",
    "parse_traceparent",
]
