"""docs/troubleshooting.md and docs/operations.md held to the code: every error code, every
alert kind and Prometheus alert has a section, and the exit codes are the CLI's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sidecar.app import EXIT_FAILURE, EXIT_OK
from sidecar.cli import EX_USAGE
from sidecar.config import ALERT_KINDS
from sidecar.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[2]
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
OPERATIONS = ROOT / "docs" / "operations.md"
ALERTS_DOC = ROOT / "docs" / "alerts.md"
PROMETHEUS_RULES = ROOT / "deploy" / "prometheus" / "sidecar-alerts.rules.yml"


def section(path: Path, heading: str) -> str:
    """The text of the `## heading` section of `path`."""
    text = path.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{path.name} has no '## {heading}' section"
    return match[1]


def subsections(text: str) -> dict[str, str]:
    """The `### title` subsections of `text`, by title."""
    parts = re.split(r"^### (.+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def documented_codes() -> dict[str, str]:
    """Error-code headings, ``### `CODE` (status)``: code → its section."""
    found = {}
    for title, body in subsections(section(TROUBLESHOOTING, "Error codes")).items():
        match = re.fullmatch(r"`([A-Z_]+)` \((\d{3})\)", title)
        assert match, f"troubleshooting.md: a code's heading reads `CODE` (status): {title}"
        assert int(match[2]) == ErrorCode(match[1]).status, f"{match[1]} is not {match[2]}"
        found[match[1]] = body
    return found


def documented_kinds() -> dict[str, str]:
    """Alert-kind headings, ``### `kind` ``: kind → its section."""
    found = {}
    for title, body in subsections(section(TROUBLESHOOTING, "Alerts")).items():
        match = re.fullmatch(r"`([a-z_0-9]+)`", title)
        if match:
            found[match[1]] = body
    return found


class TestErrorCodes:
    def test_every_error_code_has_a_section(self) -> None:
        """Each ErrorCode member has exactly one section, headed with its status."""
        assert sorted(code.value for code in ErrorCode) == sorted(documented_codes())

    @pytest.mark.parametrize("code", [code.value for code in ErrorCode])
    def test_each_section_says_what_it_means_how_to_confirm_and_what_to_do(self, code: str) -> None:
        """A code's section has its three parts."""
        body = documented_codes()[code]
        for part in ("**Means.**", "**Confirm.**", "**Do.**"):
            assert part in body, f"{code}: no {part}"


class TestAlerts:
    def test_alerts_md_lists_the_kinds_the_config_accepts(self) -> None:
        """The kinds table of docs/alerts.md is ALERT_KINDS (what troubleshooting follows)."""
        rows = re.findall(r"^\| `([a-z_0-9]+)` \|", section(ALERTS_DOC, "The kinds"), re.M)
        assert sorted(ALERT_KINDS) == sorted(rows)

    def test_every_alert_kind_has_a_section(self) -> None:
        """Each kind has a section with its three parts."""
        kinds = documented_kinds()
        assert sorted(ALERT_KINDS) == sorted(kinds)
        for kind, body in kinds.items():
            for part in ("**Means.**", "**Confirm.**", "**Do.**"):
                assert part in body, f"{kind}: no {part}"

    def test_every_prometheus_alert_is_named(self) -> None:
        """Each alert of the shipped Prometheus rules is named in one kind's section."""
        rules = yaml.safe_load(PROMETHEUS_RULES.read_text())
        names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
        named = {
            name
            for body in documented_kinds().values()
            for name in re.findall(r"Prometheus: `(\w+)`", body)
        }
        assert names == named


class TestExitCodes:
    def test_operations_lists_the_exit_codes_the_cli_uses(self) -> None:
        """The exit-code table of docs/operations.md has a row for exactly 0, 1 and 64."""
        rows = re.findall(r"^\| \*\*(\d+)\*\* \|", section(OPERATIONS, "Command line"), re.M)
        assert sorted([EXIT_OK, EXIT_FAILURE, EX_USAGE]) == sorted(map(int, rows))

    def test_troubleshooting_covers_the_failed_starts(self) -> None:
        """The start-up failures name the exit codes a failed start gives."""
        headings = subsections(section(TROUBLESHOOTING, "Start-up failures"))
        assert any(title.startswith(f"Exit {EX_USAGE}:") for title in headings)
        assert any(title.startswith(f"Exit {EXIT_FAILURE}:") for title in headings)
