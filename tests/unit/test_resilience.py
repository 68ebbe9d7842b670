"""Circuit breaker, retry budget and retry policy of the proxy."""

# SIM300 (Yoda conditions) is off here: STYLE.md asks for `assert expected == actual`.

from __future__ import annotations

import random
import time

import pytest
from purgatory.domain import model as purgatory_model

from sidecar.proxy.resilience import (
    IDEMPOTENT_METHODS,
    Breaker,
    CircuitOpenError,
    RetryBudget,
    retry_backoff,
    retryable_request,
)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """purgatory (and the breaker) read time.time(); make it a fake clock."""
    clock = FakeClock()
    monkeypatch.setattr("purgatory.domain.model.time.time", clock)
    return clock


Transitions = list[tuple[str, str]]


def breaker(
    *, threshold: int = 3, open_for: float = 30.0, probes: int = 1, log: Transitions | None = None
) -> Breaker:
    callback = None if log is None else (lambda old, new: log.append((old, new)))
    return Breaker(
        "billing",
        failure_threshold=threshold,
        open_for=open_for,
        half_open_probes=probes,
        on_state_change=callback,
    )


def trip(b: Breaker, failures: int = 3) -> None:
    for _ in range(failures):
        b.failure(b.admit())


class TestClosed:
    """Counting consecutive failures while closed."""

    def test_admits_without_probing(self, wall: FakeClock) -> None:
        """A closed circuit lets calls through; none of them is a probe."""
        b = breaker()

        assert False is b.admit()
        assert "closed" == b.state
        assert 0 == b.state_code()

    def test_opens_after_threshold_consecutive_failures(self, wall: FakeClock) -> None:
        """The threshold-th failure in a row opens the circuit."""
        b = breaker(threshold=3)

        trip(b, 2)
        assert "closed" == b.state
        trip(b, 1)

        assert "open" == b.state
        assert 2 == b.state_code()

    def test_success_in_between_resets_the_count(self, wall: FakeClock) -> None:
        """A success between failures starts the count over."""
        b = breaker(threshold=3)

        trip(b, 2)
        b.success(b.admit())
        trip(b, 2)

        assert "closed" == b.state
        assert 2 == b.failure_count


class TestOpen:
    """Failing fast while open."""

    def test_admit_raises_with_retry_after(self, wall: FakeClock) -> None:
        """An open circuit refuses calls and says when to come back (rounded up)."""
        b = breaker(open_for=30.0)
        trip(b)
        wall.advance(10.5)

        with pytest.raises(CircuitOpenError) as refused:
            b.admit()

        assert 20 == refused.value.retry_after
        assert 20 == b.retry_after()
        assert "circuit 'billing' is open; retry after 20s" == str(refused.value)

    def test_retry_after_is_at_least_one_second(self, wall: FakeClock) -> None:
        """Moments before the circuit half-opens, Retry-After still says 1."""
        b = breaker(open_for=30.0)
        trip(b)
        wall.advance(29.9999)

        with pytest.raises(CircuitOpenError) as refused:
            b.admit()

        assert 1 == refused.value.retry_after

    def test_state_reports_half_open_once_open_for_elapsed(self, wall: FakeClock) -> None:
        """'open' only while open_for runs; then 'half-open' even before a call arrives."""
        b = breaker(open_for=30.0)
        trip(b)

        wall.advance(30.0)
        at_deadline = b.state
        wall.advance(0.001)

        assert "open" == at_deadline
        assert ("half-open", 1) == (b.state, b.state_code())

    def test_late_results_while_open_change_nothing(self, wall: FakeClock) -> None:
        """Calls admitted before the circuit opened may finish later; they are ignored."""
        b = breaker(threshold=2)
        late = [b.admit() for _ in range(3)]
        b.failure(late[0])
        b.failure(late[1])
        wall.advance(5.0)

        b.success(late[2])

        assert "open" == b.state
        assert 25 == b.retry_after()


class TestHalfOpen:
    """Limited probing after open_for."""

    @pytest.mark.parametrize("probes", [1, 3])
    def test_admits_exactly_the_configured_probes(self, wall: FakeClock, probes: int) -> None:
        """Only `half_open_probes` calls go through at once; the rest fail fast."""
        b = breaker(open_for=30.0, probes=probes)
        trip(b)
        wall.advance(31.0)

        admitted = [b.admit() for _ in range(probes)]
        with pytest.raises(CircuitOpenError) as refused:
            b.admit()

        assert [True] * probes == admitted
        assert 1 == refused.value.retry_after
        assert probes == b.probes_in_flight

    def test_probe_success_closes(self, wall: FakeClock) -> None:
        """A successful probe closes the circuit and clears the failure count."""
        b = breaker(open_for=30.0)
        trip(b)
        wall.advance(31.0)

        b.success(b.admit())

        assert "closed" == b.state
        assert 0 == b.failure_count
        assert False is b.admit()

    def test_probe_failure_reopens_for_open_for(self, wall: FakeClock) -> None:
        """A failed probe opens the circuit again for a full open_for."""
        b = breaker(open_for=30.0)
        trip(b)
        wall.advance(31.0)

        b.failure(b.admit())

        assert "open" == b.state
        assert 30 == b.retry_after()

    def test_release_frees_the_probe_slot(self, wall: FakeClock) -> None:
        """A probe that ends without a verdict lets the next caller probe instead."""
        b = breaker(open_for=30.0, probes=1)
        trip(b)
        wall.advance(31.0)

        b.release(b.admit())

        assert "half-open" == b.state
        assert True is b.admit()

    def test_non_probe_results_do_not_decide(self, wall: FakeClock) -> None:
        """Results of calls admitted while closed neither close nor re-open a half-open
        circuit."""
        b = breaker(threshold=1, open_for=30.0)
        early = [b.admit() for _ in range(3)]
        b.failure(early[0])
        wall.advance(31.0)
        probe = b.admit()

        b.success(early[1])
        b.failure(early[2])

        assert "half-open" == b.state
        assert (True, 1) == (probe, b.probes_in_flight)

    def test_late_probe_failure_after_close_counts_once(self, wall: FakeClock) -> None:
        """With several probes, the first success closes; a later probe failure is one
        failure of the closed circuit, not a re-open."""
        b = breaker(threshold=3, open_for=30.0, probes=3)
        trip(b)
        wall.advance(31.0)
        first, second = b.admit(), b.admit()

        b.success(first)
        b.failure(second)

        assert ("closed", 1, 0) == (b.state, b.failure_count, b.probes_in_flight)


class TestReset:
    """The admin reset."""

    def test_reset_closes_an_open_circuit(self, wall: FakeClock) -> None:
        """reset() closes the circuit, forgets failures and in-flight probes."""
        b = breaker(open_for=30.0)
        trip(b)
        wall.advance(31.0)
        b.admit()

        b.reset()

        assert ("closed", 0, 0) == (b.state, b.failure_count, b.probes_in_flight)
        assert False is b.admit()

    def test_reset_of_a_closed_circuit_clears_failures(self, wall: FakeClock) -> None:
        """reset() on a closed circuit drops the failures counted so far."""
        b = breaker(threshold=3)
        trip(b, 2)

        b.reset()

        assert 0 == b.failure_count


class TestStateChange:
    """The on_state_change callback."""

    def test_callback_sees_every_transition(self, wall: FakeClock) -> None:
        """A full cycle reports (old, new) for each move, in order."""
        log: Transitions = []
        b = breaker(open_for=30.0, log=log)
        trip(b)
        wall.advance(31.0)
        b.failure(b.admit())
        wall.advance(31.0)
        b.success(b.admit())
        trip(b)
        b.reset()

        assert [
            ("closed", "open"),
            ("open", "half-open"),
            ("half-open", "open"),
            ("open", "half-open"),
            ("half-open", "closed"),
            ("closed", "open"),
            ("open", "closed"),
        ] == log

    def test_reset_of_a_closed_circuit_reports_nothing(self, wall: FakeClock) -> None:
        """No transition, no callback."""
        log: Transitions = []
        b = breaker(log=log)

        b.reset()

        assert [] == log

    def test_repr_shows_the_state(self, wall: FakeClock) -> None:
        """repr shows name, state, failures and probes."""
        b = breaker(threshold=3, open_for=30.0)
        trip(b, 1)

        assert "Breaker('billing', state=closed, failures=1/3, probes=0/1, open_for=30.0s)" == repr(
            b
        )


class TestNoGrowth:
    """Nothing accumulates on the hot path."""

    def test_purgatory_messages_are_drained(self, wall: FakeClock) -> None:
        """purgatory appends an event per failure and transition; after 10k calls of
        every kind the list is still empty."""
        b = breaker(threshold=3, open_for=1.0, probes=2)
        for i in range(10_000):
            wall.advance(0.05)
            try:
                probe = b.admit()
            except CircuitOpenError:
                continue
            if i % 7 < 4:
                b.failure(probe)
            else:
                b.success(probe)

        assert [] == b._ctx.messages  # white-box: purgatory's event list

    def test_refusals_do_not_grow_a_traceback(self, wall: FakeClock) -> None:
        """purgatory raises one OpenedState object again and again; its traceback is
        dropped each time, so memory stays flat while the circuit is open."""
        b = breaker(open_for=30.0)
        trip(b)
        for _ in range(1000):
            with pytest.raises(CircuitOpenError):
                b.admit()

        opened = b._ctx._state  # white-box: purgatory's OpenedState
        assert isinstance(opened, purgatory_model.OpenedState)
        assert opened.__traceback__ is None

    def test_real_clock_half_opens_after_a_short_open_for(self) -> None:
        """Without a patched clock, a tiny open_for elapses on its own."""
        b = breaker(threshold=1, open_for=0.000_001)
        trip(b, 1)
        deadline = time.time() + 1.0
        while b.state == "open" and time.time() < deadline:
            pass  # busy-wait for about a microsecond

        assert True is b.admit()


class TestValidation:
    """Nonsense settings fail at construction."""

    @pytest.mark.parametrize(
        ("threshold", "open_for", "probes"), [(0, 1.0, 1), (1, 0.0, 1), (1, 1.0, 0)]
    )
    def test_rejects_non_positive_settings(
        self, threshold: int, open_for: float, probes: int
    ) -> None:
        """failure_threshold, open_for and half_open_probes must be positive."""
        with pytest.raises(ValueError, match="must be"):
            breaker(threshold=threshold, open_for=open_for, probes=probes)


class TestRetryBudget:
    """Linkerd's retry budget."""

    def test_floor_of_min_per_second_times_ttl(self) -> None:
        """With no traffic, min_per_second x ttl retries are allowed, then no more."""
        budget = RetryBudget(0.2, min_per_second=10.0, ttl=10.0, clock=FakeClock())

        granted = sum(budget.try_withdraw() for _ in range(150))

        assert 100 == granted

    def test_ratio_caps_retries_under_load(self) -> None:
        """Under load, retries are limited to the floor plus ratio x requests."""
        budget = RetryBudget(0.2, min_per_second=10.0, ttl=10.0, clock=FakeClock())
        for _ in range(1000):
            budget.deposit()

        granted = sum(budget.try_withdraw() for _ in range(1000))

        assert 100 + 200 == granted

    def test_ratio_alone_without_floor(self) -> None:
        """With no floor, a retry needs requests to have paid for it."""
        budget = RetryBudget(0.2, min_per_second=0.0, clock=FakeClock())
        no_traffic = budget.try_withdraw()
        for _ in range(10):
            budget.deposit()

        granted = sum(budget.try_withdraw() for _ in range(10))

        assert (False, 2) == (no_traffic, granted)

    def test_withdrawals_leave_the_window(self) -> None:
        """Retries older than ttl no longer count against the budget."""
        clock = FakeClock()
        budget = RetryBudget(0.2, min_per_second=1.0, ttl=10.0, clock=clock)
        spent = sum(budget.try_withdraw() for _ in range(20))

        clock.advance(9.0)
        still_spent = budget.try_withdraw()
        clock.advance(1.0)
        refilled = sum(budget.try_withdraw() for _ in range(20))

        assert (10, False, 10) == (spent, still_spent, refilled)

    def test_deposits_leave_the_window(self) -> None:
        """Requests older than ttl no longer earn retries."""
        clock = FakeClock()
        budget = RetryBudget(0.5, min_per_second=0.0, ttl=10.0, clock=clock)
        for _ in range(10):
            budget.deposit()

        clock.advance(10.0)

        assert (False, 0) == (budget.try_withdraw(), budget.available())

    def test_window_slides_bucket_by_bucket(self) -> None:
        """Each second (ttl / 10) the oldest second of traffic drops out."""
        clock = FakeClock()
        budget = RetryBudget(1.0, min_per_second=0.0, ttl=10.0, clock=clock)
        for _ in range(10):  # one request per second for ten seconds
            budget.deposit()
            clock.advance(1.0)

        available = []
        for _ in range(3):
            available.append(budget.available())
            clock.advance(1.0)

        assert [9, 8, 7] == available

    def test_long_idle_clears_everything(self) -> None:
        """After a long quiet spell only the floor is left."""
        clock = FakeClock()
        budget = RetryBudget(0.2, min_per_second=1.0, ttl=10.0, clock=clock)
        for _ in range(100):
            budget.deposit()
            budget.try_withdraw()

        clock.advance(3600.0)

        assert 10 == budget.available()

    def test_repr_shows_the_window(self) -> None:
        """repr shows ratio, floor and what the window holds."""
        budget = RetryBudget(0.2, clock=FakeClock())
        budget.deposit()
        budget.try_withdraw()

        assert "RetryBudget(ratio=0.2, floor=100, requests=1, retries=1)" == repr(budget)


class TestRetryPolicy:
    """Which requests may be retried, and how long to wait."""

    def test_idempotent_methods(self) -> None:
        """RFC 9110: the safe methods plus PUT and DELETE."""
        assert (
            frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
            == IDEMPOTENT_METHODS
        )

    @pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
    def test_idempotent_methods_are_retryable(self, method: bytes) -> None:
        """An idempotent request may be replayed."""
        assert True is retryable_request(method, has_idempotency_key=False)

    @pytest.mark.parametrize("method", [b"POST", b"PATCH", b"CONNECT", b"get"])
    def test_other_methods_are_not(self, method: bytes) -> None:
        """Non-idempotent requests are never replayed (methods are case-sensitive)."""
        assert False is retryable_request(method, has_idempotency_key=False)

    def test_idempotency_key_makes_a_post_retryable(self) -> None:
        """An Idempotency-Key lets the proxy replay even a POST."""
        assert True is retryable_request(b"POST", has_idempotency_key=True)

    @pytest.mark.parametrize(
        ("attempt", "bound"),
        [(0, 0.025), (1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (10, 0.25), (10_000, 0.25)],
    )
    def test_backoff_is_fully_jittered_and_capped(self, attempt: int, bound: float) -> None:
        """The wait is uniform in [0, min(250 ms, 25 ms x 2^attempt))."""
        rng = random.Random(attempt)

        waits = [retry_backoff(attempt, rng) for _ in range(2000)]

        assert all(0.0 <= w < bound for w in waits)
        assert max(waits) > 0.9 * bound
        assert min(waits) < 0.1 * bound


class _AlwaysSlow(Breaker):
    """The breaker without its closed-state fast paths: every call goes through purgatory."""

    __slots__ = ()

    def admit(self) -> bool:
        return self._admit()

    def success(self, probe: bool) -> None:
        self._success(probe)


class TestClosedFastPath:
    @pytest.mark.parametrize("seed", range(20))
    def test_fast_and_slow_paths_agree_on_any_sequence(self, wall: FakeClock, seed: int) -> None:
        """Random admits, successes, failures, releases and clock jumps: the breaker with
        its closed-state shortcuts decides, counts and reports transitions exactly as the
        same breaker going through purgatory every time."""
        rng = random.Random(seed)
        fast_log: Transitions = []
        slow_log: Transitions = []
        fast = breaker(threshold=3, open_for=5.0, probes=2, log=fast_log)
        slow = _AlwaysSlow(
            "billing",
            failure_threshold=3,
            open_for=5.0,
            half_open_probes=2,
            on_state_change=lambda old, new: slow_log.append((old, new)),
        )
        pending: list[tuple[bool, bool]] = []  # (fast probe, slow probe) of calls in flight
        for _ in range(400):
            action = rng.random()
            if action < 0.4:
                outcomes: list[tuple[str, int]] = []
                for b in (fast, slow):
                    try:
                        outcomes.append(("admitted", int(b.admit())))
                    except CircuitOpenError as exc:
                        outcomes.append(("refused", exc.retry_after))
                assert outcomes[0] == outcomes[1]
                (kind, probe), _ = outcomes
                if kind == "admitted":
                    pending.append((bool(probe), bool(probe)))
            elif pending and action < 0.9:
                probe_fast, probe_slow = pending.pop(rng.randrange(len(pending)))
                verdict = rng.random()
                if verdict < 0.6:
                    fast.success(probe_fast)
                    slow.success(probe_slow)
                elif verdict < 0.95:
                    fast.failure(probe_fast)
                    slow.failure(probe_slow)
                else:
                    fast.release(probe_fast)
                    slow.release(probe_slow)
            else:
                wall.advance(rng.choice((0.5, 2.0, 6.0)))
            assert (fast.state, fast.failure_count, fast.probes_in_flight) == (
                slow.state,
                slow.failure_count,
                slow.probes_in_flight,
            )
        assert fast_log == slow_log
        assert fast_log  # the sequences did open and close the circuit
