"""The metric families (SPEC §9): latency buckets, and docs/metrics.md kept equal to the
registry a sidecar builds, its scrape-time gauges included."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import Metric
from prometheus_client.metrics import MetricWrapperBase

from sidecar.app import Sidecar
from sidecar.config import config_from_mapping
from sidecar.telemetry.metrics import LATENCY_BUCKETS, Metrics
from tests.metrics_doc import Family, documented_families, registry_families

#: The families SPEC §9 requires.
SPEC_FAMILIES = {
    "sidecar_upstream_requests_total": ("counter", {"upstream", "code"}),
    "sidecar_upstream_request_duration_seconds": ("histogram", {"upstream"}),
    "sidecar_upstream_endpoints": ("gauge", {"upstream", "state"}),
    "sidecar_circuit_state": ("gauge", {"upstream"}),
    "sidecar_retries_total": ("counter", {"upstream"}),
    "sidecar_events_published_total": ("counter", {"topic", "outcome"}),
    "sidecar_events_spool_depth": ("gauge", set()),
    "sidecar_events_delivered_total": ("counter", {"subscription", "outcome"}),
    "sidecar_consul_registered": ("gauge", set()),
    "sidecar_build_info": ("gauge", {"version"}),
    "sidecar_alerts_firing": ("gauge", {"alert"}),
}


def full_sidecar(tmp_path: Path) -> Sidecar:
    """A sidecar (built, not started) with every optional part that adds metrics: an
    upstream, the event relay and a subscription, tracing and an alert rule."""
    config = config_from_mapping(
        {
            "service": {"name": "unit", "port": 8080},
            "consul": {"enabled": False},
            "upstreams": {"billing": {"endpoints": ["127.0.0.1:9"]}},
            "events": {
                "spool": {"path": str(tmp_path / "spool.db")},
                "subscriptions": [{"name": "orders", "topic": "orders.*", "path": "/events"}],
            },
            "telemetry": {"tracing": {"otlp_endpoint": "http://127.0.0.1:9"}},
            "alerts": {"rules": [{"name": "open", "kind": "circuit_open", "upstream": "billing"}]},
        },
        {},
    )
    return Sidecar(config)


def collected(sidecar: Sidecar, documented: dict[str, Family]) -> dict[str, Family]:
    """The sidecar's registry as families, after giving every labelled counter and
    histogram one series under the documented label names, so each shows its labels;
    AssertionError if those are not the family's label names."""
    for wrapper in vars(sidecar.metrics).values():
        if isinstance(wrapper, MetricWrapperBase):
            [described] = wrapper.describe()
            name = f"{described.name}_total" if described.type == "counter" else described.name
            labels = documented[name].labels if name in documented else None
            if labels:
                try:
                    wrapper.labels(**dict.fromkeys(labels, "x"))
                except ValueError:
                    raise AssertionError(
                        f"docs/metrics.md gives {name} the labels {sorted(labels)}; "
                        f"it has {sorted(wrapper._labelnames)}"
                    ) from None
    return registry_families(sidecar.metrics.registry.collect())


def matches(documented: Family, exported: Family) -> bool:
    """Same type and, where the registry shows series, the same label names."""
    if exported.labels is None:  # no series to show them (another module's family)
        return documented.type == exported.type
    return documented == exported


class TestLatencyBuckets:
    def test_buckets_run_from_100_microseconds_to_30_seconds(self) -> None:
        """The latency histogram's buckets start at 100 µs, end at 30 s and only grow."""
        assert (0.0001, 0.00025, 30.0) == (
            LATENCY_BUCKETS[0],
            LATENCY_BUCKETS[1],
            LATENCY_BUCKETS[-1],
        )
        assert sorted(set(LATENCY_BUCKETS)) == list(LATENCY_BUCKETS)

    def test_the_histogram_uses_them(self) -> None:
        """Each series of sidecar_upstream_request_duration_seconds has those buckets and +Inf."""
        metrics = Metrics()
        metrics.upstream_duration.labels("billing").observe(0.0002)
        [family] = [
            m
            for m in metrics.registry.collect()
            if m.name == "sidecar_upstream_request_duration_seconds"
        ]
        bounds = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
        assert [*(str(b) for b in LATENCY_BUCKETS), "+Inf"] == bounds

    def test_the_hot_path_counts_as_prometheus_client_would(self) -> None:
        """Samples counted by the proxy's plain integers (`UpstreamTraffic.observe`) give
        the series prometheus_client's own Histogram gives for the same samples: on
        every bound (`le` is inclusive), between bounds, below the first and above the
        last."""
        samples = [0.0, 0.00005, 30.0, 31.0, 1e9]
        for bound in LATENCY_BUCKETS:
            samples += [bound, bound * 0.999, bound * 1.001]
        metrics = Metrics()
        for value in samples:
            metrics.traffic("billing").observe(value)
        reference = Histogram(
            "sidecar_upstream_request_duration_seconds",
            "reference",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=CollectorRegistry(),
        )
        for value in samples:
            reference.labels("billing").observe(value)

        def series(families: Iterable[Metric]) -> dict[tuple[str, str], float]:
            return {
                (s.name, s.labels.get("le", "")): s.value
                for f in families
                if f.name == "sidecar_upstream_request_duration_seconds"
                for s in f.samples
                if not s.name.endswith("_created")
            }

        expected = series(reference.collect())
        assert len(expected) == len(LATENCY_BUCKETS) + 3  # the buckets, +Inf, _count, _sum
        assert expected == series(metrics.registry.collect())


class TestDocumentation:
    def test_every_family_is_documented_and_every_documented_family_exists(
        self, tmp_path: Path
    ) -> None:
        """docs/metrics.md lists exactly the families a sidecar with an upstream, events
        and a subscription exports: none missing from the document, none left over."""
        documented = documented_families()
        exported = collected(full_sidecar(tmp_path), documented)
        assert [] == sorted(set(exported) - set(documented)), "exported but not documented"
        assert [] == sorted(set(documented) - set(exported)), "documented but not exported"

    def test_documented_types_and_labels_are_the_exported_ones(self, tmp_path: Path) -> None:
        """Each family's type and label names in docs/metrics.md are those it is exported
        with."""
        documented = documented_families()
        exported = collected(full_sidecar(tmp_path), documented)
        differing = {
            name: (documented[name], family)
            for name, family in exported.items()
            if name in documented and not matches(documented[name], family)
        }
        assert {} == differing

    @pytest.mark.parametrize("name", sorted(SPEC_FAMILIES))
    def test_every_spec_family_is_exported_as_specified(self, tmp_path: Path, name: str) -> None:
        """Each family SPEC §9 names is exported with the type and labels it gives."""
        exported = collected(full_sidecar(tmp_path), documented_families())
        kind, labels = SPEC_FAMILIES[name]
        assert Family(name, kind, frozenset(labels)) == exported.get(name)
