"""Limits on the app's connections: idle and head timeouts, head size, pipelined bad requests,
and the size of an upstream's response head."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    billing_sidecar,
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
            writer.write(GET)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            began = time.monotonic()
            rest = await _closed_within(reader, 5)
            waited = time.monotonic() - began
        assert b"" == rest
        assert waited >= 0.35

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
        """A head that stops half-way is answered 400 BAD_REQUEST naming header_timeout;
        the next slow head on another connection is answered the same way."""
        billing = await upstreams("billing")
        answers = []
        async with _sidecar_with(tmp_path, billing.endpoint, header_timeout="500ms") as port:
            for _ in range(2):
                async with _connection(port) as (reader, writer):
                    writer.write(b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: side")
                    answers.append(await _closed_within(reader, 5))
        for answer in answers:
            head, error = _error(answer)
            assert head.startswith(b"HTTP/1.1 400")
            assert "BAD_REQUEST" == error["code"]
            assert "header_timeout (0.5s)" in error["message"]
        assert 0 == billing.hits


class TestHalfClose:
    async def test_requests_sent_before_a_half_close_are_answered(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An app that shuts down its sending side after two requests (as `nc` does) still
        gets both answers, then the connection closes."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            _connection(sc.app_port) as (reader, writer),
        ):
            writer.write(GET + GET)
            writer.write_eof()
            answer = await _closed_within(reader, 5)
        assert 2 == answer.count(b"HTTP/1.1 200 OK\r\n")
        assert 2 == billing.hits

    async def test_a_request_cut_by_the_half_close_is_dropped(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A body that stops short at the half-close can never complete: the connection
        closes at once instead of waiting for the upstream's timeout."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            _connection(sc.app_port) as (reader, writer),
        ):
            writer.write(b"POST /v1/invoke/billing/echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            writer.write_eof()
            began = time.monotonic()
            answer = await _closed_within(reader, 5)
        assert b"" == answer
        assert time.monotonic() - began < 2.0


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
        """Pipelined: a good request, then garbage. The good one is answered, then the 400."""
        billing = await upstreams("billing")
        slow = b"GET /v1/invoke/billing/slow?delay=0.3 HTTP/1.1\r\nHost: s\r\n\r\n"
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answer = await raw_until_close(sc.app_port, slow + b"GARBAGE\r\n\r\n")
        first, _, rest = answer.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200")
        assert b"HTTP/1.1 400 Bad Request" in rest
        assert b"malformed HTTP request" in rest
        assert 1 == billing.hits


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
