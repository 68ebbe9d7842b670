"""The per-endpoint pool of idle upstream connections: LIFO reuse and idle expiry."""

from __future__ import annotations

import pytest

from sidecar.discovery.base import Endpoint
from sidecar.proxy import forward
from sidecar.proxy.forward import POOL_IDLE_TIMEOUT, EndpointPool, UpstreamConnection


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(forward, "time", fake)
    return fake


def pool_with(clock: FakeTime, *ages: float) -> tuple[EndpointPool, list[UpstreamConnection]]:
    """A pool holding one connection per age (seconds idle now), oldest put first."""
    pool = EndpointPool(Endpoint("10.0.0.1", 8080))
    conns = []
    start = clock.now
    for age in ages:
        clock.now = start - age
        conn = UpstreamConnection(pool)
        pool.put(conn)
        conns.append(conn)
    clock.now = start
    return pool, conns


class TestEndpointPool:
    def test_most_recently_used_is_taken_first(self, clock: FakeTime) -> None:
        pool, (older, newer) = pool_with(clock, 20.0, 5.0)
        assert newer is pool.take()
        assert older is pool.take()
        assert pool.take() is None
        assert newer.reused
        assert older.reused

    def test_closed_connections_are_skipped(self, clock: FakeTime) -> None:
        pool, (older, newer) = pool_with(clock, 20.0, 5.0)
        newer.abort()
        assert older is pool.take()

    def test_connection_idle_too_long_is_closed_not_reused(self, clock: FakeTime) -> None:
        """Past POOL_IDLE_TIMEOUT a connection may be dead without a FIN: a fresh
        connect is cheaper than a request that waits for the per-try timeout."""
        pool, (stale,) = pool_with(clock, POOL_IDLE_TIMEOUT + 1)
        assert pool.take() is None
        assert stale.closed

    def test_a_stale_connection_takes_the_older_ones_with_it(self, clock: FakeTime) -> None:
        pool, (oldest, stale, fresh) = pool_with(
            clock, POOL_IDLE_TIMEOUT + 30, POOL_IDLE_TIMEOUT + 1, 1.0
        )
        assert fresh is pool.take()
        assert pool.take() is None
        assert oldest.closed
        assert stale.closed
        assert [] == pool.idle

    def test_put_drops_connections_that_aged_out(self, clock: FakeTime) -> None:
        pool, (old,) = pool_with(clock, POOL_IDLE_TIMEOUT + 1)
        new = UpstreamConnection(pool)
        pool.put(new)
        assert old.closed
        assert [new] == pool.idle

    def test_pool_is_bounded(self, clock: FakeTime) -> None:
        pool = EndpointPool(Endpoint("10.0.0.1", 8080), max_idle=2)
        conns = [UpstreamConnection(pool) for _ in range(3)]
        for conn in conns:
            pool.put(conn)
        assert conns[:2] == pool.idle
        assert conns[2].closed
