"""One upstream connection's response framing, and the per-endpoint pool of idle
connections: LIFO reuse (across passes of the event loop), idle expiry, closing."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator

import pytest

from sidecar.discovery.base import Endpoint
from sidecar.proxy import forward
from sidecar.proxy.forward import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    FRAMING_NONE,
    POOL_IDLE_TIMEOUT,
    EndpointPool,
    UpstreamConnection,
)


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

    def test_closed_pool_closes_connections_that_come_back(self, clock: FakeTime) -> None:
        """An endpoint dropped by discovery: its busy connections are closed on return."""
        pool, (idle,) = pool_with(clock, 1.0)
        pool.close()
        busy = UpstreamConnection(pool)
        pool.put(busy)
        assert idle.closed
        assert busy.closed
        assert [] == pool.idle


@pytest.fixture
async def live_pool() -> AsyncIterator[tuple[EndpointPool, list[UpstreamConnection]]]:
    """A pool of an endpoint that holds every connection open, and three connections
    of it (not put in yet); all closed afterwards."""

    held: list[asyncio.Task[None]] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        held.append(task)
        await reader.read()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    pool = EndpointPool(Endpoint("127.0.0.1", server.sockets[0].getsockname()[1]))
    conns = [await pool.connect() for _ in range(3)]
    yield pool, conns
    pool.close()
    for conn in conns:
        conn.abort()
    async with asyncio.timeout(5):  # the server's side of each connection closed, too
        while len(held) < len(conns):
            await next_pass()
        await asyncio.gather(*held)
    server.close()
    await server.wait_closed()


async def next_pass() -> None:
    """Let the event loop come round once (what a pool's `call_soon` waits for)."""
    await asyncio.sleep(0)


LivePool = tuple[EndpointPool, list[UpstreamConnection]]


class TestPoolWithinOneLoopPass:
    """A connection put back during the loop's current pass is taken only when no
    other is idle: its socket still sits near the front of epoll's ready list, so
    a response on it would overtake the responses to requests sent before it."""

    async def test_one_put_back_before_this_pass_is_taken_first(self, live_pool: LivePool) -> None:
        pool, (earlier, now, _) = live_pool
        pool.put(earlier)
        await next_pass()
        pool.put(now)
        assert [earlier, now] == pool.idle
        assert earlier is pool.take()
        assert now is pool.take()  # then this pass's, rather than a new connection
        assert pool.take() is None

    async def test_once_the_loop_comes_round_the_newest_is_taken_first(
        self, live_pool: LivePool
    ) -> None:
        pool, (older, newer, _) = live_pool
        pool.put(older)
        pool.put(newer)
        await next_pass()
        assert newer is pool.take()
        assert older is pool.take()

    async def test_a_settled_connection_that_closes_leaves_the_pool(
        self, live_pool: LivePool
    ) -> None:
        pool, (lost, kept, _) = live_pool
        pool.put(lost)
        pool.put(kept)
        await next_pass()
        lost.abort()
        while lost in pool.idle:  # connection_lost, a pass or two later
            await next_pass()
        assert 1 == pool.settled
        assert kept is pool.take()
        assert pool.take() is None

    async def test_a_stale_settled_connection_spares_those_of_this_pass(
        self, live_pool: LivePool, clock: FakeTime
    ) -> None:
        pool, (oldest, stale, fresh) = live_pool
        start = clock.now
        pool.put(oldest)
        clock.now = start + 1.0
        pool.put(stale)
        await next_pass()
        clock.now = start + 60.0
        pool.put(fresh)
        clock.now = start + POOL_IDLE_TIMEOUT + 2.0  # the two settled ones aged out
        assert fresh is pool.take()
        assert oldest.closed
        assert stale.closed
        assert [] == pool.idle
        assert 0 == pool.settled


def framing(headers: list[tuple[bytes, bytes]], status: int = 200, head: bool = False) -> int:
    conn = UpstreamConnection(EndpointPool(Endpoint("10.0.0.1", 8080)))
    conn._headers = headers
    conn._head_only = head
    return conn._framing(status)


class TestResponseFraming:
    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            ([(b"Content-Length", b"5")], FRAMING_LENGTH),
            ([(b"Transfer-Encoding", b"chunked")], FRAMING_CHUNKED),
            ([(b"Transfer-Encoding", b"gzip, Chunked")], FRAMING_CHUNKED),
            # RFC 9112 6.3: chunked not last means the body runs until the close.
            ([(b"Transfer-Encoding", b"chunked, gzip")], FRAMING_CLOSE),
            # Transfer-Encoding wins over Content-Length, in either order.
            ([(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], FRAMING_CHUNKED),
            ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")], FRAMING_CHUNKED),
            ([], FRAMING_CLOSE),
        ],
    )
    def test_body_delimiting(self, headers: list[tuple[bytes, bytes]], expected: int) -> None:
        assert expected == framing(headers)

    @pytest.mark.parametrize("status", [204, 304])
    def test_no_body_statuses(self, status: int) -> None:
        assert FRAMING_NONE == framing([(b"Content-Length", b"5")], status)

    def test_answer_to_head_has_no_body(self) -> None:
        assert FRAMING_NONE == framing([(b"Content-Length", b"5")], head=True)


class TestKeepReadable:
    """The spare descriptor that keeps a streaming upload's socket readable."""

    def _streaming(self) -> tuple[UpstreamConnection, socket.socket, socket.socket]:
        conn = UpstreamConnection(EndpointPool(Endpoint("127.0.0.1", 8080)))
        ours, theirs = socket.socketpair()

        class Transport:
            def get_extra_info(self, name: str) -> object:
                return ours if name == "socket" else None

        conn.transport = Transport()  # type: ignore[assignment]
        return conn, ours, theirs

    def test_a_spare_descriptor_is_kept(self) -> None:
        conn, ours, theirs = self._streaming()
        try:
            conn.keep_readable()
            assert conn._spare >= 0
            conn._close_spare()
        finally:
            ours.close()
            theirs.close()

    def test_no_descriptor_left_streams_on_without_one(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """At the open-file limit `os.dup` fails: the upload goes on without the spare
        instead of failing the request (which left its upstream connection open)."""

        def no_descriptor(fd: int) -> int:
            raise OSError(errno.EMFILE, "Too many open files")

        conn, ours, theirs = self._streaming()
        monkeypatch.setattr(os, "dup", no_descriptor)
        try:
            conn.keep_readable()
            assert -1 == conn._spare
        finally:
            ours.close()
            theirs.close()
