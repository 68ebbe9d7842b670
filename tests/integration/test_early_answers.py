"""Uploads and what they mean for the upstream (SPEC §4): an upstream's early answer is
relayed, timers measure the upstream and not the app's upload, and an upload the app
stalls is the app's fault (408 REQUEST_TIMEOUT), never the upstream's."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    billing_sidecar,
    metric_samples,
    raw_upstream,
    running_sidecar,
    settled_status,
    unblamed,
)

MIB = 1024 * 1024


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


async def _read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Content-Length-framed answer as (head, body); fails after a generous 10 s."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    return head, await asyncio.wait_for(reader.readexactly(length), 10)


def _status_and_error(head: bytes) -> tuple[int, str | None]:
    """The status code and the x-sidecar-error value (None without one) of a head."""
    lines = head.split(b"\r\n")
    error = next(
        (
            line.split(b":", 1)[1].strip().decode()
            for line in lines
            if line.lower().startswith(b"x-sidecar-error:")
        ),
        None,
    )
    return int(lines[0].split()[1]), error


async def _upload_while_reading(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, pieces: list[bytes], pause: float
) -> tuple[bytes, bytes]:
    """Write `pieces` with `pause` seconds between them while reading the one answer.

    The answer may come before the upload is done (an early answer, a sidecar error),
    so it is read concurrently; a write the sidecar refuses once it answered is not
    this test's concern.
    """

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(pause)
                writer.write(piece)
                await writer.drain()

    sender = asyncio.create_task(send())
    try:
        return await _read_answer(reader)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender


class TestEarlyAnswers:
    async def test_gunicorn_413_before_reading_a_big_upload_reaches_the_app(
        self, tmp_path: Path, httpbin: str
    ) -> None:
        """gunicorn (httpbin, sync workers) answers `POST /status/413` without reading the
        5 MiB body and closes, so its kernel resets the connection under the sidecar's
        writes. Each of 25 such answers reaches the app as the upstream's 413, without
        x-sidecar-error, and neither the endpoint nor the breaker holds it against
        billing. (25 tries: a race lost even a third of the time cannot pass by luck.)"""
        body = b"x" * (5 * MIB)
        tries = 25
        async with billing_sidecar(tmp_path, httpbin) as sc:
            url = f"{sc.url}/v1/invoke/billing/status/413"

            def post_all() -> list[tuple[int, str | None]]:
                answers = []
                with requests.Session() as session:
                    session.trust_env = False  # no HTTP_PROXY or NO_PROXY from outside
                    for _ in range(tries):
                        resp = session.post(url, data=body, timeout=30)
                        answers.append((resp.status_code, resp.headers.get("x-sidecar-error")))
                return answers

            answers = await asyncio.to_thread(post_all)
            billing = await settled_status(sc)
        assert {(413, None): tries} == Counter(answers)
        assert unblamed(billing), billing

    async def test_raw_401_before_reading_an_upload_reaches_the_app(self, tmp_path: Path) -> None:
        """An upstream that reads only the head, answers 401 with a small body and closes
        with the 4 MiB upload unread (a reset): the app gets that 401 and its body, 20
        times out of 20, and the endpoint and the breaker are not blamed."""
        tries = 20
        size = 4 * MIB
        answer = (
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 12\r\n\r\nunauthorized"
        )

        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            # Returning closes the socket with body bytes unread: the kernel sends a reset.

        head = b"POST /v1/invoke/billing/upload HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n"
        piece = b"u" * (256 * 1024)
        got = []
        async with (
            raw_upstream(refuse) as endpoint,
            billing_sidecar(tmp_path, endpoint) as sc,
        ):
            for _ in range(tries):
                async with _connection(sc.app_port) as (reader, writer):
                    pieces = [head % size] + [piece] * (size // len(piece))
                    answer_head, answer_body = await _upload_while_reading(
                        writer, reader, pieces, pause=0
                    )
                got.append((*_status_and_error(answer_head), answer_body))
            billing = await settled_status(sc)
        assert {(401, None, b"unauthorized"): tries} == Counter(got)
        assert unblamed(billing), billing


# Sent 0.5 s apart: 2.5 s in all, longer than both timers below. Once the last piece
# is in, the upstream (in this test process) has the whole per_try_timeout to answer,
# so a test process descheduled for a moment does not turn into a 504.
SLOW_PIECES = 6
SLOW_PAUSE = 0.5


def _slow_body() -> list[bytes]:
    return [bytes([i]) * 10_000 for i in range(SLOW_PIECES)]


class TestSlowUploads:
    async def _upload(
        self, tmp_path: Path, upstreams: UpstreamFactory, head: bytes, pieces: list[bytes]
    ) -> tuple[int, str | None, dict[str, object], dict[str, object]]:
        billing = await upstreams("billing")
        async with (
            billing_sidecar(
                tmp_path,
                billing.endpoint,
                timeout="1500ms",
                per_try_timeout="1500ms",
            ) as sc,
            _connection(sc.app_port) as (reader, writer),
        ):
            answer_head, answer_body = await _upload_while_reading(
                writer, reader, [head + pieces[0], *pieces[1:]], pause=SLOW_PAUSE
            )
            status = await settled_status(sc)
        code, error = _status_and_error(answer_head)
        return code, error, json.loads(answer_body) if code == 200 else {}, status

    async def test_slow_content_length_upload_is_not_timed_out(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A body with Content-Length sent in pieces over 2.5 s, against timeout and
        per_try_timeout of 1.5 s: the timers start once it is all sent, so the upstream's
        200 arrives with the body whole, and billing is not blamed."""
        body = _slow_body()
        whole = b"".join(body)
        head = (
            b"POST /v1/invoke/billing/upload HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n"
            % len(whole)
        )
        code, error, echo, billing = await self._upload(tmp_path, upstreams, head, body)
        assert (200, None) == (code, error)
        assert {"size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()} == echo
        assert unblamed(billing), billing

    async def test_slow_chunked_upload_is_not_timed_out(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """The same with Transfer-Encoding: chunked, one chunk per piece and the last
        chunk after the last pause: 200 with the body whole, billing not blamed."""
        body = _slow_body()
        whole = b"".join(body)
        head = (
            b"POST /v1/invoke/billing/upload HTTP/1.1\r\nHost: app\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in body]
        chunks[-1] += b"0\r\n\r\n"
        code, error, echo, billing = await self._upload(tmp_path, upstreams, head, chunks)
        assert (200, None) == (code, error)
        assert {"size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()} == echo
        assert unblamed(billing), billing


STALLED = {
    "content-length": (
        b"POST /v1/invoke/billing/upload HTTP/1.1\r\nHost: app\r\nContent-Length: 100000\r\n\r\n"
        + b"s" * 5000
    ),
    "chunked": (
        b"POST /v1/invoke/billing/upload HTTP/1.1\r\nHost: app\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n1388\r\n" + b"s" * 5000 + b"\r\n1000\r\nss"
    ),
}


class TestStalledUploads:
    @pytest.mark.parametrize("framing", sorted(STALLED))
    async def test_stalled_upload_is_408_and_not_held_against_the_upstream(
        self, tmp_path: Path, framing: str
    ) -> None:
        """An app that sends a head and part of its body (Content-Length, or chunked and
        stopping mid-chunk), then nothing for body_timeout (1s): it gets 408
        REQUEST_TIMEOUT in SPEC's JSON shape with `Connection: close`, and its connection
        is closed; the upstream's attempt is aborted; nothing counts against billing (no
        endpoint failure, no ejection, circuit closed, no retry), and the request is
        counted as a 408 and a REQUEST_TIMEOUT error."""
        upstream_closed = asyncio.Event()

        async def read_to_the_end(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
            try:
                while await reader.read(65536):
                    pass
            finally:  # at EOF, or a reset (ConnectionError)
                upstream_closed.set()

        async with (
            raw_upstream(read_to_the_end) as endpoint,
            running_sidecar(
                tmp_path,
                {"billing": {"endpoints": [endpoint]}},
                app_connections={"body_timeout": "1s"},
            ) as sc,
        ):
            before = await metric_samples(sc)
            async with _connection(sc.app_port) as (reader, writer):
                writer.write(STALLED[framing])
                # Everything until the sidecar closes the connection.
                answer = await asyncio.wait_for(reader.read(), 15)
            # The attempt is aborted: the upstream sees its connection end.
            await asyncio.wait_for(upstream_closed.wait(), 15)
            billing = await settled_status(sc)
            after = await metric_samples(sc)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert (408, "REQUEST_TIMEOUT") == _status_and_error(head), answer
        assert b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert ("REQUEST_TIMEOUT", "billing") == (error["code"], error["upstream"])
        assert isinstance(error["message"], str)
        assert error["message"]
        assert unblamed(billing), billing
        assert {
            'sidecar_proxy_errors_total{error="REQUEST_TIMEOUT",upstream="billing"}': 1.0,
            'sidecar_upstream_requests_total{code="408",upstream="billing"}': 1.0,
            'sidecar_retries_total{upstream="billing"}': 0.0,
        } == {
            series: after.get(series, 0.0) - before.get(series, 0.0)
            for series in (
                'sidecar_proxy_errors_total{error="REQUEST_TIMEOUT",upstream="billing"}',
                'sidecar_upstream_requests_total{code="408",upstream="billing"}',
                'sidecar_retries_total{upstream="billing"}',
            )
        }
