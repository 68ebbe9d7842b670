"""The `alerts` section (SPEC §3): rules validated per kind, all problems at once, and
`sidecar check-config` refusing a rule that names no configured upstream (exit 64)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.config import ENV_VARS, AlertRuleConfig, AlertsConfig, Config, config_from_mapping
from sidecar.errors import ConfigError

BASE: dict[str, Any] = {
    "service": {"name": "permits", "address": "10.1.2.3"},
    "consul": {"enabled": False},
    "upstreams": {"billing": {"endpoints": ["10.0.0.1:8080"]}},
}

EVENTS = {"exchange": "events"}  # any events key turns the relay on


def build(alerts: Any, environ: dict[str, str] | None = None, **extra: Any) -> Config:
    return config_from_mapping({**BASE, "alerts": alerts, **extra}, environ or {})


def problems(alerts: Any, environ: dict[str, str] | None = None, **extra: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(alerts, environ, **extra)
    return info.value.problems


def rules(*items: Any) -> dict[str, Any]:
    return {"rules": list(items)}


class TestAlertsSection:
    def test_absent_means_no_rules(self) -> None:
        """Without the section: no rules, no Alertmanager, 1s evaluation, 1m resend."""
        assert AlertsConfig(None, 1.0, 60.0, ()) == config_from_mapping(BASE, {}).alerts

    def test_the_spec_example(self) -> None:
        """SPEC §3's rule reads as written, the rest defaulted."""
        config = build(
            {
                "alertmanager_url": "http://alertmanager:9093/",
                "rules": [
                    {
                        "name": "billing-errors",
                        "kind": "error_rate",
                        "upstream": "billing",
                        "threshold": 0.05,
                        "window": "1m",
                        "for": "30s",
                    }
                ],
            }
        )
        assert (
            AlertsConfig(
                alertmanager_url="http://alertmanager:9093",
                rules=(
                    AlertRuleConfig(
                        name="billing-errors",
                        kind="error_rate",
                        upstream="billing",
                        threshold=0.05,
                        window=60.0,
                        for_=30.0,
                        severity="warning",
                        min_requests=10,
                    ),
                ),
            )
            == config.alerts
        )

    def test_every_kind_with_its_fields(self) -> None:
        """Each kind accepts its own fields: thresholds as a ratio, a duration or a count;
        texts and severity for all."""
        config = build(
            {
                "evaluation_interval": "5s",
                "resend_interval": "2m",
                "rules": [
                    {"name": "slow", "kind": "latency_p99", "upstream": "Billing",
                     "threshold": "750ms", "window": "5m", "min_requests": 50},
                    {"name": "open", "kind": "circuit_open", "upstream": "billing",
                     "severity": "critical", "summary": "s", "description": "d"},
                    {"name": "spool", "kind": "spool_depth", "threshold": 1000, "for": "1m"},
                    {"name": "broker", "kind": "broker_unreachable", "for": "30s"},
                ],
            },
            events=EVENTS,
        )  # fmt: skip
        assert (5.0, 120.0) == (config.alerts.evaluation_interval, config.alerts.resend_interval)
        assert [
            ("slow", "billing", 0.75, 300.0, 0.0, 50, "warning"),
            ("open", "billing", None, 60.0, 0.0, 10, "critical"),
            ("spool", None, 1000.0, 60.0, 60.0, 10, "warning"),
            ("broker", None, None, 60.0, 30.0, 10, "warning"),
        ] == [
            (r.name, r.upstream, r.threshold, r.window, r.for_, r.min_requests, r.severity)
            for r in config.alerts.rules
        ]
        assert ("s", "d") == (config.alerts.rules[1].summary, config.alerts.rules[1].description)

    def test_consul_rule_with_consul_on(self) -> None:
        """consul_unreachable is accepted when Consul is enabled."""
        config = config_from_mapping(
            {
                "service": {"name": "permits", "port": 8080},
                "alerts": rules({"name": "consul", "kind": "consul_unreachable"}),
            },
            {},
        )
        assert ["consul_unreachable"] == [r.kind for r in config.alerts.rules]

    def test_alertmanager_url_from_the_environment_wins(self) -> None:
        """SIDECAR_ALERTMANAGER_URL replaces the file's alertmanager_url, and is listed in
        ENV_VARS."""
        config = build(
            {"alertmanager_url": "http://a:9093"},
            {"SIDECAR_ALERTMANAGER_URL": "https://b:9093"},
        )
        assert "https://b:9093" == config.alerts.alertmanager_url
        assert "alerts.alertmanager_url" in {v.path for v in ENV_VARS}

    @pytest.mark.parametrize(
        ("url", "reason"),
        [
            ("alertmanager:9093", "invalid URL 'alertmanager:9093' (expected http://host:port "
             "or https://host:port)"),
            ("ftp://a:21", "invalid URL 'ftp://a:21' (expected http://host:port or "
             "https://host:port)"),
            ("http://a:9093/api/v2/alerts", "expected the base URL: /api/v2/alerts is appended"),
            ("http://u:p@a:9093", "credentials in the URL are not supported"),
            ("http://a:9093/?x=1", "expected a base URL without a query or fragment"),
        ],
    )  # fmt: skip
    def test_bad_alertmanager_urls(self, url: str, reason: str) -> None:
        """Only an http(s) base URL with a host is taken."""
        assert [f"alerts.alertmanager_url: {reason}"] == problems({"alertmanager_url": url})

    def test_every_problem_is_reported_at_once(self) -> None:
        """Names, kinds, upstreams, thresholds, windows and fields that a kind does not
        have: each problem with its path, all in one report."""
        found = problems(
            {
                "evaluation_interval": "2s",
                "resend_interval": "1s",
                "rules": [
                    {"name": "a b", "kind": "error_rate", "upstream": "nope", "threshold": 0},
                    {"name": "x", "kind": "latency_p99", "threshold": "soon", "window": "1s"},
                    {"name": "x", "kind": "circuit_open", "upstream": "billing",
                     "threshold": 3, "window": "1m", "min_requests": 3},
                    {"name": "y", "kind": "spool_depth", "threshold": 0},
                    {"name": "z", "kind": "consul_unreachable", "upstream": "billing",
                     "for": "-1s"},
                    {"name": "w", "kind": "teapot", "threshold": 1, "surprise": 2},
                    {"kind": "broker_unreachable", "severity": "a b"},
                    {"name": "e", "kind": "error_rate", "upstream": "billing",
                     "threshold": 1.5, "window": "10h"},
                    "nope",
                ],
            }
        )  # fmt: skip
        assert [
            "alerts.resend_interval: must not be less than evaluation_interval (1s < 2s)",
            "alerts.rules[0].name: invalid name 'a b' (letters, digits, '_', '.' or '-', at most "
            "100: it names the event topic alerts.<name>)",
            "alerts.rules[0].upstream: no upstream named 'nope' is configured",
            "alerts.rules[0].threshold: must be greater than 0 (a ratio of answers, at most 1)",
            "alerts.rules[1].upstream: required",
            "alerts.rules[1].threshold: invalid duration 'soon'",
            "alerts.rules[1].window: must be at least evaluation_interval (1s < 2s)",
            "alerts.rules[2].threshold: a circuit_open rule has no threshold (it is a yes/no "
            "condition)",
            "alerts.rules[2].window: a circuit_open rule looks at the current state, not a window",
            "alerts.rules[2].min_requests: only error_rate and latency_p99 rules count requests",
            "alerts.rules[2].name: duplicates rule 'x'",
            "alerts.rules[3].threshold: must be at least 1, got 0",
            "alerts.rules[3].kind: spool_depth watches the event relay: needs an events section",
            "alerts.rules[4].upstream: a consul_unreachable rule names no upstream",
            "alerts.rules[4].kind: consul_unreachable needs consul.enabled",
            "alerts.rules[4].for: invalid duration '-1s'",
            "alerts.rules[5].kind: expected error_rate, latency_p99, circuit_open, spool_depth, "
            "consul_unreachable or broker_unreachable, got 'teapot'",
            "alerts.rules[5].surprise: unknown key",
            "alerts.rules[6].name: required",
            "alerts.rules[6].kind: broker_unreachable watches the event relay: needs an events "
            "section",
            "alerts.rules[6].severity: invalid severity 'a b' (letters, digits, '_', '.' or '-')",
            "alerts.rules[7].threshold: must be between 0 and 1, got 1.5",
            "alerts.rules[7].window: at most 10000 evaluation intervals (36000s / 2s); raise "
            "evaluation_interval",
            "alerts.rules[8]: expected a mapping, got string",
        ] == found

    def test_rules_must_be_a_list_and_keys_known(self) -> None:
        """`rules` as a mapping, and an unknown key in the section, are reported."""
        assert [
            "alerts.rules: expected a list, got mapping",
            "alerts.webhook: unknown key",
        ] == problems({"rules": {"name": "x"}, "webhook": "http://x"})

    def test_name_is_at_most_100_characters(self) -> None:
        """A name of 100 characters gives topic alerts.<name> well under 255; 101 is refused."""
        ok = {"name": "n" * 100, "kind": "broker_unreachable"}
        assert ["n" * 100] == [r.name for r in build(rules(ok), events=EVENTS).alerts.rules]
        long = {"name": "n" * 101, "kind": "broker_unreachable"}
        assert ["alerts.rules[0].name"] == [
            p.split(":")[0] for p in problems(rules(long), events=EVENTS)
        ]


class TestCheckConfig:
    @staticmethod
    def _file(tmp: Path, monkeypatch: pytest.MonkeyPatch, upstream: str) -> Path:
        for var in ENV_VARS:
            monkeypatch.delenv(var.name, raising=False)
        path = tmp / "sidecar.yaml"
        path.write_text(
            "service: {name: permits, address: 10.0.0.1}\n"
            "consul: {enabled: false}\n"
            "upstreams:\n  billing: {endpoints: ['10.0.0.2:8080']}\n"
            "alerts:\n  rules:\n"
            f"    - {{name: open, kind: circuit_open, upstream: {upstream}}}\n"
        )
        return path

    def test_rule_on_a_configured_upstream_is_ok(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`sidecar check-config` with a circuit_open rule on `billing`: OK, exit 0."""
        path = self._file(tmp_path, monkeypatch, "billing")
        assert 0 == main(["check-config", "-c", str(path)])
        assert f"config OK: {path}" == capsys.readouterr().out.splitlines()[0]

    def test_rule_on_an_unknown_upstream_exits_64(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`sidecar check-config` with a rule naming upstream `biling` (a typo): exit 64 and
        the one problem names the rule's field and the upstream."""
        path = self._file(tmp_path, monkeypatch, "biling")
        assert 64 == main(["check-config", "-c", str(path)])
        assert [
            f"config error: 1 problem(s) in {path}",
            "  alerts.rules[0].upstream: no upstream named 'biling' is configured",
        ] == capsys.readouterr().err.splitlines()
