"""The balancer: P2C choice, peak-EWMA, outlier ejection, membership updates."""

# SIM300 (Yoda conditions) is off here: STYLE.md asks for `assert expected == actual`.

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.discovery.base import Endpoint
from sidecar.proxy.balancer import DECAY, DEFAULT_RTT, Balancer, EndpointStats


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ep(i: int) -> Endpoint:
    return Endpoint(f"10.0.0.{i}", 8080)


def make(
    n: int,
    clock: FakeClock | None = None,
    *,
    policy: str = "least_request",
    consecutive_failures: int = 5,
    base_ejection: float = 30.0,
    max_ejection: float = 300.0,
    max_ejection_percent: int = 50,
    on_remove: Callable[[EndpointStats], None] | None = None,
) -> Balancer:
    balancer = Balancer(
        "billing",
        policy=policy,
        consecutive_failures=consecutive_failures,
        base_ejection=base_ejection,
        max_ejection=max_ejection,
        max_ejection_percent=max_ejection_percent,
        clock=clock or FakeClock(),
        rng=random.Random(7),
        on_remove=on_remove,
    )
    balancer.update([ep(i) for i in range(n)])
    return balancer


def fail(balancer: Balancer, stats: EndpointStats, times: int = 1) -> None:
    for _ in range(times):
        balancer.end(stats, balancer.begin(stats), ok=False)


def by_address(balancer: Balancer) -> dict[str, EndpointStats]:
    return {s.address: s for s in balancer.endpoints}


class TestPick:
    """Power of two choices over the eligible endpoints."""

    @pytest.mark.parametrize("policy", ["least_request", "peak_ewma"])
    def test_prefers_the_less_loaded_of_two(self, policy: str) -> None:
        """With two endpoints, the one with fewer requests in flight always wins."""
        balancer = make(2, policy=policy)
        busy, idle = balancer.endpoints
        for _ in range(3):
            balancer.begin(busy)

        picks = {balancer.pick() for _ in range(200)}

        assert {idle} == picks

    def test_spreads_over_all_endpoints_when_equally_loaded(self) -> None:
        """Equal costs give every endpoint a fair share of the picks."""
        balancer = make(5)

        counts = Counter(balancer.pick() for _ in range(5000))

        assert set(balancer.endpoints) == set(counts)
        assert all(800 < c < 1200 for c in counts.values())

    def test_single_eligible_endpoint_is_returned(self) -> None:
        """One endpoint needs no choice."""
        balancer = make(1)

        assert balancer.endpoints[0] is balancer.pick()

    def test_no_endpoints_gives_none(self) -> None:
        """An upstream with no endpoints has nothing to pick."""
        balancer = make(0)

        assert balancer.pick() is None

    def test_all_ejected_gives_none(self) -> None:
        """When every endpoint is ejected (allowed at 100%), pick returns None."""
        balancer = make(2, consecutive_failures=1, max_ejection_percent=100)
        for stats in balancer.endpoints:
            fail(balancer, stats)

        assert balancer.pick() is None

    def test_never_picks_an_ejected_endpoint(self) -> None:
        """An ejected endpoint is out of rotation until its ejection time passed."""
        balancer = make(3, consecutive_failures=1)
        bad = balancer.endpoints[1]
        fail(balancer, bad)

        picks = {balancer.pick() for _ in range(500)}

        assert bad not in picks
        assert 2 == len(picks)

    @pytest.mark.parametrize("n", [2, 3, 5])
    def test_avoid_is_honoured_when_another_is_eligible(self, n: int) -> None:
        """A retry never lands on the endpoint it is avoiding if there is another."""
        balancer = make(n)
        avoid = balancer.endpoints[0]

        picks = Counter(balancer.pick(avoid) for _ in range(3000))

        assert avoid not in picks
        assert n - 1 == len(picks)

    def test_avoid_is_returned_when_it_is_the_only_one(self) -> None:
        """With a single eligible endpoint, avoiding it is impossible: it is used."""
        balancer = make(1)
        only = balancer.endpoints[0]

        assert only is balancer.pick(only)

    def test_unknown_policy_is_rejected(self) -> None:
        """A typo in the policy name fails at construction, naming the choices."""
        with pytest.raises(ValueError, match="least_request"):
            Balancer("billing", policy="round_robin")


class TestBeginEnd:
    """In-flight accounting."""

    def test_begin_and_end_track_outstanding(self) -> None:
        """begin adds one request in flight, end removes it."""
        balancer = make(1)
        stats = balancer.endpoints[0]

        first = balancer.begin(stats)
        balancer.begin(stats)
        balancer.end(stats, first, ok=True)

        assert 1 == stats.outstanding

    def test_begin_returns_the_clock(self) -> None:
        """The start time handed back is the balancer's clock."""
        clock = FakeClock(42.0)
        balancer = make(1, clock)

        assert 42.0 == balancer.begin(balancer.endpoints[0])

    def test_outstanding_never_goes_negative(self) -> None:
        """An unmatched end() (a caller bug) does not drive the count below zero."""
        balancer = make(1)
        stats = balancer.endpoints[0]

        balancer.end(stats, 0.0, ok=True)

        assert 0 == stats.outstanding

    def test_latency_sample_ends_at_the_first_byte(self) -> None:
        """With first_byte given, a long body relay does not count as endpoint latency."""
        clock = FakeClock()
        balancer = make(1, clock, policy="peak_ewma")
        stats = balancer.endpoints[0]
        start = balancer.begin(stats)
        clock.advance(0.5)  # the response head arrives after 500 ms (a peak: replaces ewma)
        first_byte = balancer.now()
        clock.advance(30.0)  # the app then reads a large body for 30 s
        balancer.end(stats, start, ok=True, first_byte=first_byte)
        assert 0.5 == stats.ewma

    def test_abandon_drops_in_flight_without_a_verdict(self) -> None:
        """A request the app gave up on neither resets nor adds to consecutive failures."""
        balancer = make(1)
        stats = balancer.endpoints[0]
        fail(balancer, stats, times=3)
        balancer.begin(stats)
        balancer.abandon(stats)
        assert (0, 3) == (stats.outstanding, stats.consecutive_failures)


class TestEjection:
    """Envoy-style outlier ejection on consecutive failures."""

    def test_ejected_after_consecutive_failures(self) -> None:
        """The Nth failure in a row takes the endpoint out of rotation."""
        clock = FakeClock()
        balancer = make(3, clock, consecutive_failures=3)
        bad = balancer.endpoints[0]

        fail(balancer, bad, 2)
        assert not bad.is_ejected(clock())
        fail(balancer, bad)

        assert bad.is_ejected(clock())
        assert (2, 1) == balancer.counts()

    def test_success_resets_the_failure_count(self) -> None:
        """A success between failures starts the count over."""
        clock = FakeClock()
        balancer = make(3, clock, consecutive_failures=3)
        stats = balancer.endpoints[0]

        fail(balancer, stats, 2)
        balancer.end(stats, balancer.begin(stats), ok=True)
        fail(balancer, stats, 2)

        assert 2 == stats.consecutive_failures
        assert not stats.is_ejected(clock())

    def test_ejection_time_grows_and_is_capped(self) -> None:
        """Each ejection lasts base x n seconds, never more than max_ejection."""
        clock = FakeClock()
        balancer = make(2, clock, consecutive_failures=1, base_ejection=10.0, max_ejection=25.0)
        stats = balancer.endpoints[0]
        durations = []
        for _ in range(4):
            fail(balancer, stats)
            durations.append(stats.ejected_until - clock())
            clock.now = stats.ejected_until
            balancer.pick()  # lazy return

        assert [10.0, 20.0, 25.0, 25.0] == durations
        assert 4 == stats.ejections

    def test_multiplier_decays_while_the_endpoint_stays_healthy(self) -> None:
        """One step less per base_ejection spent in rotation: 10 s, 20 s, then after 15 s
        back in rotation 20 s again (not 30 s), and after a long healthy spell the base."""
        clock = FakeClock()
        balancer = make(2, clock, consecutive_failures=1, base_ejection=10.0, max_ejection=300.0)
        stats = balancer.endpoints[0]
        durations = []

        def eject_then_return(healthy_for: float) -> None:
            fail(balancer, stats)
            durations.append(stats.ejected_until - clock())
            clock.now = stats.ejected_until
            balancer.pick()  # lazy return
            clock.advance(healthy_for)

        eject_then_return(0.0)
        eject_then_return(15.0)  # one base period in rotation: multiplier 2 -> 1
        eject_then_return(0.0)
        eject_then_return(0.0)
        eject_then_return(3600.0)
        eject_then_return(0.0)

        assert [10.0, 20.0, 20.0, 30.0, 40.0, 10.0] == durations
        assert 6 == stats.ejections
        assert 1 == stats.multiplier

    def test_never_more_than_max_ejection_percent(self) -> None:
        """Failures beyond the allowed share leave endpoints in rotation."""
        clock = FakeClock()
        balancer = make(4, clock, consecutive_failures=1, max_ejection_percent=50)
        for stats in balancer.endpoints:
            fail(balancer, stats, 3)

        assert (2, 2) == balancer.counts()
        assert 2 == sum(s.is_ejected(clock()) for s in balancer.endpoints)

    def test_single_endpoint_is_never_ejected_at_fifty_percent(self) -> None:
        """floor(1 x 50%) = 0: the only endpoint stays (the breaker guards it)."""
        clock = FakeClock()
        balancer = make(1, clock, consecutive_failures=1)
        stats = balancer.endpoints[0]

        fail(balancer, stats, 10)

        assert not stats.is_ejected(clock())
        assert 0 == stats.ejections

    def test_returns_lazily_after_the_ejection_time(self) -> None:
        """Once its time passed, the endpoint is picked again with a clean count."""
        clock = FakeClock()
        balancer = make(2, clock, consecutive_failures=2, base_ejection=30.0)
        bad = balancer.endpoints[0]
        fail(balancer, bad, 2)

        clock.advance(29.0)
        still_out = {balancer.pick() for _ in range(100)}
        clock.advance(1.0)
        back = {balancer.pick() for _ in range(200)}

        assert bad not in still_out
        assert bad in back
        assert 0 == bad.consecutive_failures
        assert 0.0 == bad.ejected_until

    def test_late_failures_do_not_extend_an_ejection(self) -> None:
        """Failures of requests sent before the ejection leave its end unchanged."""
        clock = FakeClock()
        balancer = make(
            2, clock, consecutive_failures=1, base_ejection=30.0, max_ejection_percent=100
        )
        bad = balancer.endpoints[0]
        in_flight = [balancer.begin(bad) for _ in range(3)]
        balancer.end(bad, in_flight[0], ok=False)
        until = bad.ejected_until

        clock.advance(5.0)
        for start in in_flight[1:]:
            balancer.end(bad, start, ok=False)

        assert until == bad.ejected_until
        assert 1 == bad.ejections

    def test_failure_after_due_return_counts_from_zero(self) -> None:
        """A failure that lands after the ejection expired counts as the first of a new run."""
        clock = FakeClock()
        balancer = make(2, clock, consecutive_failures=2, base_ejection=10.0)
        bad = balancer.endpoints[0]
        fail(balancer, bad, 2)

        clock.advance(10.0)
        fail(balancer, bad)  # no pick() in between

        assert 1 == bad.consecutive_failures
        assert not bad.is_ejected(clock())


class TestUpdate:
    """Membership changes from discovery."""

    def test_keeps_stats_and_pool_of_endpoints_that_stay(self) -> None:
        """An endpoint present before and after keeps its stats object and pool."""
        balancer = make(2)
        kept = balancer.endpoints[1]
        kept.pool = pool = object()
        balancer.begin(kept)

        balancer.update([ep(1), ep(2)])

        assert kept is balancer.endpoints[0]
        assert pool is kept.pool
        assert 1 == kept.outstanding

    def test_same_host_and_port_is_the_same_endpoint(self) -> None:
        """Changed metadata does not make a new endpoint; the stats pick it up."""
        balancer = make(1)
        stats = balancer.endpoints[0]
        renewed = Endpoint(ep(0).host, ep(0).port, meta=(("zone", "b"),))

        balancer.update([renewed])

        assert stats is balancer.endpoints[0]
        assert renewed.meta == stats.endpoint.meta

    def test_new_endpoints_get_fresh_stats(self) -> None:
        """An endpoint seen for the first time starts in rotation at the default RTT."""
        balancer = make(1)

        balancer.update([ep(0), ep(9)])
        fresh = by_address(balancer)[ep(9).address]

        assert (0, DEFAULT_RTT, 0, 0.0) == (
            fresh.outstanding,
            fresh.ewma,
            fresh.consecutive_failures,
            fresh.ejected_until,
        )

    def test_removed_endpoints_go_to_on_remove(self) -> None:
        """Dropped endpoints are handed to on_remove so the proxy can close their pools."""
        removed: list[EndpointStats] = []
        balancer = make(3, on_remove=removed.append)
        gone = balancer.endpoints[0]

        balancer.update([ep(1), ep(2)])

        assert [gone] == removed
        assert gone not in balancer.endpoints

    def test_late_end_on_a_removed_endpoint_is_harmless(self) -> None:
        """A request finishing after its endpoint vanished neither fails nor ejects."""
        balancer = make(3, consecutive_failures=1, max_ejection_percent=100)
        gone = balancer.endpoints[0]
        start = balancer.begin(gone)
        balancer.update([ep(1), ep(2)])

        balancer.end(gone, start, ok=False)

        assert (0, 0, 0.0) == (gone.outstanding, gone.ejections, gone.ejected_until)
        assert (2, 0) == balancer.counts()

    def test_shrinking_returns_excess_ejected_endpoints(self) -> None:
        """After an update the ejected share again respects max_ejection_percent."""
        clock = FakeClock()
        balancer = make(4, clock, consecutive_failures=1, max_ejection_percent=50)
        first, second = balancer.endpoints[0], balancer.endpoints[1]
        fail(balancer, first)
        clock.advance(1.0)
        fail(balancer, second)

        balancer.update([ep(0), ep(1)])  # allowed: floor(2 x 50%) = 1

        assert (1, 1) == balancer.counts()
        assert not first.is_ejected(clock())  # the one due back soonest returned
        assert second.is_ejected(clock())

    def test_duplicates_are_ignored(self) -> None:
        """The same endpoint listed twice is one endpoint."""
        balancer = make(0)

        balancer.update([ep(1), ep(1), ep(2)])

        assert [ep(1), ep(2)] == [s.endpoint for s in balancer.endpoints]


class TestPeakEwma:
    """Peak-EWMA latency estimates and their effect on choice."""

    def test_slow_sample_replaces_the_estimate(self) -> None:
        """A response slower than the estimate becomes the estimate at once (peak)."""
        clock = FakeClock()
        balancer = make(1, clock, policy="peak_ewma")
        stats = balancer.endpoints[0]

        start = balancer.begin(stats)
        clock.advance(0.5)
        balancer.end(stats, start, ok=True)

        assert 0.5 == stats.ewma

    def test_faster_samples_decay_the_estimate(self) -> None:
        """A faster response blends in with weight 1 - exp(-elapsed / 10 s)."""
        clock = FakeClock()
        balancer = make(1, clock, policy="peak_ewma")
        stats = balancer.endpoints[0]
        start = balancer.begin(stats)
        clock.advance(1.0)
        balancer.end(stats, start, ok=True)

        clock.advance(9.99)
        start = balancer.begin(stats)
        clock.advance(0.01)
        balancer.end(stats, start, ok=True)

        w = math.exp(-10.0 / DECAY)
        assert pytest.approx(1.0 * w + 0.01 * (1 - w)) == stats.ewma

    def test_slow_endpoint_is_avoided_then_tried_again(self) -> None:
        """After a slow response the endpoint loses every pick; once its estimate
        aged (no fresh samples), it is chosen again."""
        clock = FakeClock()
        balancer = make(2, clock, policy="peak_ewma")
        slow, fast = balancer.endpoints
        start = balancer.begin(slow)
        clock.advance(2.0)
        balancer.end(slow, start, ok=True)
        balancer.end(fast, balancer.begin(fast), ok=True)  # fast: fresh sample, 30 ms

        avoided = {balancer.pick() for _ in range(200)}
        clock.advance(60.0)  # slow has aged to 2 s x e^-6 = 5 ms
        start = balancer.begin(fast)
        clock.advance(0.03)
        balancer.end(fast, start, ok=True)  # fast is fresh at 30 ms
        again = {balancer.pick() for _ in range(200)}

        assert {fast} == avoided
        assert slow in again

    def test_cost_counts_requests_in_flight(self) -> None:
        """A fast endpoint with many requests in flight costs more than a slower idle one."""
        clock = FakeClock()
        balancer = make(2, clock, policy="peak_ewma")
        busy, idle = balancer.endpoints
        start = balancer.begin(idle)
        clock.advance(0.05)
        balancer.end(idle, start, ok=True)  # idle: 50 ms
        for _ in range(5):
            balancer.begin(busy)  # busy: 30 ms x 6

        assert {idle} == {balancer.pick() for _ in range(100)}


class TestInspection:
    """counts(), snapshot() and repr for metrics and /v1/status."""

    def test_snapshot_reports_each_endpoint(self) -> None:
        """The status view shows load, latency and ejection state per endpoint."""
        clock = FakeClock()
        balancer = make(2, clock, consecutive_failures=1, base_ejection=30.0)
        fail(balancer, balancer.endpoints[0])
        clock.advance(10.0)

        snapshot = balancer.snapshot()

        assert {
            "address": "10.0.0.0:8080",
            "outstanding": 0,
            "ewma_ms": 30.0,
            "consecutive_failures": 1,
            "ejected": True,
            "ejected_for_s": 20.0,
            "ejections": 1,
            "ejection_multiplier": 1,
        } == snapshot[0]
        assert False is snapshot[1]["ejected"]
        assert 0.0 == snapshot[1]["ejected_for_s"]

    def test_repr_shows_name_policy_and_counts(self) -> None:
        """repr names the upstream, the policy and the healthy/ejected split."""
        balancer = make(3, policy="peak_ewma")

        assert "Balancer('billing', policy=peak_ewma, healthy=3, ejected=0)" == repr(balancer)


# -- property-based ------------------------------------------------------------------

POOL = [ep(i) for i in range(6)]

operation = st.one_of(
    st.tuples(st.just("pick"), st.booleans()),
    st.tuples(st.just("end"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("update"), st.lists(st.sampled_from(POOL), max_size=6)),
    st.tuples(st.just("advance"), st.floats(0.0, 120.0)),
)


class TestInvariants:
    """Whatever happens, the balancer's bookkeeping stays sound."""

    @settings(max_examples=300, deadline=None)
    @given(
        ops=st.lists(operation, max_size=80),
        threshold=st.integers(1, 3),
        percent=st.sampled_from([0, 10, 34, 50, 100]),
        policy=st.sampled_from(["least_request", "peak_ewma"]),
    )
    def test_invariants_hold_for_any_operation_sequence(
        self,
        ops: list[tuple[object, ...]],
        threshold: int,
        percent: int,
        policy: str,
    ) -> None:
        """outstanding >= 0, ejected <= floor(len x percent / 100), and pick never
        returns an ejected or removed endpoint."""
        clock = FakeClock()
        removed: set[int] = set()
        balancer = Balancer(
            "prop",
            policy=policy,
            consecutive_failures=threshold,
            base_ejection=5.0,
            max_ejection=60.0,
            max_ejection_percent=percent,
            clock=clock,
            rng=random.Random(0),
            on_remove=lambda s: removed.add(id(s)),
        )
        balancer.update(POOL[:4])
        seen: list[EndpointStats] = list(balancer.endpoints)
        in_flight: list[tuple[EndpointStats, float]] = []
        last: EndpointStats | None = None

        for op in ops:
            if op[0] == "pick":
                picked = balancer.pick(last if op[1] else None)
                if picked is not None:
                    assert picked in balancer.endpoints
                    assert id(picked) not in removed
                    assert not picked.is_ejected(clock())
                    in_flight.append((picked, balancer.begin(picked)))
                    last = picked
            elif op[0] == "end" and in_flight:
                stats, start = in_flight.pop(int(op[1]) % len(in_flight))  # type: ignore[call-overload]
                balancer.end(stats, start, ok=bool(op[2]))
            elif op[0] == "update":
                balancer.update(op[1])  # type: ignore[arg-type]
                removed -= {id(s) for s in balancer.endpoints}
                seen.extend(balancer.endpoints)
            elif op[0] == "advance":
                clock.advance(op[1])  # type: ignore[arg-type]

            healthy, ejected = balancer.counts()
            assert all(s.outstanding >= 0 for s in seen)
            assert ejected <= len(balancer.endpoints) * percent // 100
            assert len(balancer.endpoints) == healthy + ejected
            assert ejected == sum(s.is_ejected(clock()) for s in balancer.endpoints)
