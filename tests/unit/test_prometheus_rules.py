"""The shipped Prometheus alerting rules (deploy/prometheus): valid for promtool, passing
their own unit tests, and written over series the sidecar really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from sidecar.app import Sidecar
from sidecar.config import config_from_mapping

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "sidecar-alerts.rules.yml"
TESTS = RULES_DIR / "sidecar-alerts.test.yml"
KINDS = {
    "error_rate",
    "latency_p99",
    "circuit_open",
    "spool_depth",
    "consul_unreachable",
    "broker_unreachable",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin")
    if path is None:
        pytest.fail(
            "promtool not found: it checks the shipped alerting rules. Install it with "
            "`apt-get install -y prometheus` (Debian ships promtool in that package)"
        )
    return subprocess.run(
        [path, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60, check=False
    )


def rules() -> list[dict[str, object]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


class TestPromtool:
    def test_rules_pass_promtool_check(self) -> None:
        """`promtool check rules` accepts the file: valid PromQL, templates and fields."""
        result = promtool("check", "rules", RULES.name)
        assert 0 == result.returncode, result.stdout + result.stderr

    def test_rules_pass_their_unit_tests(self) -> None:
        """`promtool test rules` runs sidecar-alerts.test.yml: each alert fires on the
        series it is written for, with the expected labels and annotations, and stays
        quiet below its thresholds."""
        result = promtool("test", "rules", TESTS.name)
        assert 0 == result.returncode, result.stdout + result.stderr


class TestRulesMatchTheSidecar:
    def test_one_rule_per_alert_kind(self) -> None:
        """Each kind of the sidecar's own rules has a Prometheus counterpart, labelled with
        the same `kind`."""
        assert KINDS == {str(rule["labels"]["kind"]) for rule in rules()}  # type: ignore[index]

    def test_every_series_in_the_rules_is_exported(self) -> None:
        """Every sidecar_* series the expressions read is one /metrics really has (a
        sidecar with Consul, events and an upstream), so no rule watches a typo."""
        config = config_from_mapping(
            {
                "service": {"name": "permits", "port": 8080, "address": "10.0.0.1"},
                "upstreams": {"billing": {"endpoints": ["10.0.0.2:80"]}},
                "events": {"spool": {"path": "/nonexistent/spool.db"}},
            },
            {},
        )
        text = generate_latest(Sidecar(config).metrics.registry).decode()
        families = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
        read = set(re.findall(r"\bsidecar_[a-z_]+", " ".join(str(r["expr"]) for r in rules())))
        exported = {
            f"{family}{suffix}"
            for family in families
            for suffix in ("", "_total", "_bucket", "_count", "_sum")
        }
        assert set() == read - exported
