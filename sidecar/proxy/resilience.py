"""Per-upstream resilience on the hot path: circuit breaker, retry budget, retry policy.

Everything here is plain synchronous code called once or twice per proxied request
from the event loop: no asyncio, no logging, no timers. State moves lazily when the
next call looks at it.

- `Breaker` wraps purgatory's consecutive-failure state machine
  (`purgatory.domain.model.Context`) and adds what purgatory lacks: a cap on
  concurrent half-open probes.
- `RetryBudget` is Linkerd's retry budget: retries may not exceed a floor plus a
  ratio of recent requests.
- `retryable_request` and `retry_backoff` are the retry policy (RFC 9110 idempotency,
  Envoy's fully jittered exponential back-off).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Final

from purgatory.domain.messages.events import ContextChanged
from purgatory.domain.model import ClosedState, Context, OpenedState
from purgatory.typing import StateName

__all__ = [
    "IDEMPOTENT_METHODS",
    "Breaker",
    "CircuitOpenError",
    "RetryBudget",
    "retry_backoff",
    "retryable_request",
]

CLOSED: Final = "closed"
HALF_OPEN: Final = "half-open"
OPEN: Final = "open"

# purgatory's state names -> ours (and the `sidecar_circuit_state` gauge value).
_STATE_NAME: Final[dict[StateName, str]] = {
    "closed": CLOSED,
    "half-opened": HALF_OPEN,
    "opened": OPEN,
}
_STATE_CODE: Final[dict[str, int]] = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
#: A static of the compiled build (an imported name is looked up in the module dict).
_CLOSED_STATE: Final = ClosedState


class CircuitOpenError(Exception):
    """The circuit refuses the call; the client may try again after `retry_after` seconds."""

    def __init__(self, name: str, retry_after: int) -> None:
        # Raised on every refused call while an upstream is down: keep it cheap and
        # format the message only if someone prints it.
        super().__init__(name, retry_after)
        self.name = name
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"circuit {self.name!r} is open; retry after {self.retry_after}s"


class Breaker:
    """One consecutive-failure circuit breaker per upstream, on purgatory's state machine.

    Closed: `failure_threshold` consecutive failures open it; any success resets the
    count. Open: every `admit()` raises `CircuitOpenError` until `open_for` seconds
    have passed. Half-open: at most `half_open_probes` calls are in flight at once
    (purgatory alone would let every caller through); the rest fail fast with
    `retry_after == 1`. A probe success closes the circuit; a probe failure re-opens
    it for another `open_for`. `release(probe)` frees a probe slot without a verdict
    (the client went away), so the next caller becomes the probe.

    Results of non-probe calls (admitted while closed, finishing late) are **ignored
    while half-open**: they describe the upstream before the circuit opened, so only
    probes decide. While open, purgatory ignores every result anyway. Probe results
    that land after another probe already decided are applied to whatever state the
    circuit is in then (a late probe failure counts as one failure of a closed circuit).

    The probe count is the number of probes actually in flight: it is not reset when
    the circuit closes or re-opens, so a slow probe from an earlier half-open period
    still holds its slot (the cap on concurrent probes is never exceeded). Only
    `reset()` clears it.

    Purgatory reads `time.time()`; so does this class, so tests can patch one clock.
    `on_state_change(old, new)` fires on every transition of the state machine; note
    that open -> half-open happens when the first call after `open_for` arrives, while
    `state` and `state_code()` already report "half-open" as soon as `open_for` passed.
    """

    __slots__ = ("_ctx", "_half_open_probes", "_last", "_on_state_change", "_probes", "name")

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        open_for: float,
        half_open_probes: int,
        on_state_change: Callable[[str, str], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if open_for <= 0:
            raise ValueError("open_for must be > 0")
        if half_open_probes < 1:
            raise ValueError("half_open_probes must be >= 1")
        self.name = name
        self._ctx = Context(name, failure_threshold, open_for)
        self._half_open_probes = half_open_probes
        self._on_state_change = on_state_change
        self._probes = 0
        # purgatory's state under our name, kept by _drain() from its ContextChanged
        # events (cheaper than asking the context on every call).
        self._last: str = CLOSED

    # -- hot path -------------------------------------------------------------------

    def admit(self) -> bool:
        """Let one call through; True means it is a half-open probe.

        Raises `CircuitOpenError` while open, or while half-open with every probe
        slot taken.
        """
        if type(self._ctx._state) is _CLOSED_STATE:
            # The common case, exact: purgatory's closed state ignores a new request
            # (and every earlier event was drained), so this is what _admit does.
            return False
        return self._admit()

    def admits_freely(self) -> bool:
        """Whether `admit()` would now let a call through as a plain (non-probe) call
        and change nothing: the circuit is closed. The proxy's task-less path asks
        this first and leaves every other state to `admit()` on the coroutine path."""
        return type(self._ctx._state) is _CLOSED_STATE

    def _admit(self) -> bool:
        ctx = self._ctx
        try:
            ctx.handle_new_request()
        except OpenedState as exc:
            # purgatory raises the same OpenedState object every time; its traceback
            # would grow with each raise (and pin our frames) unless we drop it.
            exc.__traceback__ = None
            refused_for = max(1, math.ceil(exc.opened_at + ctx.ttl - time.time()))
        else:
            refused_for = 0
        if ctx.messages:
            self._drain()
        if refused_for:
            raise CircuitOpenError(self.name, refused_for)
        if self._last != HALF_OPEN:
            return False
        if self._probes >= self._half_open_probes:
            raise CircuitOpenError(self.name, 1)
        self._probes += 1
        return True

    def success(self, probe: bool) -> None:
        """Record a call that the upstream answered well."""
        state = self._ctx._state
        if not probe and type(state) is _CLOSED_STATE and not state.failure_count:
            return  # closed with no failure counted: _success would change nothing
        self._success(probe)

    def _success(self, probe: bool) -> None:
        ctx = self._ctx
        if probe:
            if self._probes:
                self._probes -= 1
        elif self._last == HALF_OPEN:
            return
        ctx.handle_end_request()
        if ctx.messages:
            self._drain()

    def failure(self, probe: bool) -> None:
        """Record a call that failed (connect error, timeout, a 5xx the policy counts)."""
        ctx = self._ctx
        if probe:
            if self._probes:
                self._probes -= 1
        elif self._last == HALF_OPEN:
            return
        ctx.handle_exception(_FAILURE)
        if ctx.messages:
            self._drain()

    def release(self, probe: bool) -> None:
        """The call ended without a verdict: free its probe slot, record nothing."""
        if probe and self._probes:
            self._probes -= 1

    # -- control and inspection -----------------------------------------------------

    def reset(self) -> None:
        """Admin reset: closed, no failures counted, no probes in flight."""
        self._probes = 0
        self._ctx.set_state(ClosedState())
        self._drain()

    @property
    def state(self) -> str:
        """'closed', 'half-open' or 'open'; 'open' only while `open_for` has not elapsed."""
        ctx = self._ctx
        name = ctx.state
        if name == "opened" and not self._still_open(ctx):
            return HALF_OPEN
        return _STATE_NAME[name]

    def state_code(self) -> int:
        """0 closed, 1 half-open, 2 open: the value of the `sidecar_circuit_state` gauge."""
        return _STATE_CODE[self.state]

    def retry_after(self) -> int:
        """Whole seconds (at least 1) until the circuit lets a probe through."""
        opened_at = self._ctx.opened_at
        if self._ctx.state != "opened" or opened_at is None:
            return 1
        return max(1, math.ceil(opened_at + self._ctx.ttl - time.time()))

    @property
    def failure_count(self) -> int:
        """Consecutive failures counted while closed."""
        return self._ctx.failure_count or 0

    @property
    def probes_in_flight(self) -> int:
        return self._probes

    def __repr__(self) -> str:
        return (
            f"Breaker({self.name!r}, state={self.state}, failures={self.failure_count}"
            f"/{self._ctx.threshold}, probes={self._probes}/{self._half_open_probes}, "
            f"open_for={self._ctx.ttl}s)"
        )

    # -- internals ------------------------------------------------------------------

    @staticmethod
    def _still_open(ctx: Context) -> bool:
        # Same comparison as purgatory's OpenedState.handle_new_request.
        opened_at = ctx.opened_at
        return opened_at is not None and time.time() <= opened_at + ctx.ttl

    def _drain(self) -> None:
        """Empty purgatory's event list (it only ever grows) and report transitions."""
        messages = self._ctx.messages
        callback = self._on_state_change
        try:
            for message in messages:
                if isinstance(message, ContextChanged):
                    new = _STATE_NAME[message.state]
                    old, self._last = self._last, new
                    if callback is not None and old != new:
                        callback(old, new)
        finally:
            # Even if the callback raised: the events were seen, never replay them.
            messages.clear()


class _UpstreamFailure(Exception):
    """The exception handed to purgatory for a failed call (it only counts it)."""


# One shared instance: purgatory never raises or stores it, so no traceback builds up.
_FAILURE: Final = _UpstreamFailure("upstream call failed")


class RetryBudget:
    """Linkerd's retry budget over a sliding window of `ttl` seconds.

    Every original request `deposit()`s; a retry may `try_withdraw()` while

        retries in the window < min_per_second * ttl + ratio * requests in the window

    so a quiet upstream can always get a few retries, and a busy one at most `ratio`
    extra load from retries. The window is 10 buckets of `ttl / 10` seconds (the
    current, partly elapsed bucket and the 9 before it); a call touches at most 10
    buckets, and almost always none (O(1)).
    """

    __slots__ = (
        "_bucket_end",
        "_bucket_width",
        "_clock",
        "_current",
        "_deposits",
        "_floor",
        "_requests",
        "_retries",
        "_slot",
        "_withdrawals",
        "ratio",
    )

    BUCKETS: Final = 10

    def __init__(
        self,
        ratio: float,
        min_per_second: float = 10.0,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0:
            raise ValueError("ratio must be >= 0")
        if min_per_second < 0:
            raise ValueError("min_per_second must be >= 0")
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        self.ratio = ratio
        self._floor = min_per_second * ttl
        self._bucket_width = ttl / self.BUCKETS
        self._clock = clock
        self._deposits = [0] * self.BUCKETS
        self._withdrawals = [0] * self.BUCKETS
        self._requests = 0  # sum of _deposits
        self._retries = 0  # sum of _withdrawals
        self._current = int(clock() // self._bucket_width)  # bucket number since clock 0
        self._slot = self._current % self.BUCKETS
        self._bucket_end = (self._current + 1) * self._bucket_width

    def _rotate(self, now: float) -> None:
        """Move to the bucket holding `now`, emptying the ones that left the window."""
        index = int(now // self._bucket_width)
        current = self._current
        if index <= current:  # float edge at a bucket boundary
            self._bucket_end = (current + 1) * self._bucket_width
            return
        deposits, withdrawals = self._deposits, self._withdrawals
        # At most all 10 buckets are cleared however long the budget sat idle.
        for step in range(1, min(index - current, self.BUCKETS) + 1):
            slot = (current + step) % self.BUCKETS
            self._requests -= deposits[slot]
            self._retries -= withdrawals[slot]
            deposits[slot] = 0
            withdrawals[slot] = 0
        self._current = index
        self._slot = index % self.BUCKETS
        self._bucket_end = (index + 1) * self._bucket_width

    def deposit(self) -> None:
        """Count one original request."""
        now = self._clock()
        if now >= self._bucket_end:
            self._rotate(now)
        self._deposits[self._slot] += 1
        self._requests += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False means the retry must not be made."""
        now = self._clock()
        if now >= self._bucket_end:
            self._rotate(now)
        if self._retries >= self._floor + self.ratio * self._requests:
            return False
        self._withdrawals[self._slot] += 1
        self._retries += 1
        return True

    def available(self) -> int:
        """Retries that could be withdrawn right now (for status pages)."""
        now = self._clock()
        if now >= self._bucket_end:
            self._rotate(now)
        return max(0, math.ceil(self._floor + self.ratio * self._requests - self._retries))

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, floor={self._floor:g}, "
            f"requests={self._requests}, retries={self._retries})"
        )


# RFC 9110 §9.2.2: the safe methods plus PUT and DELETE.
IDEMPOTENT_METHODS: Final[frozenset[bytes]] = frozenset(
    (b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE")
)


def retryable_request(method: bytes, has_idempotency_key: bool) -> bool:
    """May a proxy replay this request? Idempotent methods, or an `Idempotency-Key`."""
    return has_idempotency_key or method in IDEMPOTENT_METHODS


_BACKOFF_BASE: Final = 0.025
_BACKOFF_CAP: Final = 0.25


def retry_backoff(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before retry number `attempt` (0 = the first retry).

    Envoy's fully jittered exponential back-off: uniform in
    [0, min(250 ms, 25 ms * 2**attempt)).
    """
    # 2**4 * 25 ms already exceeds the cap; clamping keeps huge attempts cheap.
    bound = min(_BACKOFF_CAP, _BACKOFF_BASE * (1 << min(max(attempt, 0), 4)))
    return rng.random() * bound
