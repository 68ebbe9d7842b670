"""Limits on the app's connections: idle and head timeouts, head size, pipelined bad requests,
the size of an upstream's response head, and the open-file limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    ResponseCounter,
    Sidecar,
    billing_sidecar,
    connect_reader,
    eventually,
    eventually_equal,
    metric_samples,
    proc_number,
    raw_responses,
    raw_until_close,
    raw_upstream,
    running_sidecar,
)

GET = b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: sidecar\r\n\r\n"


async def _closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything read until the sidecar closes the connection (fails after `timeout`)."""
    return await asyncio.wait_for(reader.read(), timeout)


@contextlib.asynccontextmanager
async def _connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _error(answer: bytes) -> tuple[bytes, dict[str, str]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)["error"]


class TestTimeouts:
    async def test_idle_keep_alive_connection_is_closed_after_idle_timeout(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A kept-alive connection with no request in flight closes after idle_timeout."""
        billing = await upstreams("billing")
        async with (
            _sidecar_with(tmp_path, billing.endpoint, idle_timeout="400ms") as port,
            _connection(port) as (reader, writer),
        ):
            # The sidecar's idle clock starts when its answer is written, so after this:
            # the close can never come sooner, however late this process is scheduled.
            began = time.monotonic()
            writer.write(GET)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            rest = await _closed_within(reader, 5)
            waited = time.monotonic() - began
        assert b"" == rest
        assert waited >= 0.4

    async def test_request_slower_than_idle_timeout_is_not_cut(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """idle_timeout only applies between requests: a 1.2 s answer still arrives whole."""
        billing = await upstreams("billing")
        async with _sidecar_with(tmp_path, billing.endpoint, idle_timeout="300ms") as port:
            answers = await raw_responses(
                port, b"GET /v1/invoke/billing/slow?delay=1.2 HTTP/1.1\r\nHost: sidecar\r\n\r\n"
            )
        assert answers[0][0].startswith(b"HTTP/1.1 200")

    async def test_slow_request_head_gets_400_after_header_timeout(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A head that stops half-way is answered 400 BAD_REQUEST naming header_timeout:
        alone on a connection, or in the same write as a whole request before it (whose
        answer comes first); and again on the next connection."""
        billing = await upstreams("billing")
        partial = b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: side"
        answers = []
        async with _sidecar_with(tmp_path, billing.endpoint, header_timeout="500ms") as port:
            for sent in (partial, GET + partial, partial):
                async with _connection(port) as (reader, writer):
                    writer.write(sent)
                    answers.append(await _closed_within(reader, 5))
        first_answer, _, rest = answers[1].partition(b"}")  # echo's JSON body ends first
        assert first_answer.startswith(b"HTTP/1.1 200")
        for answer in (answers[0], rest, answers[2]):
            head, error = _error(answer)
            assert head.startswith(b"HTTP/1.1 400")
            assert "BAD_REQUEST" == error["code"]
            assert "header_timeout (0.5s)" in error["message"]
        assert 1 == billing.hits


class TestPausedReading:
    async def test_big_body_sent_while_connecting_does_not_stall_the_connection(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A 400 KiB body buffered while the first upstream connection is made: once it
        is answered, the next request on the same connection is read and answered."""
        billing = await upstreams("billing")
        size = 400 * 1024
        post = (
            b"POST /v1/invoke/billing/upload HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n\r\n"
            % size
        )
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            _connection(sc.app_port) as (reader, writer),
        ):
            statuses = []
            for request in (post + b"x" * size, GET):
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                statuses.append(head.split(b" ")[1])
        assert [b"200", b"200"] == statuses

    async def test_app_that_stops_reading_stops_the_next_response_too(self, tmp_path: Path) -> None:
        """Back-pressure from an app that stopped reading holds for the next response on
        the connection: a pipelined 200 MB answer is not buffered in the sidecar. And it
        is held only after its head arrived, so the app's slowness is not taken for the
        upstream timing out (per_try_timeout 1s, app away for 2 s)."""
        big = 200 * 1024 * 1024
        first_size = 8_000_000

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/first " in head:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % first_size)
                    writer.write(b"a" * first_size)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
                    chunk = b"b" * (1 << 20)
                    for _ in range(big >> 20):
                        writer.write(chunk)
                        await writer.drain()
                await writer.drain()

        async with (
            raw_upstream(serve) as endpoint,
            running_sidecar(
                tmp_path,
                {
                    "billing": {
                        "endpoints": [endpoint],
                        "timeout": "60s",
                        "per_try_timeout": "1s",
                        "retries": {"max": 0},
                    }
                },
            ) as sc,
        ):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_connect(sock, ("127.0.0.1", sc.app_port))
                await loop.sock_sendall(
                    sock,
                    b"GET /v1/invoke/billing/first HTTP/1.1\r\n\r\n"
                    b"GET /v1/invoke/billing/second HTTP/1.1\r\n\r\n",
                )
                before = sc.rss_kib() // 1024
                # Read the first answer slowly, so the sidecar's buffer toward the app is
                # full when it ends; then stop reading.
                want = len(b"HTTP/1.1 200 OK\r\nContent-Length: 8000000\r\n\r\n") + first_size
                got = 0
                while got < want:
                    got += len(await loop.sock_recv(sock, min(16384, want - got)))
                    await asyncio.sleep(0.001)
                await asyncio.sleep(2.0)
                growth = sc.rss_kib() // 1024 - before
                second = await asyncio.wait_for(loop.sock_recv(sock, 64), 5)
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{sc.admin}/v1/status") as resp,
                ):
                    endpoint_stats = (await resp.json())["upstreams"]["billing"]["endpoints"][0]
            finally:
                sock.close()
        assert growth < 64, f"sidecar RSS grew {growth} MiB while the app was not reading"
        assert second.startswith(b"HTTP/1.1 200"), second
        assert 0 == endpoint_stats["consecutive_failures"]


def _tcp_socket(local_port: int, peer_port: int) -> tuple[str, bool] | None:
    """The sidecar's end of a loopback connection (/proc/net/tcp): its state, by the
    kernel's hex code ("04" FIN_WAIT1, "05" FIN_WAIT2 ...), and whether a process still
    holds it (a closed socket the kernel still finishes has inode 0); None once gone."""
    want = (f"0100007F:{local_port:04X}", f"0100007F:{peer_port:04X}")
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == want:
            return fields[3], fields[9] != "0"
    return None


def _tcp_state(local_port: int, peer_port: int) -> str | None:
    found = _tcp_socket(local_port, peer_port)
    return None if found is None else found[0]


class TestPipelineBackPressure:
    @pytest.mark.parametrize("target", ["/v1/invoke/nosuch/x", "/v1/invoke/billing/echo"])
    async def test_app_that_pipelines_without_reading_is_not_read_further(
        self, tmp_path: Path, upstreams: UpstreamFactory, target: str
    ) -> None:
        """An app pipelines requests and reads none of the answers, to the sidecar's own
        404s or to an upstream. Once the answers fill the sidecar's buffer toward the app,
        it stops serving (and so reading) the app's requests: the app's sends block,
        long before it has sent 64 MB, and the sidecar's memory stays flat. Then the app
        reads: every request it sent is answered, in order, none lost."""
        billing = await upstreams("billing")
        # 2 KB each: the old, unbounded behaviour reaches 64 MB in seconds.
        request = b"GET %s HTTP/1.1\r\nHost: s\r\nX-Pad: %s\r\n\r\n" % (
            target.encode(),
            b"p" * 2000,
        )
        batch = request * 32
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            sock = socket.socket()
            connect_reader(sock, sc.app_port, 65536)
            answers = ResponseCounter()
            try:
                before = sc.rss_kib() // 1024
                sent = 0
                blocked_since = None
                deadline = time.monotonic() + 60
                # Until the sidecar has stopped reading: the app's sends block for 1.5 s.
                while sent < 64 * 2**20 and time.monotonic() < deadline:
                    try:
                        sent += sock.send(batch[sent % len(batch) :])
                        blocked_since = None
                    except BlockingIOError:
                        now = time.monotonic()
                        blocked_since = blocked_since or now
                        if now - blocked_since > 1.5:
                            break
                        await asyncio.sleep(0.01)
                growth = sc.rss_kib() // 1024 - before
                # Complete the last request, then one that closes; read every answer.
                rest = (-sent) % len(request)
                closing = b"GET %s HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n" % (
                    target.encode()
                )
                tail = request[len(request) - rest :] + closing
                loop = asyncio.get_running_loop()
                sender = loop.create_task(loop.sock_sendall(sock, tail))
                while data := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 30):
                    answers.parser.feed_data(data)
                await sender
            finally:
                sock.close()
        assert sent < 64 * 2**20, "the sidecar kept reading requests nobody read answers to"
        assert growth < 64, f"sidecar RSS grew {growth} MiB while the app was not reading"
        assert (-(-sent // len(request)) + 1, 1) == (answers.count, len(answers.statuses))

    async def test_close_answer_is_not_cut_by_what_the_app_sends_after_it(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A request with `Connection: close` and another pipelined behind it get a 2 MB
        answer the app has not read yet when it sends more. Closing the socket with that
        input unread, or with input still arriving, makes the kernel reset the
        connection, destroying the answer in the app's receive buffer: the sidecar
        half-closes instead and drops what comes, so the whole answer arrives."""
        billing = await upstreams("billing")
        size = 2_000_000
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            sock = socket.socket()
            connect_reader(sock, sc.app_port, 4096)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_sendall(
                    sock,
                    b"GET /v1/invoke/billing/download?size=%d HTTP/1.1\r\nHost: s\r\n"
                    b"Connection: close\r\n\r\n%s" % (size, GET),
                )
                peer = sock.getsockname()[1]
                # The sidecar has written the whole answer and ended its side.
                await eventually(
                    "the sidecar ended the connection",
                    lambda: _tcp_state(sc.app_port, peer) in ("04", "05"),
                    timeout=15,
                )
                await loop.sock_sendall(sock, GET * 20)
                got = b""
                with contextlib.suppress(ConnectionResetError):
                    while data := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10):
                        got += data
            finally:
                sock.close()
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), got[:200]
        assert size == len(body)

    async def test_close_the_app_asked_for_is_plain_when_nothing_follows(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An app that asks to close sends nothing more (RFC 9112 §9.6): with nothing
        unread, the sidecar closes at once instead of waiting for the app's close, as
        nginx does: by the time the app sees the end of the answer, the sidecar no
        longer holds its socket."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
            try:
                writer.write(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
                answer = await asyncio.wait_for(reader.read(), 5)
                peer = writer.get_extra_info("sockname")[1]
                # The app has read the end of the stream: a plain close had closed the
                # socket to send it. A lingering close holds its half-closed socket
                # until the app closes or 2 s pass.
                found = _tcp_socket(sc.app_port, peer)
            finally:
                writer.close()
                await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 200")
        assert found is None or not found[1], found


class TestAppLeaves:
    async def test_app_that_leaves_cancels_the_attempt_and_is_not_counted(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An app whose client gives up (closes) mid-request: the attempt ends at once,
        in-flight drops to 0, and the request counts as neither success nor failure."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            aiohttp.ClientSession() as session,
        ):
            async with _connection(sc.app_port) as (_, writer):
                writer.write(
                    b"GET /v1/invoke/billing/slow?delay=5 HTTP/1.1\r\nHost: sidecar\r\n\r\n"
                )
                while billing.hits == 0:
                    await asyncio.sleep(0.01)
            began = time.monotonic()
            while True:
                async with session.get(f"{sc.admin}/v1/status") as resp:
                    status = await resp.json()
                if status["upstreams"]["billing"]["in_flight"] == 0:
                    break
                assert time.monotonic() - began < 2.0, status
                await asyncio.sleep(0.02)
            async with session.get(f"{sc.admin}/metrics") as resp:
                metrics = await resp.text()
        assert "sidecar_upstream_requests_total{" not in metrics
        assert 'sidecar_circuit_state{upstream="billing"} 0.0' in metrics
        endpoint = status["upstreams"]["billing"]["endpoints"][0]
        assert (0, 0) == (endpoint["outstanding"], endpoint["consecutive_failures"])


class TestHeadSize:
    async def test_request_head_above_max_header_bytes_is_400(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A 20 KiB header against a 16 KiB limit: 400, and nothing reaches the upstream."""
        billing = await upstreams("billing")
        big = b"GET /v1/invoke/billing/echo HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        async with _sidecar_with(tmp_path, billing.endpoint, max_header_bytes="16KiB") as port:
            answer = await raw_until_close(port, big)
        head, error = _error(answer)
        assert head.startswith(b"HTTP/1.1 400")
        assert "max_header_bytes (16384 bytes)" in error["message"]
        assert 0 == billing.hits

    async def test_endless_header_is_cut_off_without_reading_it_all(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A header that never ends gets its 400 long before the app stops sending."""
        billing = await upstreams("billing")
        async with (
            _sidecar_with(tmp_path, billing.endpoint, max_header_bytes="16KiB") as port,
            _connection(port) as (reader, writer),
        ):
            # A small send buffer, so what the kernel holds for this socket cannot
            # approach the bound asserted below on any host.
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            sent = 0

            async def send_endlessly() -> None:
                nonlocal sent
                writer.write(b"GET /v1/invoke/billing/echo HTTP/1.1\r\nX-Endless: ")
                with contextlib.suppress(ConnectionError):
                    while sent < 64 * 1024 * 1024:
                        writer.write(b"b" * 65536)
                        sent += 65536
                        await writer.drain()
                        await asyncio.sleep(0)  # let the reader see an answer

            sender = asyncio.create_task(send_endlessly())
            try:
                status_line = await asyncio.wait_for(reader.readline(), 10)
                sent_when_answered = sent
                answer = status_line + await _closed_within(reader, 10)
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        assert answer.startswith(b"HTTP/1.1 400")
        assert b"max_header_bytes" in answer
        # Answered after the limit plus what socket buffers hold, not after 64 MiB.
        assert sent_when_answered < 16 * 1024 * 1024

    async def test_request_head_within_limit_is_served(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Just below the limit, the request goes through with its header intact."""
        billing = await upstreams("billing")
        value = b"c" * 7_000
        request = (
            b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: s\r\nX-Big: " + value + b"\r\n\r\n"
        )
        async with _sidecar_with(tmp_path, billing.endpoint, max_header_bytes="16KiB") as port:
            ((head, body),) = await raw_responses(port, request)
        assert head.startswith(b"HTTP/1.1 200")
        assert ["X-Big", value.decode()] in json.loads(body)["headers"]


class TestPipelinedBadRequest:
    async def test_bad_request_after_a_good_one_gets_400_after_its_answer(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Pipelined: a good request, then garbage, or a request whose chunked body is
        broken. The good one is answered, then the 400; the bad one reaches nobody."""
        billing = await upstreams("billing")
        slow = b"GET /v1/invoke/billing/slow?delay=0.3 HTTP/1.1\r\nHost: s\r\n\r\n"
        broken_chunk = (
            b"PUT /v1/invoke/billing/upload HTTP/1.1\r\nHost: s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nZZ\r\n"
        )
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answers = [
                await raw_until_close(sc.app_port, slow + bad)
                for bad in (b"GARBAGE\r\n\r\n", broken_chunk)
            ]
        for answer in answers:
            first, _, rest = answer.partition(b"\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 200")
            assert b"HTTP/1.1 400 Bad Request" in rest
            assert b"malformed HTTP request" in rest
        assert 2 == billing.hits


class TestHttp10:
    async def test_sidecar_answers_keep_an_http10_keep_alive_connection_explicitly(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An HTTP/1.0 client that asked for keep-alive: a sidecar-made 404 says
        `connection: keep-alive`, and the next request on the connection is served."""
        billing = await upstreams("billing")
        keep = b"Connection: keep-alive\r\n\r\n"
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answers = await raw_responses(
                sc.app_port,
                b"GET /v1/invoke/nope/x HTTP/1.0\r\n"
                + keep
                + b"GET /v1/invoke/billing/echo HTTP/1.0\r\n"
                + keep,
                count=2,
            )
        (not_found, _), (echoed, _) = answers
        assert not_found.startswith(b"HTTP/1.1 404")
        assert b"connection: keep-alive" in not_found.lower()
        assert echoed.startswith(b"HTTP/1.1 200")

    async def test_proxy_connection_keep_alive_is_read_as_connection_and_stays_http10(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`Proxy-Connection: keep-alive` (old HTTP/1.0 clients behind a proxy send it;
        llhttp reads it as Connection): the request is still HTTP/1.0, so a chunked
        upstream body comes close-delimited, never chunked, which a 1.0 client cannot
        read; and an HTTP/2.0 request sent that way is still refused."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            http10 = await raw_until_close(
                sc.app_port,
                b"GET /v1/invoke/billing/chunked HTTP/1.0\r\nHost: x\r\n"
                b"Proxy-Connection: keep-alive\r\n\r\n",
            )
            http20 = await raw_until_close(
                sc.app_port,
                b"GET /v1/invoke/billing/echo HTTP/2.0\r\nProxy-Connection: keep-alive\r\n\r\n",
            )
        head, _, body = http10.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()
        assert b"part0\npart1\npart2\n" == body
        assert http20.startswith(b"HTTP/1.1 400"), http20
        assert b"HTTP/2.0 is not supported" in http20

    async def test_expect_100_continue_is_ignored_in_http10(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """RFC 9110 §10.1.1: no `100 Continue` for a 1.0 client, which would take it for
        the answer; the real answer comes once the body is sent."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            _connection(sc.app_port) as (reader, writer),
        ):
            writer.write(
                b"POST /v1/invoke/billing/echo HTTP/1.0\r\nExpect: 100-continue\r\n"
                b"Content-Length: 3\r\n\r\n"
            )
            with contextlib.suppress(TimeoutError):
                early = await asyncio.wait_for(reader.read(100), 0.5)
                raise AssertionError(f"answered before the body was sent: {early!r}")
            writer.write(b"abc")
            answer = await _closed_within(reader, 5)
        assert answer.startswith(b"HTTP/1.1 200")
        assert b'"body": "abc"' in answer


class TestUpstreamResponseHead:
    async def test_endless_response_head_is_a_failed_attempt(self, tmp_path: Path) -> None:
        """An upstream whose header never ends: 502, not unbounded memory."""

        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            while True:  # until the sidecar drops the connection (ConnectionError)
                writer.write(b"z" * 65536)
                await writer.drain()

        async with (
            raw_upstream(endless) as endpoint,
            billing_sidecar(tmp_path, endpoint, retries={"max": 0}) as sc,
        ):
            ((head, body),) = await raw_responses(sc.app_port, GET)
        assert head.startswith(b"HTTP/1.1 502")
        assert "UPSTREAM_CONNECT_FAILED" == json.loads(body)["error"]["code"]


@contextlib.asynccontextmanager
async def _sidecar_with(tmp: Path, endpoint: str, **limits: object) -> AsyncIterator[int]:
    """A billing sidecar with these `app_connections` limits; yields its app port."""
    async with running_sidecar(
        tmp, {"billing": {"endpoints": [endpoint]}}, app_connections=limits
    ) as sc:
        yield sc.app_port


@contextlib.asynccontextmanager
async def _limited_sidecar(
    tmp_path: Path, upstream: str | list[str], nofile: str
) -> AsyncIterator[Sidecar]:
    """A sidecar started under `prlimit --nofile=SOFT:HARD`."""
    endpoints = [upstream] if isinstance(upstream, str) else upstream
    sidecar = Sidecar(tmp_path, {"billing": {"endpoints": endpoints}})
    sidecar.command = ["prlimit", f"--nofile={nofile}", *sidecar.command]
    sidecar.start()
    try:
        await sidecar.wait_ready()
        yield sidecar
    finally:
        sidecar.kill()


def _accept_queue(port: int) -> int:
    """Connections waiting in the kernel for the listener on 127.0.0.1:`port` to accept
    them (a listening socket's rx_queue in /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # LISTEN
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class TestOpenFileLimit:
    async def test_a_low_soft_limit_is_raised_and_every_app_connection_is_served(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Started with a soft open-file limit of 256 under a hard 4096 (a container
        runtime's usual 1024 under 524288, scaled down), the sidecar raises its soft limit
        to 4096, says so, and 400 app connections open at once all get their answer; at
        256, libuv would accept and at once close every one past the limit, unlogged."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard < 4096:  # prlimit cannot give the sidecar more than this process has
            pytest.skip(f"needs a hard open-file limit of 4096 here, not {hard}")
        if soft < 2048:  # this test's own 800 sockets
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        billing = await upstreams("billing")
        request = GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        async with _limited_sidecar(tmp_path, billing.endpoint, "256:4096") as sidecar:
            assert sidecar.proc is not None
            assert 4096 == proc_number(sidecar.proc.pid, "limits", "Max open files", 3)
            started = [e for e in sidecar.log_events() if e.get("event") == "started"]
            assert 4096 == started[0]["open_files"]
            assert not [e for e in sidecar.log_events() if e.get("event") == "open_file_limit_low"]
            connections = [
                await asyncio.open_connection("127.0.0.1", sidecar.app_port) for _ in range(400)
            ]
            try:
                await eventually(
                    "the sidecar accepted them all", lambda: 0 == _accept_queue(sidecar.app_port)
                )
                samples = await metric_samples(sidecar)
                assert (400, 4096) == (
                    samples["sidecar_app_connections"],
                    samples["sidecar_open_files_limit"],
                )
                for _, writer in connections:
                    writer.write(request)

                async def answer(reader: asyncio.StreamReader) -> bytes:
                    return (await _closed_within(reader, 15)).split(b"\r\n", 1)[0]

                answers = await asyncio.gather(*(answer(reader) for reader, _ in connections))
            finally:
                for _, writer in connections:
                    writer.close()
            assert [b"HTTP/1.1 200 OK"] * 400 == answers

            async def app_connections() -> float:
                return (await metric_samples(sidecar))["sidecar_app_connections"]

            await eventually_equal("sidecar_app_connections", 0, app_connections)

    async def test_a_low_hard_limit_is_a_warning_naming_the_fix(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A hard limit of 256 cannot be raised: the start warns with the limit and what
        to change, and the sidecar still serves."""
        billing = await upstreams("billing")
        async with _limited_sidecar(tmp_path, billing.endpoint, "256:256") as sidecar:
            warned = [e for e in sidecar.log_events() if e.get("event") == "open_file_limit_low"]
            assert 1 == len(warned), sidecar.logs()
            assert (256, 256) == (warned[0]["limit"], warned[0]["raised_from"])
            assert "RLIMIT_NOFILE" in warned[0]["fix"]
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{sidecar.url}/v1/invoke/billing/echo") as resp,
            ):
                assert 200 == resp.status

    async def test_running_out_is_overloaded_and_blames_no_upstream(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """With every descriptor taken, a request that needs a new upstream connection
        gets 503 OVERLOADED naming the cause, and counts against neither endpoint nor
        breaker: once descriptors are free again the next request is served, with the
        circuit closed and no endpoint ejected (a 502 counted as the endpoints' failures
        ejected both and opened the circuit for `open_for`)."""
        first, second = await upstreams("one"), await upstreams("two")
        slow = b"GET /v1/invoke/billing/slow?delay=1 HTTP/1.1\r\nHost: sidecar\r\n\r\n"
        endpoints = [first.endpoint, second.endpoint]
        async with _limited_sidecar(tmp_path, endpoints, "128:128") as sidecar:
            assert sidecar.proc is not None
            pid = sidecar.proc.pid
            taken = _open_fds(pid)
            # Connections the sidecar accepts while it has descriptors; their slow
            # requests then need one more each, and the last ones find none.
            connections = [
                await asyncio.open_connection("127.0.0.1", sidecar.app_port)
                for _ in range(128 - taken - 16)
            ]
            errors = []
            try:
                # All accepted before any request starts taking descriptors for upstreams.
                await eventually(
                    "the sidecar accepted them all", lambda: 0 == _accept_queue(sidecar.app_port)
                )
                for _, writer in connections:
                    writer.write(slow)
                heads = await asyncio.gather(
                    *(asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 15) for r, _ in connections)
                )
                for (reader, _), head in zip(connections, heads, strict=True):
                    if not head.startswith(b"HTTP/1.1 200"):
                        length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n")[0])
                        errors.append(json.loads(await reader.readexactly(length))["error"])
            finally:
                for _, writer in connections:
                    writer.close()
            assert errors, "no request ran out of descriptors"
            assert {"OVERLOADED"} == {e["code"] for e in errors}
            assert "Too many open files" in errors[0]["message"]
            await eventually(
                "the sidecar closed the app's connections", lambda: _open_fds(pid) < 128 - 16
            )
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{sidecar.url}/v1/invoke/billing/echo") as resp:
                    assert 200 == resp.status
                async with session.get(f"{sidecar.admin}/v1/status") as resp:
                    billing = (await resp.json())["upstreams"]["billing"]
            assert "closed" == billing["circuit"], billing
            assert not [e for e in billing["endpoints"] if e.get("ejected")], billing
            assert not [e for e in sidecar.log_events() if e.get("event") == "endpoint_ejected"]
