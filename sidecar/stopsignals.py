"""The signals that stop the sidecar, and how they act before the app handles them.

Kept free of heavy imports: `python -m sidecar` installs `exit_quietly` before it
imports anything else, so a SIGTERM while the libraries load still exits 0.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

#: SIGTERM (Kubernetes, systemd) and SIGINT (a terminal) both stop the sidecar.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: What `signal.signal` returns: a function, SIG_DFL / SIG_IGN, or None.
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # nothing is bound yet: nothing to drain


def exit_quietly_until_started() -> dict[signal.Signals, Handler]:
    """Make each stop signal exit 0 at once; return the handlers it replaced."""
    return {sig: signal.signal(sig, _exit_quietly) for sig in STOP_SIGNALS}
