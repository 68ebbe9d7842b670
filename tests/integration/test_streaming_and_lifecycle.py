"""Large bodies stream with bounded memory; SIGTERM drains; the admin API answers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    RawHandler,
    ResponseCounter,
    Sidecar,
    billing_sidecar,
    connect_reader,
    eventually,
    poll_json,
    proc_number,
    raw_responses,
    raw_until_close,
    raw_upstream,
    running_sidecar,
)

SIZE = 64 * 1024 * 1024  # 64 MiB: comfortably above the 50 MiB the issue names
BLOCK = bytes(range(256)) * 256  # 64 KiB, the same pattern the upstream's /download sends


async def _blocks(total: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield BLOCK
        sent += len(BLOCK)


class TestStreaming:
    async def test_large_bodies_stream_both_ways_with_bounded_memory(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """64 MiB up (chunked and with Content-Length) and down arrive intact; the sidecar's
        peak RSS grows by far less than one body."""
        billing = await upstreams("billing")
        expected = hashlib.sha256()
        for _ in range(SIZE // len(BLOCK)):
            expected.update(BLOCK)
        async with (
            running_sidecar(
                tmp_path,
                {
                    "billing": {
                        "endpoints": [billing.endpoint],
                        "timeout": "60s",
                        "per_try_timeout": "60s",
                    }
                },
            ) as sc,
            aiohttp.ClientSession() as session,
        ):
            before = sc.rss_kib("VmHWM")
            async with session.put(
                f"{sc.url}/v1/invoke/billing/upload", data=_blocks(SIZE)
            ) as resp:
                chunked_up = (resp.status, await resp.json())
            async with session.post(
                f"{sc.url}/v1/invoke/billing/upload",
                data=_blocks(SIZE),
                headers={"Content-Length": str(SIZE)},
            ) as resp:
                sized_up = (resp.status, await resp.json())
            down = hashlib.sha256()
            async with session.get(f"{sc.url}/v1/invoke/billing/download?size={SIZE}") as resp:
                down_status = resp.status
                async for chunk in resp.content.iter_chunked(1 << 16):
                    down.update(chunk)
            growth_mib = (sc.rss_kib("VmHWM") - before) / 1024
        want = {"size": SIZE, "sha256": expected.hexdigest()}
        assert (200, want) == chunked_up
        assert (200, want) == sized_up
        assert (200, expected.hexdigest()) == (down_status, down.hexdigest())
        assert growth_mib < 24, f"peak RSS grew {growth_mib:.1f} MiB while streaming"


class TestLifecycle:
    @pytest.mark.parametrize("command", ["python -m sidecar", "sidecar"])
    async def test_sigterm_while_starting_exits_zero_quietly(
        self, tmp_path: Path, command: str
    ) -> None:
        """SIGTERM as soon as it is caught, while the sidecar still imports and loads its
        config: exit 0 and no traceback - as `python -m sidecar` and as the `sidecar`
        console script (the image's entrypoint). (SIGINT cannot be tested this way: the
        interpreter catches it itself from its first moment.)"""
        sig = signal.SIGTERM
        sc = Sidecar(tmp_path, {"billing": {"endpoints": ["127.0.0.1:9"]}})
        if command == "sidecar":
            sc.command = [str(Path(sys.executable).with_name("sidecar"))]
        # A config file nobody writes to: reading it blocks, so the signal surely comes
        # while the sidecar is still starting, however fast or slow the machine.
        os.mkfifo(sc.path)
        sc.start(write_config=False)
        try:
            deadline = time.monotonic() + 10
            while not int(sc.proc_status("SigCgt"), 16) >> (sig - 1) & 1:  # handler installed
                assert time.monotonic() < deadline, "the sidecar never caught the signal"
                await asyncio.sleep(0.001)
            sc.signal(sig)
            code = await sc.wait_exit(10)
        finally:
            sc.kill()
        assert 0 == code, sc.logs()
        assert "Traceback" not in sc.logs()
        assert "started" not in sc.logs()  # it really was stopped while starting

    async def test_sigterm_drains_in_flight_requests_and_exits_zero(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """SIGTERM: /ready turns 503 at once, new calls are served during drain, the in-flight
        request completes, and the process exits 0."""
        billing = await upstreams("billing")
        sc = Sidecar(
            tmp_path,
            {"billing": {"endpoints": [billing.endpoint]}},
        )
        # The in-flight request (2.5 s) outlasts the drain (2 s), which leaves the test
        # ample time to reach the sidecar before its listeners close.
        sc.config["shutdown"] = {"drain": "2s", "grace": "5s"}
        sc.start()
        try:
            await sc.wait_ready()
            async with aiohttp.ClientSession() as session:
                slow = asyncio.ensure_future(
                    session.get(f"{sc.url}/v1/invoke/billing/slow?delay=2.5")
                )
                while billing.hits == 0:
                    await asyncio.sleep(0.01)
                sc.signal(signal.SIGTERM)
                ready = await poll_json(  # until the signal has been handled
                    session, f"{sc.admin}/ready", lambda status, _: status != 200
                )
                async with session.get(f"{sc.url}/v1/invoke/billing/echo") as resp:
                    during_drain = resp.status
                async with await slow as resp:
                    in_flight = (resp.status, await resp.json())
            code = await sc.wait_exit()
        finally:
            sc.kill()
        assert (503, {"ready": False, "reasons": ["shutting down"]}) == ready
        assert 200 == during_drain
        assert (200, {"instance": "billing", "slow": True}) == in_flight
        assert 0 == code
        events = [e["event"] for e in sc.log_events()]
        assert "shutdown_started" in events
        assert "shutdown_complete" in events
        assert "shutdown_grace_exceeded" not in events

    async def test_an_answer_still_being_written_at_shutdown_is_not_cut(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """SIGTERM (no drain) while a 3 MB answer goes to an app that reads it slowly.
        Its exchange ends once the last bytes are handed to the app's transport, whose
        buffer still holds what the app has not read: shutdown lets it be written within
        its grace, then closes; it used to abort the connection, dropping that buffer,
        and the app lost the end of its answer."""
        billing = await upstreams("billing")
        size = 3_000_000
        sc = Sidecar(tmp_path, {"billing": {"endpoints": [billing.endpoint], "timeout": "60s"}})
        sc.config["shutdown"] = {"drain": "0s", "grace": "30s"}
        sc.start()
        sock = socket.socket()
        try:
            await sc.wait_ready()
            connect_reader(sock, sc.app_port, 4096)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(
                sock, b"GET /v1/invoke/billing/download?size=%d HTTP/1.1\r\nHost: s\r\n\r\n" % size
            )
            got = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            sc.signal(signal.SIGTERM)
            # Slower than the upstream: the sidecar's buffer toward the app is never
            # empty, also when the last bytes come in and the exchange ends.
            with contextlib.suppress(ConnectionResetError):
                while data := await asyncio.wait_for(loop.sock_recv(sock, 16384), 30):
                    got += data
                    await asyncio.sleep(0.002)
            code = await sc.wait_exit()
        finally:
            sock.close()
            sc.kill()
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), got[:200]
        assert (size, 0) == (len(body), code)

    async def test_no_request_is_served_after_a_keep_alive_answer_that_ends_in_shutdown(
        self, tmp_path: Path
    ) -> None:
        """An answer whose head said keep-alive before SIGTERM ends during the shutdown,
        which another request holds; the app then sends its next request on that
        connection. It is not forwarded (it was, then cut when the shutdown ended, with
        grace left): the connection ends after the answer, as after an answer with
        `Connection: close`."""
        size = 100_000
        release, done = asyncio.Event(), asyncio.Event()
        seen: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.append(head.split(b" ")[1])
                if head.startswith(b"GET /download "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nab" % size)
                    await release.wait()  # the rest once the shutdown has begun
                    writer.write(b"b" * (size - 2))
                else:
                    if head.startswith(b"GET /hold "):
                        await done.wait()  # holds the shutdown
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        async with raw_upstream(serve) as endpoint:
            sc = Sidecar(tmp_path, {"billing": {"endpoints": [endpoint], "retries": {"max": 0}}})
            sc.config["shutdown"] = {"drain": "0s", "grace": "30s"}
            sc.start()
            try:
                await sc.wait_ready()
                reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
                writer.write(b"GET /v1/invoke/billing/download HTTP/1.1\r\nHost: s\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                hold = asyncio.ensure_future(
                    raw_until_close(
                        sc.app_port,
                        b"GET /v1/invoke/billing/hold HTTP/1.1\r\nConnection: close\r\n\r\n",
                        timeout=20,
                    )
                )
                await eventually("the held request is in", lambda: b"/hold" in seen)
                sc.signal(signal.SIGTERM)
                await eventually("shutdown began", lambda: "shutdown_started" in sc.logs())
                release.set()
                body = await asyncio.wait_for(reader.readexactly(size), 5)
                writer.write(b"GET /v1/invoke/billing/next HTTP/1.1\r\nHost: s\r\n\r\n")
                rest = b"-"  # a reset would leave this
                with contextlib.suppress(ConnectionResetError):
                    rest = await asyncio.wait_for(reader.read(), 5)
                forwarded = list(seen)
                done.set()
                held = await hold
                writer.close()
                code = await sc.wait_exit()
            finally:
                sc.kill()
        assert head.startswith(b"HTTP/1.1 200"), head
        assert (size, b"", [b"/download", b"/hold"]) == (len(body), rest, forwarded)
        assert held.startswith(b"HTTP/1.1 200"), held
        assert 0 == code

    async def test_pipelined_requests_waiting_for_an_app_that_does_not_read_at_shutdown(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An app pipelines requests and reads none of the answers, so the next request
        waits for it to read; then SIGTERM (no drain). The waiting requests are not
        served (as behind an answer that closes), the answers already made are written
        once the app reads, then the connection ends: every request that reached the
        upstream has its whole answer, and the sidecar exits 0."""
        billing = await upstreams("billing")
        sc = Sidecar(tmp_path, {"billing": {"endpoints": [billing.endpoint]}})
        sc.config["shutdown"] = {"drain": "0s", "grace": "30s"}
        sc.start()
        request = b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: s\r\nX-Pad: %s\r\n\r\n" % (
            b"p" * 2000
        )
        sock = socket.socket()
        counted = ResponseCounter()
        try:
            await sc.wait_ready()
            connect_reader(sock, sc.app_port, 65536)
            loop = asyncio.get_running_loop()
            # Send until the sidecar stops reading (the app's sends block).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loop.sock_sendall(sock, request * 20_000), 3)
            hits = billing.hits
            sc.signal(signal.SIGTERM)
            await eventually("shutdown began", lambda: "shutdown_started" in sc.logs(), timeout=10)
            with contextlib.suppress(ConnectionResetError):
                while data := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 30):
                    counted.parser.feed_data(data)
            code = await sc.wait_exit()
        finally:
            sock.close()
            sc.kill()
        assert hits > 0
        assert (billing.hits, {200}, 0) == (counted.count, counted.statuses, code)

    async def test_post_shutdown_on_the_admin_api_stops_it_like_sigterm(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """POST /v1/shutdown (what a Job's app sends its legacy sidecar): 202, /ready turns
        503, calls are still served during the drain, and the process exits 0."""
        billing = await upstreams("billing")
        sc = Sidecar(tmp_path, {"billing": {"endpoints": [billing.endpoint]}})
        sc.config["shutdown"] = {"drain": "1s", "grace": "5s"}
        sc.start()
        try:
            await sc.wait_ready()
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{sc.admin}/v1/shutdown") as resp:
                    answer = (resp.status, (await resp.json())["shutting_down"])
                async with session.get(f"{sc.admin}/ready") as resp:
                    ready = resp.status
                async with session.get(f"{sc.url}/v1/invoke/billing/echo") as resp:
                    during_drain = resp.status
            code = await sc.wait_exit()
        finally:
            sc.kill()
        assert ((202, True), 503, 200, 0) == (answer, ready, during_drain, code)
        events = [e["event"] for e in sc.log_events()]
        assert "shutdown_requested" in events
        assert "shutdown_complete" in events

    async def test_every_bound_address_is_logged_and_nothing_per_request(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Start-up logs each listener; successful requests log nothing at info level."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            aiohttp.ClientSession() as session,
        ):
            logged_before = len(sc.logs().splitlines())
            for _ in range(20):
                async with session.get(f"{sc.url}/v1/invoke/billing/echo") as resp:
                    assert 200 == resp.status
            logged_after = len(sc.logs().splitlines())
        listening = {e["role"]: e["address"] for e in sc.log_events() if e["event"] == "listening"}
        assert {
            "app": f"127.0.0.1:{sc.app_port}",
            "admin": f"127.0.0.1:{sc.admin_port}",
        } == listening
        assert logged_before == logged_after
        started = next(e for e in sc.log_events() if e["event"] == "started")
        assert "uvloop" == started["event_loop"]


class TestAdminApi:
    async def test_live_ready_status_and_metrics(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """The admin endpoints answer with the shapes of SPEC §7 and §9."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            aiohttp.ClientSession() as session,
        ):
            async with session.get(f"{sc.url}/v1/invoke/billing/echo") as resp:
                assert 200 == resp.status
            async with session.get(f"{sc.admin}/live") as resp:
                live = resp.status
            async with session.get(f"{sc.admin}/ready") as resp:
                ready = resp.status
            async with session.get(f"{sc.admin}/v1/status") as resp:
                status = await resp.json()
            async with session.get(f"{sc.admin}/metrics") as resp:
                metrics = await resp.text()
                content_type = resp.headers["Content-Type"]
        assert (200, 200) == (live, ready)
        upstream = status["upstreams"]["billing"]
        assert ("closed", 0, True) == (
            upstream["circuit"],
            upstream["in_flight"],
            upstream["ready"],
        )
        assert [billing.endpoint] == [e["address"] for e in upstream["endpoints"]]
        assert "itest" == status["service"]["name"]
        assert content_type.startswith("text/plain; version=0.0.4")
        for series in (
            'sidecar_upstream_requests_total{code="200",upstream="billing"} 1.0',
            'sidecar_upstream_request_duration_seconds_count{upstream="billing"} 1.0',
            'sidecar_upstream_endpoints{state="healthy",upstream="billing"} 1.0',
            'sidecar_circuit_state{upstream="billing"} 0.0',
            'sidecar_build_info{version="',
            "# TYPE sidecar_retries_total counter",
        ):
            assert series in metrics, series


class TestBackPressure:
    async def test_slow_reader_does_not_leave_the_pooled_connection_paused(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """After an app that reads slowly (the sidecar paused the upstream), the next request
        on the same pooled connection is answered at once, not after a timeout."""
        billing = await upstreams("billing")
        cfg = {"endpoints": [billing.endpoint], "per_try_timeout": "2s", "timeout": "10s"}
        size = 4 * 1024 * 1024
        slow_answers, took = [], []
        async with running_sidecar(tmp_path, {"billing": cfg}) as sc:
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port, limit=4096)
                writer.write(
                    f"GET /v1/invoke/billing/download?size={size} HTTP/1.1\r\n"
                    "Host: x\r\n\r\n".encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                slow_answers.append(head.split(b"\r\n")[0])
                left = size
                while left:  # a slow reader: the sidecar must pause the upstream
                    left -= len(await reader.read(min(left, 32 * 1024)))
                    await asyncio.sleep(0.001)
                writer.close()
                await writer.wait_closed()
                async with aiohttp.ClientSession() as session:
                    started = asyncio.get_running_loop().time()
                    async with session.get(f"{sc.url}/v1/invoke/billing/echo") as resp:
                        assert 200 == resp.status
                    took.append(asyncio.get_running_loop().time() - started)
        assert [b"HTTP/1.1 200 OK"] * 3 == slow_answers
        assert max(took) < 1.0, took


def _answers(data: bytes) -> RawHandler:
    """A raw upstream that reads a request head, sends `data`, then waits for the
    sidecar to drop the connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(data)
        await writer.drain()
        await reader.read()

    return handler


class TestBrokenUpstream:
    async def test_garbage_from_the_upstream_fails_at_once(self, tmp_path: Path) -> None:
        """An upstream answering with bytes that are not HTTP gets 502 immediately, not a
        timeout."""

        async with raw_upstream(_answers(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")) as endpoint:
            cfg = {"endpoints": [endpoint], "per_try_timeout": "3s", "retries": {"max": 0}}
            async with (
                running_sidecar(tmp_path, {"billing": cfg}) as sc,
                aiohttp.ClientSession() as session,
            ):
                started = asyncio.get_running_loop().time()
                async with session.get(f"{sc.url}/v1/invoke/billing/x") as resp:
                    answer = (resp.status, resp.headers.get("x-sidecar-error"))
                took = asyncio.get_running_loop().time() - started
        assert (502, "UPSTREAM_CONNECT_FAILED") == answer
        assert took < 1.0

    async def test_an_http10_answer_cut_short_ends_with_a_reset(self, tmp_path: Path) -> None:
        """An HTTP/1.0 app's answer has no length when the upstream's is chunked: it ends
        with the connection. When the upstream dies mid-body, the app's read fails with a
        reset; an end of stream would make the truncated 200 look complete."""
        cut = asyncio.Event()

        async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n")
            writer.write(b"z" * 4096 + b"\r\n")
            await cut.wait()  # the app has the head and those bytes
            writer.transport.abort()

        async with raw_upstream(dies) as endpoint:
            cfg = {"endpoints": [endpoint], "retries": {"max": 0}}
            async with running_sidecar(tmp_path, {"billing": cfg}) as sc:
                reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
                try:
                    writer.write(b"GET /v1/invoke/billing/x HTTP/1.0\r\n\r\n")
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    body = await asyncio.wait_for(reader.readexactly(4096), 5)
                    cut.set()
                    with pytest.raises(ConnectionResetError):
                        await asyncio.wait_for(reader.read(), 5)
                finally:
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"z" * 4096 == body
        assert b"content-length" not in head.lower()

    async def test_a_status_code_under_100_is_no_answer(self, tmp_path: Path) -> None:
        """`HTTP/1.1 000 Zero` (llhttp accepts any three digits) is as bad as garbage: 502
        at once and the connection dropped, never relayed as an interim answer after
        which the app waits for a final one that never comes."""

        zero = b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok"
        async with raw_upstream(_answers(zero)) as endpoint:
            cfg = {"endpoints": [endpoint], "per_try_timeout": "3s", "retries": {"max": 0}}
            async with running_sidecar(tmp_path, {"billing": cfg}) as sc:
                answer = await raw_until_close(
                    sc.app_port,
                    b"GET /v1/invoke/billing/x HTTP/1.1\r\nConnection: close\r\n\r\n",
                )
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 502 "), answer
        assert b"\r\nx-sidecar-error: upstream_connect_failed" in head, answer

    async def test_transfer_codings_other_than_chunked_reach_the_app(self, tmp_path: Path) -> None:
        """`Transfer-Encoding: gzip, chunked` from the upstream is re-chunked but keeps
        `gzip`, so the app can still decode the body it gets."""
        payload = gzip.compress(b"hello, compressed world")

        async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
            )
            await writer.drain()

        async with raw_upstream(gzipped) as endpoint:
            cfg = {"endpoints": [endpoint], "retries": {"max": 0}}
            async with running_sidecar(tmp_path, {"billing": cfg}) as sc:
                answer = await raw_until_close(
                    sc.app_port,
                    b"GET /v1/invoke/billing/x HTTP/1.1\r\nConnection: close\r\n\r\n",
                )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: gzip, chunked" in head.split(b"\r\n")
        size, _, rest = body.partition(b"\r\n")
        assert payload == rest[: int(size, 16)]

    async def test_bytes_after_a_complete_response_never_reach_the_next_request(
        self, tmp_path: Path
    ) -> None:
        """An upstream that sends a second response head after a complete one: that
        connection is not reused, so the next request gets its own answer."""

        async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /a "):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA"
                        b"HTTP/1.1 200 OK\r\nX-Stray: 1\r\nContent-Length: 30\r\n\r\n"
                    )
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nB-body")
                await writer.drain()

        async with raw_upstream(chatty) as endpoint, billing_sidecar(tmp_path, endpoint) as sc:
            answers = [
                await raw_responses(sc.app_port, b"GET /v1/invoke/billing/%s HTTP/1.1\r\n\r\n" % p)
                for p in (b"a", b"b")
            ]
        assert [(b"A",), (b"B-body",)] == [tuple(body for _, body in a) for a in answers]
        assert b"X-Stray" not in answers[1][0][0]

    async def test_upstream_that_resets_at_once_gets_502_for_every_request(
        self, tmp_path: Path
    ) -> None:
        """Accept, then reset before reading: each of 100 concurrent requests gets a 502
        (no request dies unanswered) and no endpoint count leaks."""

        async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.abort()

        async with (
            raw_upstream(reset) as endpoint,
            billing_sidecar(
                tmp_path,
                endpoint,
                retries={"max": 0},
                # A breaker that opened midway would answer the late ones 503 instead.
                circuit_breaker={"failure_threshold": 1000},
            ) as sc,
            aiohttp.ClientSession() as session,
        ):

            async def one() -> int:
                async with session.get(f"{sc.url}/v1/invoke/billing/x") as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one() for _ in range(100)))
            async with session.get(f"{sc.admin}/v1/status") as resp:
                status = await resp.json()
        assert {502} == set(statuses)
        (stats,) = status["upstreams"]["billing"]["endpoints"]
        assert (0, 0) == (status["upstreams"]["billing"]["in_flight"], stats["outstanding"])
        assert not [e for e in sc.log_events() if e.get("level") == "error"]

    async def test_an_unasked_101_is_a_failed_attempt(self, tmp_path: Path) -> None:
        """`101 Switching Protocols` to a request that asked for no upgrade: 502, quietly."""

        async def switching(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
            )
            await reader.read()

        async with (
            raw_upstream(switching) as endpoint,
            billing_sidecar(tmp_path, endpoint, retries={"max": 0}) as sc,
        ):
            ((head, _),) = await raw_responses(
                sc.app_port, b"GET /v1/invoke/billing/x HTTP/1.1\r\n\r\n"
            )
        assert head.startswith(b"HTTP/1.1 502")
        assert not [e for e in sc.log_events() if e.get("level") == "error"]
        assert "Fatal error" not in sc.logs()

    async def test_an_early_answer_to_an_unfinished_upload_says_connection_close(
        self, tmp_path: Path
    ) -> None:
        """The upstream refuses a 10 MB upload with 413 after the head: the app is told
        `Connection: close` and can read the whole answer while it is still sending."""

        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"
                b"big!"
            )
            await writer.drain()

        async with (
            raw_upstream(refuse) as endpoint,
            billing_sidecar(tmp_path, endpoint, retries={"max": 0}) as sc,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
            try:
                writer.write(
                    b"POST /v1/invoke/billing/up HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n"
                    + b"x" * 65536
                )
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                body = await asyncio.wait_for(reader.readexactly(4), 5)
            finally:
                writer.close()
        assert head.startswith(b"HTTP/1.1 413")
        assert b"connection: close" in head.lower()
        assert b"big!" == body

    async def test_a_reset_is_not_the_end_of_a_close_delimited_body(self, tmp_path: Path) -> None:
        """A body that ends at the close, then an RST instead of a FIN: the app's response
        is cut (no final chunk) and the attempt counts as a failure, not a 200."""

        async def reset_mid_body(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart-of-the-body")
            await writer.drain()
            await asyncio.sleep(0.2)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # with SO_LINGER 0: an RST

        async with (
            raw_upstream(reset_mid_body) as endpoint,
            billing_sidecar(tmp_path, endpoint, retries={"max": 0}) as sc,
            aiohttp.ClientSession() as session,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
            try:
                writer.write(b"GET /v1/invoke/billing/x HTTP/1.1\r\n\r\n")
                answer = b""
                with contextlib.suppress(ConnectionError):
                    while chunk := await asyncio.wait_for(reader.read(4096), 5):
                        answer += chunk
            finally:
                writer.close()
            async with session.get(f"{sc.admin}/v1/status") as resp:
                status = await resp.json()
        assert answer.startswith(b"HTTP/1.1 200")
        assert b"part-of-the-body" in answer
        assert not answer.endswith(b"0\r\n\r\n")
        assert 1 == status["upstreams"]["billing"]["endpoints"][0]["consecutive_failures"]

    async def test_a_stalled_body_is_cut_at_the_overall_timeout_not_per_try(
        self, tmp_path: Path
    ) -> None:
        """Head and 10 of 100 bytes, then silence: per_try_timeout (1s) no longer
        applies once the head arrived; the overall timeout (2.5s) cuts the response."""

        async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            await reader.read()

        async with (
            raw_upstream(stall) as endpoint,
            billing_sidecar(
                tmp_path, endpoint, timeout="2500ms", per_try_timeout="1s", retries={"max": 0}
            ) as sc,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
            try:
                writer.write(b"GET /v1/invoke/billing/x HTTP/1.1\r\n\r\n")
                started = time.monotonic()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")  # not a 504 from the per-try timeout
                body = b""
                with contextlib.suppress(ConnectionError):
                    body = await asyncio.wait_for(reader.read(1000), 5)
                    while chunk := await asyncio.wait_for(reader.read(1000), 5):
                        body += chunk
                took = time.monotonic() - started
            finally:
                writer.close()
        assert b"0123456789" == body
        assert 2.4 < took < 5.0


class TestTrailers:
    """Trailer sections (found by a review): never merged into a header section, and
    bounded like a head, on both sides of the proxy."""

    async def test_request_trailers_are_not_forwarded_as_headers(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`Host`, `X-Forwarded-For` and `Authorization` sent as trailers of a chunked
        body reach the upstream as nothing at all (RFC 9110 §6.5.1: never merged)."""
        up = await upstreams("billing")
        request = (
            b"PUT /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n"
            b"Host: evil.example\r\nX-Forwarded-For: 10.9.9.9\r\nAuthorization: secret\r\n\r\n"
        )
        async with running_sidecar(tmp_path, {"billing": {"endpoints": [up.endpoint]}}) as sc:
            ((head, body),) = await raw_responses(sc.app_port, request)
        assert head.startswith(b"HTTP/1.1 200 "), head
        seen = json.loads(body)
        names = {name.lower(): value for name, value in seen["headers"]}
        assert "body" == seen["body"]
        assert "authorization" not in names
        assert "127.0.0.1" == names["x-forwarded-for"]
        assert "evil.example" not in str(seen["headers"])

    @pytest.mark.parametrize(
        "upgrade", [b"", b"Connection: Upgrade\r\nUpgrade: h2c\r\n"], ids=["plain", "h2c"]
    )
    async def test_endless_request_trailers_end_the_connection(
        self, tmp_path: Path, upstreams: UpstreamFactory, upgrade: bytes
    ) -> None:
        """A trailer section that never ends is cut off past `max_header_bytes`: the app's
        connection is closed instead of buffering it whole (also after an ignored
        `Upgrade: h2c`, whose body a second parser reads)."""
        up = await upstreams("billing")
        start = (
            b"PUT /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\n%s"
            b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\nX-Trailer: " % upgrade
        )
        async with running_sidecar(tmp_path, {"billing": {"endpoints": [up.endpoint]}}) as sc:
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
            try:
                writer.write(start)
                with contextlib.suppress(ConnectionError):
                    for _ in range(64):  # 4 MiB of one trailer value, unless cut before
                        writer.write(b"t" * 65536)
                        await writer.drain()
                with contextlib.suppress(ConnectionError):
                    rest = await asyncio.wait_for(reader.read(), 5)
                    assert b"" == rest or rest.startswith(b"HTTP/1.1 4")
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def test_endless_response_trailers_cut_the_response(self, tmp_path: Path) -> None:
        """An upstream whose trailer section never ends: the app gets the head and the
        body, then its connection is cut, long before the request's timeout."""

        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: "
            )
            with contextlib.suppress(ConnectionError):
                for _ in range(256):  # 16 MiB unless the sidecar hangs up first
                    writer.write(b"t" * 65536)
                    await writer.drain()
            await reader.read()

        async with raw_upstream(endless) as endpoint:
            cfg = {"endpoints": [endpoint], "timeout": "30s", "retries": {"max": 0}}
            async with running_sidecar(tmp_path, {"billing": cfg}) as sc:
                answer = await raw_until_close(
                    sc.app_port,
                    b"GET /v1/invoke/billing/x HTTP/1.1\r\nConnection: close\r\n\r\n",
                )
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert b"hello" in answer
        assert b"X-T" not in answer


class TestTinyChunks:
    async def test_tiny_chunks_go_upstream_in_one_write_per_read(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """20,000 one-byte chunks: the upstream gets the body intact, and the sidecar
        writes it in a few system calls, not one per chunk (found by a review: one app
        sending 1-byte chunks held the event loop for seconds)."""
        up = await upstreams("billing")
        count = 20_000
        body = bytes(i % 251 for i in range(count))
        framed = b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(count))
        head = (
            b"PUT /v1/invoke/billing/upload HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        async with running_sidecar(tmp_path, {"billing": {"endpoints": [up.endpoint]}}) as sc:
            assert sc.proc is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
            try:
                writer.write(head)
                # Once the request is upstream, its body streams to the connection.
                await eventually("the request reached the upstream", lambda: up.hits > 0)
                before = proc_number(sc.proc.pid, "io", "syscw:", 1)
                writer.write(framed + b"0\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(), 10)
                writes = proc_number(sc.proc.pid, "io", "syscw:", 1) - before
            finally:
                writer.close()
                await writer.wait_closed()
        seen = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert (count, hashlib.sha256(body).hexdigest()) == (seen["size"], seen["sha256"])
        assert writes < 1_000, writes
