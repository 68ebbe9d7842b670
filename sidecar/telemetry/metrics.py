"""Prometheus metric families of SPEC §9, on a registry owned by the running sidecar.

Gauges that mirror live state (circuit state, endpoint counts, in-flight) are
read at scrape time from the objects that own that state, so the hot path only
ever increments counters and observes the latency histogram. Every family is
listed in docs/metrics.md; a unit test keeps that list and this registry equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar import __version__

#: Request latency buckets in seconds, 100 µs to 30 s: a localhost hop through the sidecar
#: takes a few hundred microseconds; 30 s is above the default whole-request `timeout`.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


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
        self.upstream_requests = Counter(
            "sidecar_upstream_requests",
            "Requests the app sent to an upstream, by the HTTP status the app received.",
            ["upstream", "code"],
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "sidecar_upstream_request_duration_seconds",
            "Time from the app's request to the end of the response, retries included.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
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

    def add_live(self, build: Callable[[], Iterable[Metric]]) -> None:
        """Register gauges computed at scrape time from live state."""
        self.registry.register(_LiveGauges(build))
