"""docs/metrics.md's table of metric families, and the same facts read from a registry or
a scrape, so tests can hold the document and the sidecar to each other."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

METRICS_DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"

_ROW = re.compile(r"^\| `(sidecar_\w+)` \| (\w+) \| ([^|]*) \|")
_NAME = re.compile(r"`(\w+)`")


@dataclass(frozen=True)
class Family:
    """One metric family as exposed: its name (`_total` included for a counter), type and
    label names; `labels` is None where a registry has no series to show them."""

    name: str
    type: str
    labels: frozenset[str] | None


def documented_families(path: Path = METRICS_DOC) -> dict[str, Family]:
    """The rows of the document's families table, by metric name."""
    families: dict[str, Family] = {}
    for line in path.read_text().splitlines():
        row = _ROW.match(line)
        if row is None:
            continue
        name, kind, labels = row.groups()
        if name in families:
            raise AssertionError(f"{path.name}: {name} has two rows")
        families[name] = Family(name, kind, frozenset(_NAME.findall(labels)))
    return families


def _exposed(metrics: Iterable[Metric]) -> dict[str, Family]:
    families: dict[str, Family] = {}
    for metric in metrics:
        # prometheus_client names a counter family without the `_total` its series carry.
        name = f"{metric.name}_total" if metric.type == "counter" else metric.name
        labels = {key for sample in metric.samples for key in sample.labels if key != "le"}
        families[name] = Family(name, metric.type, frozenset(labels) if metric.samples else None)
    return families


def registry_families(metrics: Iterable[Metric]) -> dict[str, Family]:
    """The families a registry collects (`registry.collect()`), by exposed name."""
    return _exposed(metrics)


def scraped_families(exposition: str) -> dict[str, Family]:
    """The families in a Prometheus text-format scrape, by exposed name."""
    return _exposed(text_string_to_metric_families(exposition))
