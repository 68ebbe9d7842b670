"""OTLP/HTTP export (`otlp.HttpTransport`) against the collector double and raw servers:
what it sends, which answers it retries, and the kept-alive connection it reuses.

`send` blocks (it runs in the span export thread), so the tests call it in a thread
while the servers run on the test's loop.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import TracingConfig
from sidecar.telemetry.otlp import Encoder, ExportError, HttpTransport
from sidecar.telemetry.tracing import SERVER, SpanRecord
from tests.doubles.otlp import OtlpCollector

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _config(endpoint: str, **settings: Any) -> TracingConfig:
    return TracingConfig(enabled=True, endpoint=endpoint, **settings)


def _body(name: str = "GET /orders") -> bytes:
    """One export request holding one SERVER span called `name`."""
    record = SpanRecord(
        name,
        SERVER,
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        parent_id=0,
        start_ns=1_700_000_000_000_000_000,
        attributes={"http.request.method": "GET"},
    )
    record.end_ns = record.start_ns + 1_000_000
    encoder = Encoder({"service.name": "billing"})
    ((body, spans),) = encoder.batch([encoder.span(record)])
    assert 1 == spans
    return body


async def _send(transport: HttpTransport, body: bytes, timeout: float = 10.0) -> None:
    await asyncio.to_thread(transport.send, body, time.monotonic() + timeout)


@pytest.fixture
async def collector() -> AsyncIterator[OtlpCollector]:
    async with OtlpCollector() as running:
        yield running


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The back-off sleeps `send` would take, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr("sidecar.telemetry.otlp.time.sleep", slept.append)
    return slept


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (made by the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    request += ["-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run([openssl, *request], check=True, capture_output=True)
    return cert, key


@asynccontextmanager
async def _raw_server(serve: Serve) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw HTTP server on 127.0.0.1: yields its traces URL and a list that counts the
    connections it accepted (one entry each)."""
    accepted: list[int] = []
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/traces", accepted
    finally:
        server.close()
        if handlers:  # each ends when the transport closes its side; any left is cancelled
            await asyncio.wait(list(handlers), timeout=5)
        for task in list(handlers):
            task.cancel()
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


class TestAgainstTheCollector:
    async def test_spans_arrive_with_the_exporters_headers(self, collector: OtlpCollector) -> None:
        """A POST of protobuf to the traces URL, with Host, the User-Agent and the
        configured headers; the collector decodes the span."""
        transport = HttpTransport(
            _config(collector.traces_url, headers=(("Authorization", "Bearer t0ken"),))
        )
        try:
            await _send(transport, _body())
        finally:
            transport.close()
        (span,) = await collector.wait_for("GET /orders")
        assert "billing" == span.resource["service.name"]
        (request,) = collector.requests
        assert ("POST", "/v1/traces", 200) == (request.method, request.path, request.status)
        port = collector.http_endpoint.rsplit(":", 1)[1]
        assert f"127.0.0.1:{port}" == request.headers["host"]
        assert "application/x-protobuf" == request.headers["content-type"]
        assert request.headers["user-agent"].startswith("hms-sidecar/")
        assert "Bearer t0ken" == request.headers["authorization"]

    async def test_gzip_bodies_are_named_and_decoded(self, collector: OtlpCollector) -> None:
        transport = HttpTransport(_config(collector.traces_url, compression="gzip"))
        try:
            await _send(transport, _body())
        finally:
            transport.close()
        await collector.wait_for("GET /orders")
        assert "gzip" == collector.requests[0].headers["content-encoding"]

    async def test_a_retryable_answer_is_sent_again_after_its_retry_after(
        self, collector: OtlpCollector, no_backoff: list[float]
    ) -> None:
        """503 and 429 (OTLP's retryable statuses) are retried, after Retry-After's
        seconds when the collector gives them; the spans are stored once."""
        collector.fail_next(1, 503, retry_after=0)
        collector.fail_next(1, 429, retry_after=2)
        transport = HttpTransport(_config(collector.traces_url))
        try:
            await _send(transport, _body())
        finally:
            transport.close()
        assert [503, 429, 200] == [r.status for r in collector.requests]
        assert [0.0, 2.0] == no_backoff
        assert 1 == len(collector.spans)

    async def test_another_answer_fails_the_export_at_once_naming_it(
        self, collector: OtlpCollector, no_backoff: list[float]
    ) -> None:
        collector.fail_next(1, 400)
        transport = HttpTransport(_config(collector.traces_url))
        try:
            with pytest.raises(ExportError, match="HTTP 400: b'"):
                await _send(transport, _body())
        finally:
            transport.close()
        assert [400] == [r.status for r in collector.requests]
        assert [] == no_backoff

    async def test_a_collector_that_does_not_answer_fails_the_export_at_its_deadline(
        self, collector: OtlpCollector
    ) -> None:
        collector.pause()
        transport = HttpTransport(_config(collector.traces_url))
        try:
            with pytest.raises(ExportError, match="TimeoutError"):
                await _send(transport, _body(), timeout=0.5)
        finally:
            transport.close()
            collector.resume()
        assert 1 == len(collector.requests)


class TestTheConnection:
    async def test_exports_share_one_kept_alive_connection(self) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await _read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

        async with _raw_server(serve) as (url, accepted):
            transport = HttpTransport(_config(url))
            try:
                for _ in range(3):
                    await _send(transport, _body())
            finally:
                transport.close()
        assert 1 == len(accepted)

    async def test_a_connection_the_collector_closed_while_idle_is_replaced_at_once(
        self, no_backoff: list[float]
    ) -> None:
        """The collector closes a kept-alive connection after its idle timeout, without
        a word; the next export finds it closed before any answer comes, and goes again
        at once on a new connection, without a back-off or a failure."""
        closed: list[int] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            closed.append(1)  # then closed, as an idle timeout would

        async with _raw_server(serve) as (url, accepted):
            transport = HttpTransport(_config(url))
            try:
                await _send(transport, _body())
                while not closed:  # the server's side of the first connection ends
                    await asyncio.sleep(0.005)
                await _send(transport, _body())
            finally:
                transport.close()
        assert 2 == len(accepted)
        assert [] == no_backoff

    async def test_an_answer_delimited_by_the_close_is_complete(self) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/x-protobuf\r\n\r\n")
            await writer.drain()

        async with _raw_server(serve) as (url, accepted):
            transport = HttpTransport(_config(url))
            try:
                await _send(transport, _body())
                await _send(transport, _body())  # a new connection: the last one ended
            finally:
                transport.close()
        assert 2 == len(accepted)

    async def test_an_answer_cut_short_is_retried_after_the_backoff(
        self, no_backoff: list[float]
    ) -> None:
        """A collector that closes in the middle of its answer: the export is sent again
        after the OTLP back-off (1 s ± 20 %) on a new connection."""
        answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", b""]

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            cut = answers.pop(0)
            writer.write(cut or b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            if not cut:
                await reader.read()  # kept alive until the client closes

        async with _raw_server(serve) as (url, accepted):
            transport = HttpTransport(_config(url))
            try:
                await _send(transport, _body())
            finally:
                transport.close()
        assert 2 == len(accepted)
        assert 1 == len(no_backoff)
        assert 0.8 <= no_backoff[0] <= 1.2


class TestWhatTheCollectorSends:
    async def test_bytes_after_a_complete_answer_leave_it_standing(self) -> None:
        """Garbage, or a second response, after a whole 200: the export succeeded (it is
        not sent again), and the connection, out of step, is not used again."""
        answers = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nJUNK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n",
        ]
        requests: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            requests.append(await _read_request(reader))
            writer.write(answers[len(requests) - 1])
            await writer.drain()
            await reader.read()  # until the client closes

        async with _raw_server(serve) as (url, accepted):
            transport = HttpTransport(_config(url))
            try:
                await _send(transport, _body())
                await _send(transport, _body())
            finally:
                transport.close()
        assert 2 == len(requests)
        assert 2 == len(accepted)

    @pytest.mark.parametrize(
        "answer",
        [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",  # llhttp stops there all the same
        ],
    )
    async def test_a_switch_of_protocols_fails_the_export_at_once(
        self, answer: bytes, no_backoff: list[float]
    ) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(answer)
            await writer.drain()
            await reader.read()

        async with _raw_server(serve) as (url, _):
            transport = HttpTransport(_config(url))
            try:
                with pytest.raises(ExportError, match="HTTP 101"):
                    await _send(transport, _body())
            finally:
                transport.close()
        assert [] == no_backoff

    async def test_a_configured_host_replaces_the_exporters_own_and_idna_is_used(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """One Host field, the configured one when there is one (Go's server, the
        Collector's, answers 400 to two); a host name outside ASCII goes out in IDNA,
        as http.client sent it."""
        heads: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heads.append(await _read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            await reader.read()

        async with _raw_server(serve) as (url, _):
            port = int(url.split(":")[2].split("/")[0])
            connect = socket.create_connection
            monkeypatch.setattr(  # every host name reaches the raw server
                "sidecar.telemetry.otlp.socket.create_connection",
                lambda _address, timeout: connect(("127.0.0.1", port), timeout),
            )
            configured = HttpTransport(
                _config(url, headers=(("host", "otel.internal"), ("accept-encoding", "gzip")))
            )
            idn = HttpTransport(_config("http://tracé.example:4318/v1/traces"))
            try:
                await _send(configured, _body())
                await _send(idn, _body())
            finally:
                configured.close()
                idn.close()
        fields = [
            [
                line.split(b":", 1)[0].lower() + b":" + line.split(b":", 1)[1]
                for line in head.split(b"\r\n")[1:]
                if b":" in line
            ]
            for head in heads
        ]
        assert [b"host: otel.internal"] == [f for f in fields[0] if f.startswith(b"host:")]
        assert [b"accept-encoding: gzip"] == [
            f for f in fields[0] if f.startswith(b"accept-encoding:")
        ]
        assert [b"host: " + "tracé.example".encode("idna") + b":4318"] == [
            f for f in fields[1] if f.startswith(b"host:")
        ]

    @pytest.mark.parametrize(
        "late",
        [b"JUNK\r\n", b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n"],
    )
    async def test_bytes_that_come_after_the_answer_retire_the_connection(
        self, late: bytes, no_backoff: list[float]
    ) -> None:
        """Bytes the collector sends after a complete answer, in a later packet: the next
        export does not read them as its answer (a parse error, a resend, or a 400 that
        was not its own) but goes on a new connection, once."""
        requests: list[bytes] = []
        more, written = asyncio.Event(), asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            requests.append(await _read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            if len(requests) == 1:
                await more.wait()
                writer.write(late)  # in the client's socket once drained (loopback)
                await writer.drain()
                written.set()
            await reader.read()

        async with _raw_server(serve) as (url, accepted):
            transport = HttpTransport(_config(url))
            try:
                await _send(transport, _body())
                more.set()
                await written.wait()
                await _send(transport, _body())
            finally:
                transport.close()
        assert 2 == len(requests)
        assert 2 == len(accepted)
        assert [] == no_backoff

    async def test_a_certificate_that_fails_verification_fails_the_export_at_once(
        self, self_signed: tuple[Path, Path], no_backoff: list[float]
    ) -> None:
        """A self-signed certificate: an export error naming it, without the back-off
        (the same certificate would come back on every attempt)."""
        cert, key = self_signed
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        transport = HttpTransport(_config(f"https://127.0.0.1:{port}/v1/traces"))
        try:
            with pytest.raises(ExportError, match="certificate"):
                await _send(transport, _body())
        finally:
            transport.close()
            server.close()
            await server.wait_closed()
        assert [] == no_backoff
