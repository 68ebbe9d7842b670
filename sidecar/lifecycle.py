"""Shutdown request and readiness latches.

Signal handlers only call `request_shutdown`; the ordered shutdown itself lives in
`app.Sidecar.shutdown`. Readiness is a set of named latches that must all be
set, plus a draining flag that turns readiness off for good.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from sidecar.stopsignals import STOP_SIGNALS
from sidecar.telemetry.logging import get_logger

log = get_logger("sidecar.lifecycle")


class Readiness:
    """Named conditions that must all hold for /ready to answer 200."""

    def __init__(self) -> None:
        self._waiting: dict[str, str] = {}
        self._checks: list[Callable[[], str | None]] = []
        self.draining = False

    def require(self, name: str, reason: str) -> Callable[[], None]:
        """Add a latch; returns the function that sets it."""
        self._waiting[name] = reason

        def done() -> None:
            self._waiting.pop(name, None)

        return done

    def watch(self, check: Callable[[], str | None]) -> None:
        """A condition asked on every /ready: None when fine, else why not ready."""
        self._checks.append(check)

    def explain(self, name: str, reason: str) -> None:
        """Say why latch `name` is still unset (no effect once it is set)."""
        if name in self._waiting:
            self._waiting[name] = reason

    @property
    def ready(self) -> bool:
        return not self._waiting and not self.draining and not self._failing()

    def _failing(self) -> list[str]:
        return [reason for check in self._checks if (reason := check()) is not None]

    def reasons(self) -> list[str]:
        """Why the sidecar is not ready (empty when it is)."""
        reasons = ["shutting down"] if self.draining else []
        return reasons + sorted(self._waiting.values()) + self._failing()

    def __repr__(self) -> str:
        return f"<Readiness ready={self.ready} waiting={sorted(self._waiting)}>"


class Lifecycle:
    """Holds the shutdown request; installs the signal handlers that make it."""

    def __init__(self) -> None:
        self.readiness = Readiness()
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.reason = ""

    def request_shutdown(self, reason: str) -> None:
        """First call starts a graceful shutdown; a second one cuts it short."""
        if self.stop.is_set():
            if not self.force.is_set():
                log.warning("shutdown_forced", reason=reason)
                self.force.set()
            return
        self.reason = reason
        self.stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_shutdown, sig.name)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)

    async def sleep_unless_forced(self, seconds: float) -> None:
        """Wait `seconds`, or less if a second signal asks to hurry."""
        if seconds <= 0 or self.force.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.force.wait(), seconds)
