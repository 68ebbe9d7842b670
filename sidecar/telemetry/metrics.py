"""Prometheus metric families of SPEC §9, on a registry owned by the running sidecar.

Gauges that mirror live state (circuit state, endpoint counts, in-flight) are
read at scrape time from the objects that own that state. The request counter and
the latency histogram, counted on every request, are plain integers in an
`UpstreamTraffic` per upstream (no lock, no Python loop over buckets) that become
the same Prometheus series at scrape time. Every family
is listed in docs/metrics.md; a unit test keeps that list and this registry equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final, cast

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar import __version__

#: Request latency buckets in seconds, 100 µs to 30 s: a localhost hop through the sidecar
#: takes a few hundred microseconds; 30 s is above the default whole-request `timeout`.
#: (`tuple[float, ...]`: mypyc keeps a fixed-length float tuple unboxed, and a comprehension
#: over it at import found it unset.)
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


_REQUESTS_HELP: Final = "Requests the app sent to an upstream, by the HTTP status the app received."
_DURATION_HELP: Final = "Time from the app's request to the end of the response, retries included."
_go_float = cast(Callable[[float], str], floatToGoString)  # how prometheus_client writes `le`
_BUCKET_LABELS: Final = [_go_float(b) for b in LATENCY_BUCKETS]


class UpstreamTraffic:
    """One upstream's request counts by status and latency histogram as plain numbers.

    The proxy counts every request here; `UpstreamRequests` and `UpstreamDurations`
    turn them into the Prometheus families at scrape time. The event loop is the only
    writer, so no lock is needed.
    """

    __slots__ = ("buckets", "codes", "name", "sum")

    def __init__(self, name: str) -> None:
        self.name = name
        self.codes: dict[int, int] = {}  # requests by the status the app received
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above 30 s
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """One latency sample (the bucket of an `le` bound, as Prometheus counts them):
        `bisect_left(LATENCY_BUCKETS, seconds)` as a loop, which the compiled build runs
        on the unboxed float (most samples end in the first few buckets)."""
        i = 0
        for bound in LATENCY_BUCKETS:
            if not bound < seconds:
                break
            i += 1
        self.buckets[i] += 1
        self.sum += seconds

    def __repr__(self) -> str:
        return f"<UpstreamTraffic {self.name} samples={sum(self.buckets)}>"


class UpstreamRequests(Collector):
    """`sidecar_upstream_requests_total{upstream,code}`: every `UpstreamTraffic`'s plain
    counts at scrape time, plus what was counted through `counter.labels(...)` (code
    off the hot path: tests, tools) in the same series."""

    def __init__(self, counter: Counter, all_: Callable[[], Iterable[UpstreamTraffic]]) -> None:
        self._counter = counter
        self._all = all_

    def collect(self) -> Iterator[Metric]:
        counts: dict[tuple[str, str], float] = {}
        for family in self._counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["upstream"], sample.labels["code"])
                    counts[key] = counts.get(key, 0.0) + sample.value
        for traffic in self._all():
            for code, count in list(traffic.codes.items()):
                key = (traffic.name, str(code))
                counts[key] = counts.get(key, 0.0) + count
        family = CounterMetricFamily(
            "sidecar_upstream_requests", _REQUESTS_HELP, labels=["upstream", "code"]
        )
        for labels, value in counts.items():
            family.add_metric(labels, value)
        yield family


class UpstreamDurations(Collector):
    """`sidecar_upstream_request_duration_seconds{upstream}` from every `UpstreamTraffic`."""

    def __init__(
        self,
        traffic: Callable[[str], UpstreamTraffic],
        all_: Callable[[], Iterable[UpstreamTraffic]],
    ) -> None:
        self._traffic = traffic
        self._all = all_

    def labels(self, upstream: str) -> UpstreamTraffic:
        return self._traffic(upstream)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "sidecar_upstream_request_duration_seconds", _DURATION_HELP, labels=["upstream"]
        )
        for traffic in self._all():
            counts = list(traffic.buckets)
            buckets = []
            total = 0
            for label, count in zip(_BUCKET_LABELS, counts, strict=False):
                total += count
                buckets.append((label, float(total)))
            buckets.append(("+Inf", float(total + counts[-1])))
            family.add_metric([traffic.name], buckets, traffic.sum)
        yield family


class _LiveGauges(Collector):
    """Builds gauge families from a callback at every scrape."""

    def __init__(self, build: Callable[[], Iterable[Metric]]) -> None:
        self._build = build

    def collect(self) -> Iterator[Metric]:
        yield from self._build()


class Metrics:
    """The sidecar's metric families; one instance per running sidecar."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double the output for no use here
        self.registry = CollectorRegistry(auto_describe=True)
        # Per upstream name, kept for the sidecar's life: a series never goes backwards,
        # even when an on-demand upstream is retired and made again.
        self._traffic: dict[str, UpstreamTraffic] = {}
        # The proxy counts in `UpstreamTraffic.codes`; this Counter (not registered itself)
        # keeps prometheus_client's `labels()` API, and `requests` exports both.
        self.upstream_requests = Counter(
            "sidecar_upstream_requests", _REQUESTS_HELP, ["upstream", "code"], registry=None
        )
        self.requests = UpstreamRequests(self.upstream_requests, self._traffic.values)
        self.registry.register(self.requests)
        self.upstream_duration = UpstreamDurations(self.traffic, self._traffic.values)
        self.registry.register(self.upstream_duration)
        self.retries = Counter(
            "sidecar_retries",
            "Retried attempts towards an upstream.",
            ["upstream"],
            registry=self.registry,
        )
        self.proxy_errors = Counter(
            "sidecar_proxy_errors",
            "Responses the sidecar made itself instead of an upstream, by error code.",
            ["upstream", "error"],
            registry=self.registry,
        )
        self.ejections = Counter(
            "sidecar_upstream_ejections",
            "Endpoints ejected from balancing after consecutive failures.",
            ["upstream"],
            registry=self.registry,
        )
        self.consul_errors = Counter(
            "sidecar_consul_errors",
            "Failed Consul calls by operation: register, check_update, deregister, watch, lookup.",
            ["operation"],
            registry=self.registry,
        )
        self.events_published = Counter(
            "sidecar_events_published",
            "Events the app published, by outcome: confirmed (broker ack), spooled (kept in the "
            "local spool for the relay), rejected (refused: bad topic, too large, spool full or "
            "unwritable).",
            ["topic", "outcome"],
            registry=self.registry,
        )
        self.events_relayed = Counter(
            "sidecar_events_relayed",
            "Spooled events the relay published and deleted after the broker's confirm.",
            [],
            registry=self.registry,
        )
        self.events_unroutable = Counter(
            "sidecar_events_unroutable",
            "Publishes the broker returned because no queue was bound; the event stays spooled.",
            ["topic"],
            registry=self.registry,
        )
        self.events_delivered = Counter(
            "sidecar_events_delivered",
            "Subscription deliveries to the app, by outcome: ack, retry, dead.",
            ["subscription", "outcome"],
            registry=self.registry,
        )
        build_info = GaugeMetricFamily(
            "sidecar_build_info", "The running sidecar's version.", labels=["version"]
        )
        build_info.add_metric([__version__], 1.0)
        self.registry.register(_LiveGauges(lambda: [build_info]))

    def traffic(self, upstream: str) -> UpstreamTraffic:
        """The plain counters of `upstream` (made on first use)."""
        traffic = self._traffic.get(upstream)
        if traffic is None:
            traffic = self._traffic[upstream] = UpstreamTraffic(upstream)
        return traffic

    def add_live(self, build: Callable[[], Iterable[Metric]]) -> None:
        """Register gauges computed at scrape time from live state."""
        self.registry.register(_LiveGauges(build))
