"""Threshold alerts: windows, `for:` holds, PromQL's quantile, Alertmanager's schedule, and
what a transition sets off (log line, gauge, event, POST), all on a fake clock."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from sidecar.config import AlertRuleConfig, Config, config_from_mapping
from sidecar.errors import ErrorCode, ProxyError
from sidecar.telemetry.alerts import (
    EVENT_TYPE,
    RESOLVED_RETENTION,
    AlertmanagerError,
    Alerts,
    AlertSources,
    Evaluator,
    Notifier,
    Traffic,
    Transition,
    histogram_quantile,
    iso_time,
    read_upstream_traffic,
    upstream_traffic,
)
from sidecar.telemetry.logging import configure_logging
from sidecar.telemetry.metrics import LATENCY_BUCKETS, Metrics

T0 = 1_800_000_000.0  # a wall-clock origin for the fake clock


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test starts from, and leaves behind, the logging setup it found."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def rule(name: str = "r", kind: str = "circuit_open", **fields: Any) -> AlertRuleConfig:
    if kind in ("error_rate", "latency_p99", "circuit_open"):
        fields.setdefault("upstream", "billing")
    return AlertRuleConfig(name=name, kind=kind, **fields)


@dataclass
class World:
    """Mutable state behind fake sources: what the evaluator will read next."""

    traffic: dict[str, Traffic] = field(default_factory=dict)
    circuit: int = 0
    depth: int | None = 0
    broker: bool | None = True
    consul: bool | None = True
    reads: int = 0

    def sources(self) -> AlertSources:
        def traffic() -> dict[str, Traffic]:
            self.reads += 1
            return self.traffic

        return AlertSources(
            traffic=traffic,
            circuit=lambda _: self.circuit,
            spool_depth=lambda: self.depth,
            broker_reachable=lambda: self.broker,
            consul_reachable=lambda: self.consul,
        )

    def serve(self, answers: int, errors: int = 0, latency: float = 0.01) -> None:
        """`answers` more requests to billing, `errors` of them 5xx, each taking `latency`."""
        old = self.traffic.get("billing", Traffic(buckets=_buckets({})))
        counts = dict(old.buckets)
        for le in counts:
            if latency <= le:
                counts[le] += answers
        self.traffic["billing"] = Traffic(
            old.answers + answers, old.errors + errors, tuple(sorted(counts.items()))
        )


def _buckets(counts: dict[float, float]) -> tuple[tuple[float, float], ...]:
    return tuple((le, counts.get(le, 0.0)) for le in (*LATENCY_BUCKETS, float("inf")))


def states(evaluator: Evaluator) -> dict[str, str]:
    return {name: rs.state for name, rs in evaluator.rules.items()}


def run(evaluator: Evaluator, *times: float) -> list[tuple[float, str, str]]:
    """Evaluate at each time; (time, rule, firing|resolved) for every transition."""
    return [
        (t, change.rule.name, change.state)
        for t in times
        for change in evaluator.evaluate(t, T0 + t)
    ]


class TestHistogramQuantile:
    def test_interpolates_inside_the_bucket_holding_the_rank(self) -> None:
        """50 under 0.1s, 40 more under 0.5s, 10 more under 1s: the 99th of 100 lies 9/10
        into the (0.5, 1] bucket, as PromQL's histogram_quantile computes it."""
        buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
        assert 0.95 == pytest.approx(histogram_quantile(0.99, buckets))

    def test_first_bucket_interpolates_from_zero(self) -> None:
        """All observations under 0.1s: the quantile is 0.99 of the way to 0.1."""
        buckets = [(0.1, 100.0), (float("inf"), 100.0)]
        assert 0.099 == pytest.approx(histogram_quantile(0.99, buckets))

    def test_rank_in_the_inf_bucket_gives_the_highest_finite_bound(self) -> None:
        """When the rank falls above every finite bound, PromQL answers the largest one."""
        buckets = [(0.1, 1.0), (10.0, 2.0), (float("inf"), 100.0)]
        assert 10.0 == histogram_quantile(0.99, buckets)

    @pytest.mark.parametrize(
        "buckets",
        [[], [(0.1, 0.0), (float("inf"), 0.0)], [(0.1, 3.0), (1.0, 5.0)]],
        ids=["no buckets", "no observations", "no +Inf bucket"],
    )
    def test_undefined_is_none(self, buckets: list[tuple[float, float]]) -> None:
        """Where PromQL answers NaN, there is no value."""
        assert None is histogram_quantile(0.99, buckets)


class TestReadUpstreamTraffic:
    def test_reads_the_sidecars_own_families(self) -> None:
        """Answers by status and latency observations become answers, 5xx answers and
        cumulative buckets per upstream."""
        metrics = Metrics()
        for code, times in (("200", 7), ("503", 2), ("502", 1), ("404", 1)):
            for _ in range(times):
                metrics.upstream_requests.labels("billing", code).inc()
        metrics.upstream_duration.labels("billing").observe(0.003)
        metrics.upstream_duration.labels("billing").observe(2.0)
        billing = upstream_traffic(metrics)["billing"]
        buckets = dict(billing.buckets)
        assert (11.0, 3.0) == (billing.answers, billing.errors)
        assert (0.0, 1.0, 2.0, 2.0) == (
            buckets[0.0025],
            buckets[0.005],
            buckets[2.5],
            buckets[float("inf")],
        )

    def test_reads_series_by_name_whoever_exports_them(self) -> None:
        """The same series exported by a scrape-time collector (plain integers) read the
        same; series of other names are ignored."""
        requests = CounterMetricFamily(
            "sidecar_upstream_requests", "x", labels=["upstream", "code"]
        )
        requests.add_metric(["audit", "200"], 4)
        requests.add_metric(["audit", "500"], 1)
        duration = HistogramMetricFamily(
            "sidecar_upstream_request_duration_seconds", "x", labels=["upstream"]
        )
        duration.add_metric(["audit"], [("0.1", 4), ("+Inf", 5)], sum_value=1.0)
        other = CounterMetricFamily("sidecar_retries", "x", labels=["upstream"])
        other.add_metric(["audit"], 9)
        assert {"audit": Traffic(5.0, 1.0, ((0.1, 4.0), (float("inf"), 5.0)))} == (
            read_upstream_traffic([requests, duration, other])
        )


class TestLifecycle:
    def test_for_holds_the_alert_pending_then_fires(self) -> None:
        """With `for: 3s` the alert is pending while the condition holds less than 3 s and
        fires at the first evaluation 3 s after it began."""
        world = World(circuit=2)
        evaluator = Evaluator([rule(for_=3.0)], world.sources())
        assert [] == run(evaluator, 10.0, 11.0, 12.0)
        assert {"r": "pending"} == states(evaluator)
        assert [(13.0, "r", "firing")] == run(evaluator, 13.0)
        assert [] == run(evaluator, 14.0)

    def test_for_zero_fires_at_once(self) -> None:
        """Without `for`, the first evaluation that sees the condition fires it."""
        world = World(circuit=2)
        evaluator = Evaluator([rule()], world.sources())
        assert [(0.0, "r", "firing")] == run(evaluator, 0.0)

    def test_pending_alert_whose_condition_ends_never_fires(self) -> None:
        """A condition shorter than `for` leaves no trace: back to inactive, no transition,
        and the hold starts over next time."""
        world = World(circuit=2)
        evaluator = Evaluator([rule(for_=3.0)], world.sources())
        run(evaluator, 0.0, 2.0)
        world.circuit = 0
        assert [] == run(evaluator, 2.5)
        assert {"r": "inactive"} == states(evaluator)
        world.circuit = 2
        assert [] == run(evaluator, 4.0, 6.0)
        assert [(7.0, "r", "firing")] == run(evaluator, 7.0)

    def test_resolves_when_the_condition_ends(self) -> None:
        """A firing alert resolves at the first evaluation without its condition; the
        transition keeps when it started firing."""
        world = World(circuit=2)
        evaluator = Evaluator([rule()], world.sources())
        run(evaluator, 0.0, 1.0)
        world.circuit = 0
        [change] = evaluator.evaluate(5.0, T0 + 5.0)
        assert Transition(rule(), "resolved", 0.0, T0, T0 + 5.0) == change
        assert {"r": "inactive"} == states(evaluator)

    def test_half_open_circuit_still_counts_as_open(self) -> None:
        """circuit_open holds while the circuit is open (2) or half-open (1), so it does
        not resolve and fire again every `open_for` while probes keep failing."""
        world = World(circuit=2)
        evaluator = Evaluator([rule()], world.sources())
        run(evaluator, 0.0)
        world.circuit = 1
        assert [] == run(evaluator, 1.0)
        world.circuit = 0
        assert [(2.0, "r", "resolved")] == run(evaluator, 2.0)

    def test_no_data_is_not_a_firing_condition(self) -> None:
        """A source without an answer (the relay's first connection not tried yet) keeps
        the rule inactive; once unreachable it fires."""
        world = World(broker=None)
        evaluator = Evaluator([rule(kind="broker_unreachable")], world.sources())
        assert [] == run(evaluator, 0.0)
        world.broker = False
        assert [(1.0, "r", "firing")] == run(evaluator, 1.0)

    @pytest.mark.parametrize(("depth", "fires"), [(99, False), (100, True), (None, False)], ids=str)
    def test_spool_depth_fires_at_the_threshold(self, depth: int | None, fires: bool) -> None:
        """spool_depth fires when at least `threshold` events wait in the spool."""
        world = World(depth=depth)
        evaluator = Evaluator([rule(kind="spool_depth", threshold=100.0)], world.sources())
        assert fires == bool(run(evaluator, 0.0))

    def test_consul_unreachable(self) -> None:
        """consul_unreachable fires while Consul does not answer and resolves once it does."""
        world = World(consul=False)
        evaluator = Evaluator([rule(kind="consul_unreachable")], world.sources())
        run(evaluator, 0.0)
        world.consul = True
        assert [(1.0, "r", "resolved")] == run(evaluator, 1.0)

    def test_traffic_is_read_only_for_windowed_rules(self) -> None:
        """Without error_rate or latency_p99 rules the metric families are never collected."""
        world = World()
        Evaluator([rule()], world.sources()).evaluate(0.0, T0)
        assert 0 == world.reads


class TestErrorRate:
    @staticmethod
    def evaluator(world: World, **fields: Any) -> Evaluator:
        fields.setdefault("threshold", 0.1)
        fields.setdefault("window", 10.0)
        return Evaluator([rule(kind="error_rate", **fields)], world.sources())

    def test_fires_on_the_share_of_5xx_in_the_window(self) -> None:
        """20 answers, 4 of them 5xx within the window: 0.2 > 0.1 fires, with that value."""
        world = World()
        evaluator = self.evaluator(world)
        evaluator.evaluate(0.0, T0)
        world.serve(20, errors=4)
        [change] = evaluator.evaluate(1.0, T0 + 1.0)
        assert ("firing", 0.2) == (change.state, change.value)

    def test_needs_min_requests_answers(self) -> None:
        """9 answers, all 5xx, are fewer than min_requests 10: no value, no alert; one more
        answer makes it fire."""
        world = World()
        evaluator = self.evaluator(world)
        evaluator.evaluate(0.0, T0)
        world.serve(9, errors=9)
        assert [] == evaluator.evaluate(1.0, T0 + 1.0)
        assert None is evaluator.rules["r"].value
        world.serve(1, errors=1)
        assert ["firing"] == [c.state for c in evaluator.evaluate(2.0, T0 + 2.0)]

    def test_counts_only_the_window(self) -> None:
        """Errors older than the window drop out: the rate is the difference between now
        and the sample `window` ago."""
        world = World()
        evaluator = self.evaluator(world, window=10.0)
        evaluator.evaluate(0.0, T0)
        world.serve(100, errors=50)
        assert ["firing"] == [c.state for c in evaluator.evaluate(1.0, T0 + 1.0)]
        for t in range(2, 11):
            evaluator.evaluate(float(t), T0 + t)
        world.serve(100, errors=0)
        # At 11 s the base is the sample at 1 s, after the 50 errors: 0 of 100 in the window.
        [change] = evaluator.evaluate(11.0, T0 + 11.0)
        assert ("resolved", 0.0) == (change.state, change.value)

    def test_ring_holds_one_window_of_samples(self) -> None:
        """Old samples are dropped: the ring never holds more than a window and one more."""
        world = World()
        evaluator = self.evaluator(world, window=10.0)
        for t in range(100):
            evaluator.evaluate(float(t), T0 + t)
        assert 11 == len(evaluator.rules["r"].samples)

    def test_before_a_full_window_everything_since_start_counts(self) -> None:
        """Right after start the window is as long as the sidecar has run: the counters
        began at zero with the process, so answers before the first evaluation count."""
        world = World()
        world.serve(10, errors=10)  # before the first evaluation
        evaluator = self.evaluator(world, window=60.0)
        assert ["firing"] == [c.state for c in evaluator.evaluate(0.0, T0)]
        world.serve(30, errors=0)
        evaluator.evaluate(1.0, T0 + 1.0)
        assert 0.25 == evaluator.rules["r"].value


class TestLatencyP99:
    def test_fires_on_the_quantile_of_the_windows_observations(self) -> None:
        """Many fast answers before the window do not dilute 20 slow ones in it:
        p99 comes from bucket increases, like histogram_quantile over rate()."""
        world = World()
        world.serve(10_000, latency=0.001)
        evaluator = Evaluator(
            [rule(kind="latency_p99", threshold=0.5, window=5.0)], world.sources()
        )
        for t in range(7):
            evaluator.evaluate(float(t), T0 + t)
        world.serve(20, latency=2.0)
        [change] = evaluator.evaluate(7.0, T0 + 7.0)
        # All 20 in (1, 2.5]: the rank 19.8 of 20 lies 0.99 of the way through it.
        assert "firing" == change.state
        assert pytest.approx(1.0 + 1.5 * 0.99) == change.value

    def test_fast_answers_do_not_fire(self) -> None:
        """p99 under the threshold: no alert."""
        world = World()
        evaluator = Evaluator(
            [rule(kind="latency_p99", threshold=0.5, window=5.0)], world.sources()
        )
        evaluator.evaluate(0.0, T0)
        world.serve(50, latency=0.02)
        assert [] == evaluator.evaluate(1.0, T0 + 1.0)
        assert 0.025 > (evaluator.rules["r"].value or 0) > 0.01


LABELS = {"alertname": "r"}
NOTES = {"summary": "s"}


class TestNotifier:
    def notifier(self, resend: float = 60.0, interval: float = 1.0) -> Notifier:
        return Notifier(resend, interval, "http://10.0.0.1:9902/v1/status", random.Random(7))

    def test_firing_alert_is_sent_at_once_then_every_resend_interval(self) -> None:
        """Sent when it fires, not again before resend_interval, then again, each time
        with endsAt = now + 4 x max(resend_interval, evaluation_interval)."""
        notifier = self.notifier(resend=60.0)
        notifier.fired("r", LABELS, NOTES, T0 + 5.0, now=5.0)
        sent_at = []
        for t in range(5, 200):
            batch = notifier.take(float(t), T0 + t)
            if batch is not None:
                [alert] = batch.alerts
                assert iso_time(T0 + t + 240.0) == alert["endsAt"]
                assert iso_time(T0 + 5.0) == alert["startsAt"]
                notifier.delivered(batch, float(t))
                sent_at.append(t)
        assert [5, 65, 125, 185] == sent_at

    def test_payload_is_alertmanagers_postable_alert(self) -> None:
        """labels, annotations, startsAt, endsAt and generatorURL, as /api/v2/alerts takes."""
        notifier = self.notifier()
        notifier.fired("r", LABELS, NOTES, T0, now=0.0)
        batch = notifier.take(0.0, T0)
        assert batch is not None
        assert [
            {
                "labels": {"alertname": "r"},
                "annotations": {"summary": "s"},
                "startsAt": iso_time(T0),
                "endsAt": iso_time(T0 + 240.0),
                "generatorURL": "http://10.0.0.1:9902/v1/status",
            }
        ] == batch.alerts

    def test_resolution_is_sent_once_ending_when_it_resolved(self) -> None:
        """A resolution goes out at the next send with endsAt = the time it resolved, and
        is forgotten once delivered."""
        notifier = self.notifier()
        notifier.fired("r", LABELS, NOTES, T0, now=0.0)
        first = notifier.take(0.0, T0)
        assert first is not None
        notifier.delivered(first, 0.0)
        notifier.resolved("r", T0 + 7.0, now=7.0)
        batch = notifier.take(7.5, T0 + 7.5)
        assert batch is not None
        assert [iso_time(T0 + 7.0)] == [a["endsAt"] for a in batch.alerts]
        notifier.delivered(batch, 7.5)
        assert None is notifier.take(1000.0, T0 + 1000.0)

    def test_failed_post_backs_off_and_keeps_the_alert_due(self) -> None:
        """After a failure nothing is sent until the back-off passes; then the same alert
        again. Back-offs double from evaluation_interval up to resend_interval."""
        notifier = self.notifier(resend=60.0, interval=1.0)
        notifier.fired("r", LABELS, NOTES, T0, now=0.0)
        assert notifier.take(0.0, T0) is not None
        delays = [notifier.failed(0.0) for _ in range(10)]
        assert all(0.5 * min(60.0, 2.0**i) <= d <= min(60.0, 2.0**i) for i, d in enumerate(delays))
        assert None is notifier.take(notifier.retry_at - 0.01, T0)
        assert notifier.take(notifier.retry_at, T0) is not None

    def test_change_during_a_post_is_sent_next(self) -> None:
        """An alert that resolves while its firing POST is under way: delivering the old
        POST does not swallow the resolution."""
        notifier = self.notifier()
        notifier.fired("r", LABELS, NOTES, T0, now=0.0)
        batch = notifier.take(0.0, T0)
        assert batch is not None
        notifier.resolved("r", T0 + 1.0, now=1.0)
        notifier.delivered(batch, 1.5)
        again = notifier.take(1.5, T0 + 1.5)
        assert again is not None
        assert [iso_time(T0 + 1.0)] == [a["endsAt"] for a in again.alerts]

    def test_undeliverable_resolution_is_dropped_after_the_retention(self) -> None:
        """Alertmanager down for good: a resolution is tried for RESOLVED_RETENTION, then
        given up on."""
        notifier = self.notifier()
        notifier.fired("r", LABELS, NOTES, T0, now=0.0)
        notifier.resolved("r", T0 + 1.0, now=1.0)
        assert notifier.take(1.0 + RESOLVED_RETENTION, T0) is not None
        assert None is notifier.take(1.1 + RESOLVED_RETENTION, T0)


def alerts_config(
    *rules: dict[str, Any],
    interval: str = "10m",
    resend: str | None = None,
    url: str | None = "http://127.0.0.1:9",
) -> Config:
    return config_from_mapping(
        {
            "service": {"name": "permits", "id": "permits-1", "address": "10.0.0.1"},
            "consul": {"enabled": False},
            "admin": {"listen": "0.0.0.0:9902"},
            "upstreams": {"billing": {"endpoints": ["10.0.0.2:80"]}},
            "events": {"spool": {"path": "/nonexistent/spool.db"}},
            "alerts": {
                "alertmanager_url": url,
                "evaluation_interval": interval,
                "resend_interval": resend or interval,
                "rules": list(rules),
            },
        },
        {},
    )


CIRCUIT = {"name": "billing-circuit", "kind": "circuit_open", "upstream": "billing"}


class Harness:
    """An `Alerts` service with fake sources, relay, Alertmanager and clock.

    The default evaluation_interval (10 minutes) keeps the started service's own
    evaluation from ever running during a test: `tick` drives it.
    """

    def __init__(
        self,
        *rules: dict[str, Any],
        interval: str = "10m",
        resend: str | None = None,
        refuse: bool = False,
        post_fails: bool = False,
    ) -> None:
        self.world = World()
        self.now = 0.0
        self.events: list[tuple[str, dict[str, str], Any]] = []
        self.posts: list[list[dict[str, Any]]] = []
        self.refuse = refuse
        self.post_fails = post_fails
        self.alerts = Alerts(
            alerts_config(*(rules or (CIRCUIT,)), interval=interval, resend=resend),
            self.world.sources(),
            publish=self.publish,
            post=self.post,
            clock=lambda: self.now,
        )

    def tick(self, t: float) -> None:
        self.now = t
        self.alerts.tick(t, T0 + t)

    async def publish(self, topic: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        if self.refuse:
            raise ProxyError(ErrorCode.SPOOL_FULL, "event not accepted: spool full")
        fields = {k.decode(): v.decode() for k, v in headers}
        self.events.append((topic, fields, json.loads(body)))
        return b"{}"

    async def post(self, alerts: list[dict[str, Any]]) -> None:
        if self.post_fails:
            raise AlertmanagerError("cannot POST to http://127.0.0.1:9/api/v2/alerts: refused")
        self.posts.append(alerts)

    async def settle(self) -> None:
        """Let the POST under way and the queued events (when started) finish."""
        sending = self.alerts._sending
        if sending is not None:
            await sending
        if self.alerts._tasks:
            await self.alerts._events.join()


class TestAlertsService:
    async def test_firing_and_resolution_each_log_publish_and_post(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A circuit that opens and closes again: alert_firing then alert_resolved log
        lines, two events on alerts.<name>, and two POSTs to Alertmanager, the second
        ending when it resolved."""
        configure_logging("json", "info")
        h = Harness()
        h.alerts.start()
        h.world.circuit = 2
        h.tick(1.0)
        await h.settle()
        h.world.circuit = 0
        h.tick(2.0)
        await h.settle()
        await h.alerts.stop()
        lines = [line for line in log_lines(capsys) if line["logger"] == "sidecar.alerts"]
        assert [
            ("alert_firing", "warning", "billing-circuit", "circuit_open", 2.0, "billing"),
            ("alert_resolved", "info", "billing-circuit", "circuit_open", 0.0, "billing"),
        ] == [
            (x["event"], x["level"], x["name"], x["kind"], x["value"], x["upstream"]) for x in lines
        ]
        assert ["firing", "resolved"] == [body["state"] for _, _, body in h.events]
        assert [[iso_time(T0 + 1.0 + 2400.0)], [iso_time(T0 + 2.0)]] == [
            [alert["endsAt"] for alert in post] for post in h.posts
        ]

    async def test_alertmanager_labels_and_annotations(self) -> None:
        """Labels name the alert, service, instance, severity, kind and upstream; the
        annotations carry the summary, description and the value."""
        h = Harness()
        h.world.circuit = 2
        h.tick(1.0)
        await h.settle()
        [[alert]] = h.posts
        assert {
            "alertname": "billing-circuit",
            "service": "permits",
            "instance": "permits-1",
            "severity": "warning",
            "kind": "circuit_open",
            "upstream": "billing",
        } == alert["labels"]
        assert ("Circuit open for upstream billing", "2") == (
            alert["annotations"]["summary"],
            alert["annotations"]["value"],
        )
        assert (iso_time(T0 + 1.0), "http://10.0.0.1:9902/v1/status") == (
            alert["startsAt"],
            alert["generatorURL"],
        )

    async def test_firing_alert_is_resent_every_resend_interval(self) -> None:
        """While the alert fires, evaluations send it again once resend_interval passed
        since the last accepted POST, and not in between."""
        h = Harness(interval="1s", resend="1m")
        h.world.circuit = 2
        sent: list[int] = []
        for t in range(150):
            h.tick(float(t))
            await h.settle()
            sent += [t] * (len(h.posts) - len(sent))
        assert [0, 60, 120] == sent

    async def test_event_is_a_cloudevent_on_alerts_topic(self) -> None:
        """The event goes to topic alerts.<name> as JSON with CloudEvent type
        io.hms-sidecar.alert; firing has no endsAt, the resolution has one."""
        h = Harness()
        h.alerts.start()
        h.world.circuit = 2
        h.tick(1.0)
        h.world.circuit = 0
        h.tick(4.0)
        await h.settle()
        await h.alerts.stop()
        (topic, headers, firing), (_, resolved_headers, resolved) = h.events
        assert "alerts.billing-circuit" == topic
        assert (EVENT_TYPE, "application/json") == (headers["ce-type"], headers["content-type"])
        assert headers["ce-id"] != resolved_headers["ce-id"]
        assert {
            "name": "billing-circuit",
            "kind": "circuit_open",
            "state": "firing",
            "value": 2.0,
            "threshold": None,
            "startsAt": iso_time(T0 + 1.0),
            "endsAt": None,
        } == {k: v for k, v in firing.items() if k not in ("labels", "annotations")}
        assert ("resolved", iso_time(T0 + 1.0), iso_time(T0 + 4.0)) == (
            resolved["state"],
            resolved["startsAt"],
            resolved["endsAt"],
        )
        assert ("permits", "billing") == (firing["labels"]["service"], firing["labels"]["upstream"])

    async def test_refused_event_is_logged_and_evaluation_goes_on(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An event the relay refuses (a full spool) is a warning; the alert still fires."""
        configure_logging("json", "info")
        h = Harness(refuse=True)
        h.alerts.start()
        h.world.circuit = 2
        h.tick(1.0)
        await h.settle()
        await h.alerts.stop()
        refused = [x for x in log_lines(capsys) if x["event"] == "alert_event_refused"]
        assert [("alerts.billing-circuit", "event not accepted: spool full")] == [
            (x["topic"], x["error"]) for x in refused
        ]
        assert ["billing-circuit"] == [rs.rule.name for rs in h.alerts.evaluator.firing()]

    async def test_unreachable_alertmanager_is_logged_once_a_minute_and_tried_again(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """POSTs that fail: one warning for the failures within a minute, the error in the
        status, retries after the back-off, and the alert sent once Alertmanager answers."""
        configure_logging("json", "info")
        h = Harness(interval="1s", resend="1m", post_fails=True)
        h.world.circuit = 2
        for t in range(30):
            h.tick(float(t))
            await h.settle()
        tried = h.alerts.notifier.failures if h.alerts.notifier else 0
        status = h.alerts.status()["alertmanager"]
        h.post_fails = False
        recovered = None
        for t in range(30, 100):
            h.tick(float(t))
            await h.settle()
            if h.posts:
                recovered = t
                break
        events = [x["event"] for x in log_lines(capsys) if x["logger"] == "sidecar.alerts"]
        assert ["alert_firing", "alertmanager_send_failed", "alertmanager_send_recovered"] == (
            events
        )
        assert 5 <= tried <= 6  # back-offs of 1, 2, 4, 8, 16 s (each up to half shorter)
        assert status["last_error"].endswith("refused")
        assert recovered is not None
        assert recovered <= 64  # the next retry after the last failure, at most 32 s later

    async def test_gauge_has_one_series_per_rule(self) -> None:
        """sidecar_alerts_firing{alert}: 1 for the firing rule, 0 for the other."""
        h = Harness(CIRCUIT, {"name": "spool", "kind": "spool_depth", "threshold": 5})
        h.world.circuit = 2
        h.tick(1.0)
        await h.settle()
        [family] = h.alerts.collect()
        assert {"billing-circuit": 1.0, "spool": 0.0} == {
            s.labels["alert"]: s.value for s in family.samples
        }

    async def test_status_lists_firing_and_pending(self) -> None:
        """/v1/status's alerts: firing ones since they fired, pending ones since their
        condition began, each with value and threshold."""
        h = Harness(CIRCUIT, {"name": "spool", "kind": "spool_depth", "threshold": 5, "for": "1h"})
        h.world.circuit = 2
        h.world.depth = 9
        h.tick(1.0)
        await h.settle()
        status = h.alerts.status()
        assert [
            {
                "name": "billing-circuit",
                "kind": "circuit_open",
                "upstream": "billing",
                "severity": "warning",
                "since": iso_time(T0 + 1.0),
                "value": 2.0,
                "threshold": None,
            }
        ] == status["firing"]
        assert [("spool", iso_time(T0 + 1.0), 9.0, 5.0)] == [
            (p["name"], p["since"], p["value"], p["threshold"]) for p in status["pending"]
        ]

    async def test_stop_hands_queued_events_to_the_relay(self) -> None:
        """An event queued just before stop() still reaches the relay: stop waits for it."""
        h = Harness()
        h.alerts.start()
        h.world.circuit = 2
        h.tick(1.0)  # queued, not yet handed over
        await h.alerts.stop()
        assert ["alerts.billing-circuit"] == [topic for topic, _, _ in h.events]

    async def test_stop_does_not_resolve_firing_alerts(self) -> None:
        """The sidecar going away is not the condition ending: no resolution is sent."""
        h = Harness()
        h.alerts.start()
        h.world.circuit = 2
        h.tick(1.0)
        await h.settle()
        await h.alerts.stop()
        assert (["firing"], 1) == ([body["state"] for _, _, body in h.events], len(h.posts))

    async def test_started_service_evaluates_every_interval(self) -> None:
        """Started, the service evaluates on its own clock: the alert fires without a tick."""
        world = World(circuit=2)
        alerts = Alerts(alerts_config(CIRCUIT, interval="10ms"), world.sources())
        alerts.start()
        try:
            async with asyncio.timeout(5):
                while not alerts.evaluator.firing():
                    await asyncio.sleep(0.01)
        finally:
            await alerts.stop(within=0.5)
        assert ["billing-circuit"] == [rs.rule.name for rs in alerts.evaluator.firing()]
