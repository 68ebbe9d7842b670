"""The heartbeat of a catalog-mode registration, written into its check's output.

The catalog has no TTL: a sidecar registered there re-registers every interval,
and its check's output ends with `hms-sidecar heartbeat <UTC time> every <n>s`.
Readers (discovery, the sibling reaper) take the time and the interval from it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

HEARTBEAT_CHECK_PREFIX = "sidecar:"
HEARTBEAT_WORDS = "hms-sidecar heartbeat"
#: A heartbeat older than this many of its intervals marks a catalog-mode instance gone.
STALE_HEARTBEATS = 3

_HEARTBEAT = re.compile(re.escape(HEARTBEAT_WORDS) + r" (\S+) every (\d+(?:\.\d+)?)s")


def heartbeat_line(now: float, interval: float) -> str:
    """The heartbeat written into a catalog-mode check's output; read by `heartbeat_deadline`."""
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
    return f"{HEARTBEAT_WORDS} {stamp.replace('+00:00', 'Z')} every {interval:g}s"


def _heartbeat(entry: dict[str, Any]) -> tuple[float, float] | None:
    """(time of the last heartbeat, its interval) of a catalog-mode instance; None when it
    has no sidecar heartbeat (an agent-mode instance, or one registered by other tools)."""
    for check in entry.get("Checks") or ():
        if not str(check.get("CheckID", "")).startswith(HEARTBEAT_CHECK_PREFIX):
            continue
        match = _HEARTBEAT.search(str(check.get("Output") or ""))
        if match is None:
            continue
        try:
            beat = datetime.fromisoformat(match[1]).timestamp()
        except ValueError:
            continue
        return beat, float(match[2])
    return None


def heartbeat_deadline(entry: dict[str, Any]) -> float | None:
    """When a catalog-mode instance's heartbeat goes stale (epoch seconds), or None."""
    beat = _heartbeat(entry)
    return None if beat is None else beat[0] + STALE_HEARTBEATS * beat[1]


def heartbeat_time(entry: dict[str, Any]) -> float | None:
    """The time of the last heartbeat (epoch seconds), or None."""
    beat = _heartbeat(entry)
    return None if beat is None else beat[0]
