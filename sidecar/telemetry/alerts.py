"""Threshold alerts evaluated inside the sidecar (SPEC §3 `alerts`, §9 `sidecar_alerts_firing`).

A background task wakes every `alerts.evaluation_interval` and samples state the
sidecar already keeps: the upstream request counters and latency histogram (read
the way a scrape reads them, so the proxy's hot path pays nothing), breaker
states, the relay's connection and spool depth, and whether Consul answers.
Windowed kinds keep one sample per evaluation in a ring and compare the newest
with the one `window` ago. Each rule moves through Prometheus' states:
inactive → pending (condition true, `for` not yet elapsed) → firing → inactive
again once the condition is false (resolved); `for: 0` fires at once.

Every firing and every resolution is one log line (`alert_firing`,
`alert_resolved`), the `sidecar_alerts_firing{alert}` gauge, an event on topic
`alerts.<name>` handed to the relay (confirmed or spooled, like the app's own),
and, with `alertmanager_url`, a POST to Alertmanager's `/api/v2/alerts`, re-sent
every `resend_interval` while firing with `endsAt` ahead (Prometheus' rule), so
Alertmanager never resolves it on its own.

`Evaluator`, `Notifier`, `histogram_quantile` and `read_upstream_traffic` are
plain code that takes the time as an argument: tests drive them with a fake clock.
`Alerts` adds the task, the event worker and the HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiohttp
from prometheus_client.core import GaugeMetricFamily, Metric

from sidecar.backoff import backoff_delay
from sidecar.config import AlertRuleConfig, Config
from sidecar.errors import ProxyError
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.metrics import Metrics

__all__ = [
    "EVENT_TYPE",
    "AlertSources",
    "Alertmanager",
    "AlertmanagerError",
    "Alerts",
    "Evaluator",
    "Notifier",
    "Traffic",
    "Transition",
    "histogram_quantile",
    "read_upstream_traffic",
    "upstream_traffic",
]

log = get_logger("sidecar.alerts")

INACTIVE, PENDING, FIRING, RESOLVED = "inactive", "pending", "firing", "resolved"
#: The CloudEvents type of the events on topic `alerts.<name>`.
EVENT_TYPE = "io.hms-sidecar.alert"
#: Prometheus sends a firing alert with `endsAt` this many resend periods ahead.
VALID_FOR_RESENDS = 4
#: A resolution Alertmanager could not be told about is tried for this long (Prometheus' 15m).
RESOLVED_RETENTION = 15 * 60.0
#: One POST to Alertmanager, connect included.
SEND_TIMEOUT = 10.0
#: While Alertmanager keeps failing, one log line per this many seconds.
FAILURE_LOG_EVERY = 60.0
QUANTILE = 0.99

_WINDOWED = frozenset({"error_rate", "latency_p99"})
_REQUESTS_SAMPLE = "sidecar_upstream_requests_total"
_BUCKET_SAMPLE = "sidecar_upstream_request_duration_seconds_bucket"


# --- reading the metric families -------------------------------------------------------


class Traffic(NamedTuple):
    """One upstream's cumulative answers, 5xx answers and latency buckets at one moment."""

    answers: float = 0.0
    errors: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count), +Inf last


_NO_TRAFFIC = Traffic()


def read_upstream_traffic(families: Iterable[Metric]) -> dict[str, Traffic]:
    """Per upstream, the totals in these metric families, by series name.

    Reads `sidecar_upstream_requests_total{upstream,code}` and
    `sidecar_upstream_request_duration_seconds_bucket{upstream,le}` wherever they come
    from (a `Counter`, or a collector exporting plain integers at scrape time); other
    series are ignored.
    """
    answers: dict[str, float] = {}
    errors: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in families:
        for sample in family.samples:
            upstream = sample.labels.get("upstream")
            if upstream is None:
                continue
            if sample.name == _REQUESTS_SAMPLE:
                answers[upstream] = answers.get(upstream, 0.0) + sample.value
                if sample.labels.get("code", "").startswith("5"):
                    errors[upstream] = errors.get(upstream, 0.0) + sample.value
            elif sample.name == _BUCKET_SAMPLE:
                le = float(sample.labels.get("le", "+Inf"))
                buckets.setdefault(upstream, []).append((le, sample.value))
    return {
        name: Traffic(
            answers.get(name, 0.0), errors.get(name, 0.0), tuple(sorted(buckets.get(name, ())))
        )
        for name in answers.keys() | buckets.keys()
    }


def upstream_traffic(metrics: Metrics) -> dict[str, Traffic]:
    """The sidecar's upstream traffic now: the one place that knows which objects hold
    those series today. Only these two families are collected, not the whole registry."""
    return read_upstream_traffic(
        itertools.chain(metrics.requests.collect(), metrics.upstream_duration.collect())
    )


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """PromQL's `histogram_quantile` over cumulative (upper bound, count) buckets; None
    where PromQL gives NaN (no observations, no +Inf bucket)."""
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return None
    counts: list[float] = []
    for _, count in ordered:  # counts may not fall (PromQL's ensureMonotonic)
        counts.append(max(count, counts[-1]) if counts else count)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    b = next(i for i, count in enumerate(counts) if count >= rank)
    if b == len(ordered) - 1:
        return ordered[-2][0]
    if b == 0 and ordered[0][0] <= 0:
        return ordered[0][0]
    start, end, count = 0.0, ordered[b][0], counts[b]
    if b > 0:
        start = ordered[b - 1][0]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / count)


def _bucket_increase(
    new: tuple[tuple[float, float], ...], old: tuple[tuple[float, float], ...]
) -> list[tuple[float, float]]:
    before = dict(old)
    return [(le, max(0.0, count - before.get(le, 0.0))) for le, count in new]


# --- evaluation -------------------------------------------------------------------------


def _no_circuit(_: str) -> int:
    return 0


def _no_data() -> None:
    return None


@dataclass(frozen=True, slots=True)
class AlertSources:
    """Where the evaluator reads what it judges; each is called at most once per evaluation.

    `circuit` answers 0 closed, 1 half-open, 2 open. A source answering None has no
    data (no relay yet, say): the rule's condition is false.
    """

    traffic: Callable[[], Mapping[str, Traffic]] = dict
    circuit: Callable[[str], int] = _no_circuit
    spool_depth: Callable[[], int | None] = _no_data
    broker_reachable: Callable[[], bool | None] = _no_data
    consul_reachable: Callable[[], bool | None] = _no_data


@dataclass(frozen=True, slots=True)
class Transition:
    """A rule started firing, or stopped (resolved)."""

    rule: AlertRuleConfig
    state: str  # FIRING or RESOLVED
    value: float | None  # the value that fired it, or the one that resolved it
    started: float  # wall-clock time it started firing
    at: float  # wall-clock time of this transition


@dataclass(slots=True)
class _RuleState:
    rule: AlertRuleConfig
    state: str = INACTIVE
    value: float | None = None
    pending_since: float = 0.0  # monotonic
    active_since: float = 0.0  # wall clock: since the condition holds
    fired_at: float = 0.0  # wall clock
    samples: deque[tuple[float, Traffic]] = field(default_factory=deque)

    def __repr__(self) -> str:
        return f"<alert {self.rule.name} {self.state} value={self.value}>"


class Evaluator:
    """The rules' states; `evaluate` samples the sources once and returns what changed."""

    def __init__(self, rules: Iterable[AlertRuleConfig], sources: AlertSources) -> None:
        self.sources = sources
        self.rules = {rule.name: _RuleState(rule) for rule in rules}
        self._needs_traffic = any(r.rule.kind in _WINDOWED for r in self.rules.values())

    def evaluate(self, now: float, wall: float) -> list[Transition]:
        """Sample at monotonic time `now` (wall-clock `wall`); the rules that fired or
        resolved."""
        traffic = self.sources.traffic() if self._needs_traffic else {}
        transitions: list[Transition] = []
        for rs in self.rules.values():
            rs.value = self._value(rs, now, traffic)
            if _holds(rs.rule, rs.value):
                if rs.state == INACTIVE:
                    rs.state, rs.pending_since, rs.active_since = PENDING, now, wall
                if rs.state == PENDING and now - rs.pending_since >= rs.rule.for_:
                    rs.state, rs.fired_at = FIRING, wall
                    transitions.append(Transition(rs.rule, FIRING, rs.value, wall, wall))
            elif rs.state == FIRING:
                rs.state = INACTIVE
                transitions.append(Transition(rs.rule, RESOLVED, rs.value, rs.fired_at, wall))
            else:
                rs.state = INACTIVE  # a pending alert whose condition ended never fired
        return transitions

    def _value(self, rs: _RuleState, now: float, traffic: Mapping[str, Traffic]) -> float | None:
        rule, sources = rs.rule, self.sources
        kind = rule.kind
        if kind in _WINDOWED:
            return _windowed(rs, now, traffic.get(rule.upstream or "", _NO_TRAFFIC))
        if kind == "circuit_open":
            return float(sources.circuit(rule.upstream or ""))
        if kind == "spool_depth":
            depth = sources.spool_depth()
            return None if depth is None else float(depth)
        reachable = (
            sources.consul_reachable()
            if kind == "consul_unreachable"
            else sources.broker_reachable()
        )
        return None if reachable is None else float(not reachable)

    def firing(self) -> list[_RuleState]:
        return [rs for rs in self.rules.values() if rs.state == FIRING]

    def __repr__(self) -> str:
        states = {rs.rule.name: rs.state for rs in self.rules.values()}
        return f"<Evaluator {states}>"


def _windowed(rs: _RuleState, now: float, current: Traffic) -> float | None:
    """The rule's value over its window: the newest sample against the latest one taken
    at least `window` ago (the oldest there is while the ring is younger than that, the
    first being all zeros: what the counters held when the sidecar started)."""
    rule, ring = rs.rule, rs.samples
    if not ring:  # the counters started with the process, just before the first evaluation
        ring.append((now, _NO_TRAFFIC))
    ring.append((now, current))
    while len(ring) > 1 and ring[1][0] <= now - rule.window:
        ring.popleft()
    base = ring[0][1]
    answers = current.answers - base.answers
    if answers < 0:  # the counters restarted: what they hold now is the increase
        answers, base = current.answers, _NO_TRAFFIC
    if rule.kind == "error_rate":
        if answers < rule.min_requests:
            return None
        return max(0.0, current.errors - base.errors) / answers
    increase = _bucket_increase(current.buckets, base.buckets)
    if not increase or increase[-1][1] < rule.min_requests:
        return None
    return histogram_quantile(QUANTILE, increase)


def _holds(rule: AlertRuleConfig, value: float | None) -> bool:
    if value is None:
        return False
    if rule.kind in ("error_rate", "latency_p99"):
        assert rule.threshold is not None  # config requires it
        return value > rule.threshold
    if rule.kind == "spool_depth":
        assert rule.threshold is not None
        return value >= rule.threshold
    return value >= 1  # circuit half-open/open; consul or broker unreachable


# --- Alertmanager ---------------------------------------------------------------------


class AlertmanagerError(Exception):
    """A POST to Alertmanager failed; the message says how."""


@dataclass(slots=True)
class _Outgoing:
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    resolved_at: float | None  # wall clock; None while firing
    due: float  # monotonic: send at or after this
    generation: int
    expires: float = math.inf  # monotonic: a resolution given up on after this


@dataclass(frozen=True, slots=True)
class Batch:
    """One POST body and which entries (name, generation) it carries."""

    alerts: list[dict[str, Any]]
    sent: tuple[tuple[str, int], ...]


class Notifier:
    """What to tell Alertmanager and when, like Prometheus' notifier.

    A firing alert is sent at once, then every `resend_interval` while it fires, with
    `endsAt` = now + 4 x max(resend_interval, evaluation_interval), so Alertmanager
    keeps it active between sends. A resolution is sent once with `endsAt` = the time
    it resolved. After a failed POST nothing is sent until a back-off (from
    `evaluation_interval` doubling up to `resend_interval`) has passed; what was due
    stays due, and a resolution is retried for `RESOLVED_RETENTION` at most.
    """

    def __init__(
        self,
        resend_interval: float,
        evaluation_interval: float,
        generator_url: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.resend_interval = resend_interval
        self.evaluation_interval = evaluation_interval
        self.valid_for = VALID_FOR_RESENDS * max(resend_interval, evaluation_interval)
        self.generator_url = generator_url
        self.failures = 0
        self.retry_at = 0.0
        self._entries: dict[str, _Outgoing] = {}
        self._generation = itertools.count(1)
        self._rng = rng or random.Random()

    def fired(
        self,
        name: str,
        labels: dict[str, str],
        annotations: dict[str, str],
        started: float,
        now: float,
    ) -> None:
        self._entries[name] = _Outgoing(
            labels, annotations, started, None, now, next(self._generation)
        )

    def resolved(self, name: str, at: float, now: float) -> None:
        entry = self._entries.get(name)
        if entry is None:
            return
        entry.resolved_at = at
        entry.due = now
        entry.generation = next(self._generation)
        entry.expires = now + RESOLVED_RETENTION

    def take(self, now: float, wall: float) -> Batch | None:
        """The alerts due now as one POST body, or None (nothing due, or backing off)."""
        if now < self.retry_at:
            return None
        for name, entry in list(self._entries.items()):
            if now > entry.expires:
                del self._entries[name]
                log.warning(
                    "alertmanager_resolution_dropped",
                    name=name,
                    reason=f"not delivered within {RESOLVED_RETENTION:g}s",
                )
        due = [(name, e) for name, e in self._entries.items() if e.due <= now]
        if not due:
            return None
        return Batch(
            [self._payload(e, wall) for _, e in due],
            tuple((name, e.generation) for name, e in due),
        )

    def _payload(self, entry: _Outgoing, wall: float) -> dict[str, Any]:
        ends = entry.resolved_at if entry.resolved_at is not None else wall + self.valid_for
        payload: dict[str, Any] = {
            "labels": entry.labels,
            "annotations": entry.annotations,
            "startsAt": iso_time(entry.starts_at),
            "endsAt": iso_time(ends),
        }
        if self.generator_url:
            payload["generatorURL"] = self.generator_url
        return payload

    def delivered(self, batch: Batch, now: float) -> None:
        self.failures, self.retry_at = 0, 0.0
        for name, generation in batch.sent:
            entry = self._entries.get(name)
            if entry is None or entry.generation != generation:
                continue  # it changed while the POST was under way: send the news
            if entry.resolved_at is not None:
                del self._entries[name]
            else:
                entry.due = now + self.resend_interval

    def failed(self, now: float) -> float:
        """Back off after a failed POST; the delay."""
        self.failures += 1
        delay = backoff_delay(
            self.failures, self.evaluation_interval, self.resend_interval, self._rng
        )
        self.retry_at = now + delay
        return delay

    def __repr__(self) -> str:
        return f"<Notifier entries={len(self._entries)} failures={self.failures}>"


class Alertmanager:
    """POSTs alert lists to `<base_url>/api/v2/alerts` over one aiohttp session."""

    def __init__(self, base_url: str, timeout: float = SEND_TIMEOUT) -> None:
        self.url = base_url.rstrip("/") + "/api/v2/alerts"
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, alerts: list[dict[str, Any]]) -> None:
        """Raises AlertmanagerError unless Alertmanager answered 2xx."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self._session.post(self.url, json=alerts) as resp:
                if resp.status >= 300:
                    text = (await resp.text(errors="replace"))[:200].strip()
                    raise AlertmanagerError(f"HTTP {resp.status} from {self.url}: {text}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise AlertmanagerError(f"cannot POST to {self.url}: {reason}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"<Alertmanager {self.url}>"


# --- the running service --------------------------------------------------------------

Publish = Callable[[str, list[tuple[bytes, bytes]], bytes], Awaitable[bytes]]
Post = Callable[[list[dict[str, Any]]], Awaitable[None]]


class Alerts:
    """The evaluation task and everything a transition sets off. The app owns start/stop.

    `publish` is the relay's (None without events); `post` sends to Alertmanager
    (default: an `Alertmanager` client when `alerts.alertmanager_url` is set); `clock`
    is the monotonic clock of `tick`'s `now`.
    """

    def __init__(
        self,
        config: Config,
        sources: AlertSources,
        *,
        publish: Publish | None = None,
        post: Post | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        alerts = config.alerts
        self._clock = clock
        self.config = alerts
        self.service = config.service.name
        self.instance = config.service.id
        self.evaluator = Evaluator(alerts.rules, sources)
        self._publish = publish
        self._client: Alertmanager | None = None
        if post is None and alerts.alertmanager_url:
            self._client = Alertmanager(alerts.alertmanager_url)
            post = self._client.post
        self._post = post
        self.notifier: Notifier | None = None
        if post is not None:
            self.notifier = Notifier(
                alerts.resend_interval, alerts.evaluation_interval, _generator_url(config)
            )
        self.last_sent: float | None = None  # wall clock of the last accepted POST
        self.last_error: str | None = None
        self._logged_failure = -math.inf
        self._sending: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[tuple[str, list[tuple[bytes, bytes]], bytes]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    # --- life -----------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name="alerts-evaluate")]
        if self._publish is not None:
            self._tasks.append(loop.create_task(self._publish_events(), name="alerts-events"))

    async def stop(self, within: float = 5.0) -> None:
        """Stop evaluating; within `within` seconds, hand queued events to the relay (which must
        still be running: a resolution just before shutdown is then confirmed or spooled)
        and give Alertmanager what is due. Firing alerts are not resolved: the sidecar
        going away does not mean the condition ended (Alertmanager lets them expire at
        `endsAt`)."""
        tasks, self._tasks = self._tasks, []
        if tasks:
            tasks[0].cancel()  # the evaluation: nothing new from here on
        deadline = self._clock() + within
        left = self._events.qsize()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._events.join()
                left = 0
        if left:
            log.warning("alert_events_not_published", events=self._events.qsize(), reason="timeout")
        await self._last_send(max(0.1, deadline - self._clock()))
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.close()

    async def _last_send(self, within: float) -> None:
        if self.notifier is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                if self._sending is not None:
                    await asyncio.shield(self._sending)
                self.notifier.retry_at = 0.0  # the last chance: no back-off
                batch = self.notifier.take(self._clock(), time.time())
                if batch is not None:
                    await self._send(batch)
        if self._sending is not None and not self._sending.done():
            self._sending.cancel()

    async def _run(self) -> None:
        interval = self.config.evaluation_interval
        next_at = self._clock()
        while True:
            now = self._clock()
            next_at = max(next_at + interval, now)  # the loop was busy: skip missed ones
            await asyncio.sleep(next_at - now)
            try:
                self.tick(self._clock(), time.time())
            except Exception:  # a bug in one evaluation must not end alerting
                log.exception("alert_evaluation_failed")

    # --- one evaluation -------------------------------------------------------------

    def tick(self, now: float, wall: float) -> None:
        """Evaluate every rule at monotonic `now` / wall-clock `wall`, act on each
        transition, and start a POST to Alertmanager if one is due."""
        for change in self.evaluator.evaluate(now, wall):
            self._log(change)
            labels = self.labels(change.rule)
            annotations = self.annotations(change.rule, change.value)
            if self._publish is not None:
                self._events.put_nowait(self._event(change, labels, annotations))
            if self.notifier is not None:
                if change.state == FIRING:
                    self.notifier.fired(change.rule.name, labels, annotations, change.at, now)
                else:
                    self.notifier.resolved(change.rule.name, change.at, now)
        if self.notifier is not None and (self._sending is None or self._sending.done()):
            batch = self.notifier.take(now, wall)
            if batch is not None:
                self._sending = asyncio.get_running_loop().create_task(
                    self._send(batch), name="alerts-alertmanager"
                )

    def _log(self, change: Transition) -> None:
        rule = change.rule
        fields: dict[str, Any] = {
            "name": rule.name,
            "kind": rule.kind,
            "value": _rounded(change.value),
            "threshold": rule.threshold,
            "upstream": rule.upstream,
            "severity": rule.severity,
        }
        if change.state == FIRING:
            log.warning("alert_firing", for_s=rule.for_, **fields)
        else:
            log.info("alert_resolved", fired_for_s=round(change.at - change.started, 3), **fields)

    async def _send(self, batch: Batch) -> None:
        assert self._post is not None
        assert self.notifier is not None
        try:
            await self._post(batch.alerts)
        except Exception as exc:  # AlertmanagerError, or a bug: never the end of alerting
            now = self._clock()
            delay = self.notifier.failed(now)
            self.last_error = str(exc) or type(exc).__name__
            if not isinstance(exc, AlertmanagerError):
                log.exception("alertmanager_send_bug")
            if now - self._logged_failure >= FAILURE_LOG_EVERY:
                self._logged_failure = now
                log.warning(
                    "alertmanager_send_failed",
                    error=str(exc),
                    alerts=len(batch.alerts),
                    failures=self.notifier.failures,
                    retry_in_s=round(delay, 3),
                )
            return
        if self.last_error is not None:
            log.info("alertmanager_send_recovered", after_failures=self.notifier.failures)
        self._logged_failure = -math.inf
        self.last_error = None
        self.last_sent = time.time()
        self.notifier.delivered(batch, self._clock())

    # --- what a transition says -----------------------------------------------------

    def labels(self, rule: AlertRuleConfig) -> dict[str, str]:
        """The alert's identity in Alertmanager: constant for as long as it fires."""
        labels = {
            "alertname": rule.name,
            "service": self.service,
            "instance": self.instance,
            "severity": rule.severity,
            "kind": rule.kind,
        }
        if rule.upstream:
            labels["upstream"] = rule.upstream
        return labels

    def annotations(self, rule: AlertRuleConfig, value: float | None) -> dict[str, str]:
        summary, description = default_texts(rule)
        return {
            "summary": rule.summary or summary,
            "description": rule.description or description,
            "value": "" if value is None else f"{value:.6g}",
        }

    def _event(
        self, change: Transition, labels: dict[str, str], annotations: dict[str, str]
    ) -> tuple[str, list[tuple[bytes, bytes]], bytes]:
        rule = change.rule
        body = {
            "name": rule.name,
            "kind": rule.kind,
            "state": change.state,
            "value": _rounded(change.value),
            "threshold": rule.threshold,
            "labels": labels,
            "annotations": annotations,
            "startsAt": iso_time(change.started),
            "endsAt": iso_time(change.at) if change.state == RESOLVED else None,
        }
        key = f"hms-sidecar/{self.instance}/{rule.name}/{change.state}/{change.started:.3f}"
        headers = [
            (b"content-type", b"application/json"),
            (b"ce-type", EVENT_TYPE.encode()),
            (b"ce-id", str(uuid.uuid5(uuid.NAMESPACE_URL, key)).encode()),
            (b"ce-subject", rule.name.encode()),
        ]
        return f"alerts.{rule.name}", headers, json.dumps(body).encode()

    async def _publish_events(self) -> None:
        """One event at a time, in order: a resolution never overtakes its firing."""
        assert self._publish is not None
        while True:
            topic, headers, body = await self._events.get()
            try:
                await self._publish(topic, headers, body)
            except ProxyError as exc:
                log.warning("alert_event_refused", topic=topic, error=exc.message)
            except Exception:  # a bug in the relay must not stop the next events
                log.exception("alert_event_failed", topic=topic)
            finally:
                self._events.task_done()

    # --- what others read -----------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """`sidecar_alerts_firing{alert}`: one series per configured rule."""
        gauge = GaugeMetricFamily(
            "sidecar_alerts_firing",
            "1 while the alert fires, else 0; one series per configured rule.",
            labels=["alert"],
        )
        for name, rs in self.evaluator.rules.items():
            gauge.add_metric([name], 1.0 if rs.state == FIRING else 0.0)
        yield gauge

    def status(self) -> dict[str, Any]:
        """The `alerts` part of /v1/status."""
        firing: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        for rs in self.evaluator.rules.values():
            if rs.state == INACTIVE:
                continue
            rule = rs.rule
            entry = {
                "name": rule.name,
                "kind": rule.kind,
                "upstream": rule.upstream,
                "severity": rule.severity,
                "since": iso_time(rs.fired_at if rs.state == FIRING else rs.active_since),
                "value": _rounded(rs.value),
                "threshold": rule.threshold,
            }
            (firing if rs.state == FIRING else pending).append(entry)
        alertmanager = None
        if self.config.alertmanager_url:
            alertmanager = {
                "url": self.config.alertmanager_url,
                "last_sent": None if self.last_sent is None else iso_time(self.last_sent),
                "last_error": self.last_error,
            }
        return {
            "rules": len(self.evaluator.rules),
            "firing": firing,
            "pending": pending,
            "alertmanager": alertmanager,
        }

    def __repr__(self) -> str:
        firing = [rs.rule.name for rs in self.evaluator.firing()]
        return f"<Alerts rules={len(self.evaluator.rules)} firing={firing}>"


# --- helpers ----------------------------------------------------------------------------


def iso_time(wall: float) -> str:
    """RFC 3339 in UTC with milliseconds, as Alertmanager and CloudEvents take it."""
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _generator_url(config: Config) -> str | None:
    """Where the alert comes from: this sidecar's /v1/status, as seen from its service
    address (None when the admin port is chosen at bind time)."""
    port = config.admin.listen.port
    if port == 0:
        return None
    host = config.service.address
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/v1/status"


def seconds_text(seconds: float) -> str:
    """`500ms`, `30s`, `1m`, `1m30s`, `2h`: a duration as the config writes it."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds < 60 or seconds % 1:
        return f"{seconds:g}s"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts)


def default_texts(rule: AlertRuleConfig) -> tuple[str, str]:
    """The summary and description of a rule that sets none."""
    up, threshold = rule.upstream, rule.threshold or 0.0
    window = seconds_text(rule.window)
    held = f" for {seconds_text(rule.for_)}" if rule.for_ else ""
    if rule.kind == "error_rate":
        return (
            f"High 5xx rate calling upstream {up}",
            f"More than {threshold * 100:.4g}% of the answers the app got from upstream {up} were "
            f"5xx over {window} (at least {rule.min_requests} answers){held}.",
        )
    if rule.kind == "latency_p99":
        return (
            f"Slow upstream {up}",
            f"The 99th percentile of upstream {up}'s response time was above "
            f"{seconds_text(threshold)} over {window} (at least {rule.min_requests} "
            f"answers){held}.",
        )
    if rule.kind == "circuit_open":
        return (
            f"Circuit open for upstream {up}",
            f"The circuit breaker of upstream {up} is open or half-open{held}: calls fail "
            "fast with 503 CIRCUIT_OPEN (or get the fallback).",
        )
    if rule.kind == "spool_depth":
        return (
            "Event spool backing up",
            f"At least {threshold:g} events wait in the local spool{held}: RabbitMQ is not "
            "taking them (down, slow, nacking, or no queue bound for their topic).",
        )
    if rule.kind == "consul_unreachable":
        return (
            "Consul unreachable",
            f"The sidecar's calls to Consul fail{held} (registration, health reports or an "
            "upstream's watch); the last known endpoints keep serving.",
        )
    return (
        "RabbitMQ unreachable",
        f"The event relay has no connection to RabbitMQ{held}; published events go to "
        "the local spool.",
    )
