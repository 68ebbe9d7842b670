"""Writes held until the end of the event loop's pass (`Outbox`): the request heads sent
upstream and the ends of answers leave together once the pass's callbacks are done,
in order, and never after a close, behind a later write or lost to an abort."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.discovery.base import Endpoint
from sidecar.proxy.forward import EndpointPool, Outbox, UpstreamConnection
from sidecar.proxy.server import DownstreamProtocol, Proxy
from sidecar.telemetry.metrics import Metrics

Log = list[tuple[str, str, bytes]]


class FakeTransport:
    """Records what is done to it, in one log shared by every transport of a test."""

    def __init__(self, name: str, log: Log) -> None:
        self.name = name
        self.log = log
        self.closing = False
        self.buffered = 0  # what get_write_buffer_size reports

    def write(self, data: bytes) -> None:
        self.log.append((self.name, "write", data))

    def writelines(self, data: list[bytes]) -> None:
        self.log.append((self.name, "write", b"".join(data)))

    def close(self) -> None:
        self.closing = True
        self.log.append((self.name, "close", b""))

    def abort(self) -> None:
        self.closing = True
        self.log.append((self.name, "abort", b""))

    def write_eof(self) -> None:
        self.log.append((self.name, "eof", b""))

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Sink:
    """A response sink that ignores everything (these tests look at the writes)."""

    def __getattr__(self, name: str) -> object:
        return lambda *args: None


def upstream(
    name: str, log: Log, outbox: Outbox | None
) -> tuple[UpstreamConnection, FakeTransport]:
    conn = UpstreamConnection(EndpointPool(Endpoint("127.0.0.1", 8080)), outbox)
    transport = FakeTransport(name, log)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def downstream(name: str, log: Log) -> tuple[DownstreamProtocol, FakeTransport]:
    down = Proxy({}, Metrics()).protocol(None)
    transport = FakeTransport(name, log)
    down.connection_made(transport)  # type: ignore[arg-type]
    return down, transport


async def next_pass() -> None:
    """Let the loop come round once: the outbox's send runs."""
    await asyncio.sleep(0)


class TestOutbox:
    async def test_the_writes_of_a_pass_leave_together_once_it_ends(self) -> None:
        log: Log = []
        outbox = Outbox(asyncio.get_running_loop())
        a, _ = upstream("a", log, outbox)
        b, _ = upstream("b", log, outbox)

        assert a.start([b"GET /a HTTP/1.1\r\n", b"\r\n"], Sink(), False)  # type: ignore[arg-type]
        assert b.start([b"GET /b HTTP/1.1\r\n\r\n"], Sink(), False)  # type: ignore[arg-type]
        assert [] == log  # nothing before the pass's callbacks are done

        await next_pass()
        assert [
            ("a", "write", b"GET /a HTTP/1.1\r\n\r\n"),  # one write each, in the order held
            ("b", "write", b"GET /b HTTP/1.1\r\n\r\n"),
        ] == log

    async def test_a_sender_that_holds_again_while_sending_goes_in_the_next_round(self) -> None:
        sent: list[str] = []
        outbox = Outbox(asyncio.get_running_loop())

        class Late:
            def send_unsent(self) -> None:
                sent.append("late")

        class Early:
            def send_unsent(self) -> None:
                sent.append("early")
                outbox.add(Late())  # say, from a back-pressure callback of the write

        outbox.add(Early())
        await next_pass()
        assert ["early"] == sent
        await next_pass()
        assert ["early", "late"] == sent

    async def test_a_sender_that_fails_does_not_keep_the_others_waiting(self) -> None:
        sent: list[str] = []
        outbox = Outbox(asyncio.get_running_loop())

        class Broken:
            def send_unsent(self) -> None:
                raise RuntimeError("a bug")

        class Fine:
            def send_unsent(self) -> None:
                sent.append("fine")

        outbox.add(Broken())
        outbox.add(Fine())
        await next_pass()
        assert ["fine"] == sent

    async def test_a_connection_without_an_outbox_makes_its_own(self) -> None:
        log: Log = []
        conn, _ = upstream("a", log, None)
        assert conn.start([b"GET / HTTP/1.1\r\n\r\n"], Sink(), False)  # type: ignore[arg-type]
        assert [] == log
        await next_pass()
        assert [("a", "write", b"GET / HTTP/1.1\r\n\r\n")] == log


class TestUpstreamConnection:
    async def test_a_streamed_body_is_written_at_once_after_the_head_held(self) -> None:
        log: Log = []
        conn, _ = upstream("up", log, Outbox(asyncio.get_running_loop()))
        assert conn.start([b"POST / HTTP/1.1\r\n\r\n"], Sink(), False)  # type: ignore[arg-type]
        conn.write(b"body")
        assert [("up", "write", b"POST / HTTP/1.1\r\n\r\n"), ("up", "write", b"body")] == log
        await next_pass()
        assert 2 == len(log)  # the head went once

    async def test_an_abort_sends_what_is_held_first(self) -> None:
        """As when the head went at once: the abort drops only the transport's buffer."""
        log: Log = []
        conn, _ = upstream("up", log, Outbox(asyncio.get_running_loop()))
        assert conn.start([b"GET / HTTP/1.1\r\n\r\n"], Sink(), False)  # type: ignore[arg-type]
        conn.abort()
        await next_pass()
        assert [("up", "write", b"GET / HTTP/1.1\r\n\r\n"), ("up", "abort", b"")] == log

    async def test_the_upstreams_half_close_sends_what_is_held_first(self) -> None:
        log: Log = []
        conn, _ = upstream("up", log, Outbox(asyncio.get_running_loop()))
        assert conn.start([b"GET / HTTP/1.1\r\n\r\n"], Sink(), False)  # type: ignore[arg-type]
        assert not conn.eof_received()
        assert [("up", "write", b"GET / HTTP/1.1\r\n\r\n")] == log

    async def test_a_lost_connection_sends_nothing(self) -> None:
        log: Log = []
        conn, _ = upstream("up", log, Outbox(asyncio.get_running_loop()))
        assert conn.start([b"GET / HTTP/1.1\r\n\r\n"], Sink(), False)  # type: ignore[arg-type]
        conn.connection_lost(ConnectionResetError())
        await next_pass()
        assert [] == log

    async def test_a_transport_closing_by_the_end_of_the_pass_gets_nothing(self) -> None:
        log: Log = []
        conn, transport = upstream("up", log, Outbox(asyncio.get_running_loop()))
        assert conn.start([b"GET / HTTP/1.1\r\n\r\n"], Sink(), False)  # type: ignore[arg-type]
        transport.closing = True  # the upstream's reset was read later in the same pass
        await next_pass()
        assert [] == log


class TestDownstreamProtocol:
    async def test_an_answer_held_twice_leaves_in_one_write(self) -> None:
        log: Log = []
        down, _ = downstream("app", log)
        down.hold([b"HTTP/1.1 200 OK\r\n", b"Content-Length: 1\r\n\r\n", b"a"])
        down.hold([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"])  # a pipelined answer
        assert [] == log
        await next_pass()
        assert [
            (
                "app",
                "write",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na" * 1
                + b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
            ),
        ] == log

    async def test_a_write_now_goes_after_what_is_held(self) -> None:
        log: Log = []
        down, _ = downstream("app", log)
        down.hold([b"first"])
        down.write(b"second")
        down.writelines([b"third"])
        assert [
            ("app", "write", b"first"),
            ("app", "write", b"second"),
            ("app", "write", b"third"),
        ] == log

    @pytest.mark.parametrize("end", ["close", "abort"])
    async def test_a_close_or_an_abort_sends_what_is_held_first(self, end: str) -> None:
        log: Log = []
        down, _ = downstream("app", log)
        down.hold([b"answer"])
        getattr(down, end)()
        await next_pass()
        assert [("app", "write", b"answer"), ("app", end, b"")] == log

    async def test_held_is_unflushed_and_a_shutdown_closes_after_sending_it(self) -> None:
        """`finish` (a shutdown's last word) closes a connection whose answers are all
        handed to the kernel and cuts one still writing: a held answer is handed over
        first, so it is closed, not cut."""
        log: Log = []
        down, _ = downstream("app", log)
        down.hold([b"answer"])
        assert down.unflushed()
        assert down.ending()
        down.finish()
        assert [("app", "write", b"answer"), ("app", "close", b"")] == log

    async def test_the_apps_half_close_sends_what_is_held_first(self) -> None:
        """The app's FIN read in the pass that held its answer: the loop closes the
        transport right after `eof_received`, and a closed transport drops writes."""
        log: Log = []
        down, _ = downstream("app", log)
        down.hold([b"answer"])
        assert not down.eof_received()
        assert [("app", "write", b"answer")] == log

    async def test_a_lost_connection_sends_nothing(self) -> None:
        log: Log = []
        down, _ = downstream("app", log)
        down.hold([b"answer"])
        down.connection_lost(None)
        await next_pass()
        assert [] == log
        assert not down.unflushed()
