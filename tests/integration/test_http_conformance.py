"""What RFC 9110 and 9112 ask of a proxy: interim answers, absolute-form targets,
Max-Forwards, and methods it cannot carry."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    billing_sidecar,
    raw_responses,
    raw_until_close,
    raw_upstream,
)

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"


def _headers(head: bytes) -> dict[str, str]:
    """A response head's fields, names lower-cased."""
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines if line)
    }


async def _next_head(reader: asyncio.StreamReader) -> bytes:
    """The next response head on a connection, or b"" if none comes within 5 s."""
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except TimeoutError:
        return b""


def _echoed_headers(body: bytes) -> dict[str, str]:
    """The request fields the harness upstream's /echo received, names lower-cased."""
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


@contextlib.asynccontextmanager
async def _recording_upstream() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A raw upstream that answers every request `200` with no body; yields its endpoint
    and the request heads it received, in order."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async with raw_upstream(serve) as endpoint:
        yield endpoint, heads


class TestInterimResponses:
    async def test_early_hints_reach_an_http11_app_before_the_final_answer(
        self, tmp_path: Path
    ) -> None:
        """An upstream's `103 Early Hints` reaches an HTTP/1.1 app with its Link header
        while the upstream is still working on its answer; the 200 follows."""
        hints_read = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(EARLY_HINTS)
            await writer.drain()
            await hints_read.wait()  # the final answer waits until the app has the hints
            writer.write(FINAL)
            await writer.drain()
            await reader.read()

        async with (
            raw_upstream(serve) as endpoint,
            billing_sidecar(tmp_path, endpoint) as sc,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.app_port)
            try:
                writer.write(b"GET /v1/invoke/billing/page HTTP/1.1\r\nHost: app\r\n\r\n")
                interim = await _next_head(reader)
                hints_read.set()
                final = await _next_head(reader)
                body = await asyncio.wait_for(reader.readexactly(5), 5)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        assert b"HTTP/1.1 103 Early Hints" == interim.split(b"\r\n")[0]
        assert "</style.css>; rel=preload" == _headers(interim).get("link")
        assert final.startswith(b"HTTP/1.1 200"), final
        assert b"final" == body

    async def test_early_hints_are_not_sent_to_an_http10_app(self, tmp_path: Path) -> None:
        """An HTTP/1.0 app, which would take a 1xx for the answer, gets only the 200."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(EARLY_HINTS)
            await writer.drain()
            writer.write(FINAL)
            await writer.drain()
            await reader.read()

        async with (
            raw_upstream(serve) as endpoint,
            billing_sidecar(tmp_path, endpoint) as sc,
        ):
            answer = await raw_until_close(
                sc.app_port, b"GET /v1/invoke/billing/page HTTP/1.0\r\nHost: app\r\n\r\n"
            )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        assert b"103" not in answer
        assert "link" not in _headers(head)
        assert b"final" == body


class TestAbsoluteForm:
    async def test_target_authority_replaces_the_apps_host(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`GET http://billing/echo` with `Host: something-else` reaches the upstream
        with `Host: billing`, and `http://billing:8080/echo` with `Host: billing:8080`
        (RFC 9112 §3.2.2): one Host, the target's."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answers = await raw_responses(
                sc.app_port,
                b"GET http://billing/echo HTTP/1.1\r\nHost: something-else\r\n\r\n"
                b"GET http://billing:8080/echo HTTP/1.1\r\nHost: something-else\r\n\r\n",
                count=2,
            )
        received = []
        for head, body in answers:
            assert head.startswith(b"HTTP/1.1 200"), head
            echo = json.loads(body)
            received.append(
                (echo["path_qs"], [v for k, v in echo["headers"] if k.lower() == "host"])
            )
        assert [("/echo", ["billing"]), ("/echo", ["billing:8080"])] == received

    async def test_options_without_a_path_reaches_the_upstream_as_asterisk(
        self, tmp_path: Path
    ) -> None:
        """`OPTIONS http://billing HTTP/1.1` goes out as `OPTIONS * HTTP/1.1` (RFC 9112
        §3.2.4); with a path of `/`, or for another method, the target is `/`."""
        async with (
            _recording_upstream() as (endpoint, heads),
            billing_sidecar(tmp_path, endpoint) as sc,
        ):
            answers = await raw_responses(
                sc.app_port,
                b"OPTIONS http://billing HTTP/1.1\r\nHost: billing\r\n\r\n"
                b"OPTIONS http://billing/ HTTP/1.1\r\nHost: billing\r\n\r\n"
                b"GET http://billing HTTP/1.1\r\nHost: billing\r\n\r\n",
                count=3,
            )
        assert [b"200"] * 3 == [head.split(b" ")[1] for head, _ in answers]
        assert [b"OPTIONS * HTTP/1.1", b"OPTIONS / HTTP/1.1", b"GET / HTTP/1.1"] == [
            head.split(b"\r\n")[0] for head in heads
        ]


class TestMaxForwards:
    async def test_max_forwards_is_counted_down_on_trace_and_options_only(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`Max-Forwards: 5` on TRACE and OPTIONS reaches the upstream as 4 (RFC 9110
        §7.6.2); on GET it is forwarded unchanged, 0 included."""
        billing = await upstreams("billing")
        requests = [(b"TRACE", b"5"), (b"OPTIONS", b"5"), (b"GET", b"5"), (b"GET", b"0")]
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answers = await raw_responses(
                sc.app_port,
                b"".join(
                    b"%s /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\nMax-Forwards: %s\r\n\r\n"
                    % request
                    for request in requests
                ),
                count=len(requests),
            )
        received = [
            (json.loads(body)["method"], _echoed_headers(body).get("max-forwards"))
            for _, body in answers
        ]
        assert [("TRACE", "4"), ("OPTIONS", "4"), ("GET", "5"), ("GET", "0")] == received

    async def test_options_at_zero_is_answered_by_the_sidecar(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`OPTIONS` with `Max-Forwards: 0` gets 200 with `Allow` from the sidecar, which
        forwards nothing, and the connection carries the next request."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            (head, _), (next_head, _) = await raw_responses(
                sc.app_port,
                b"OPTIONS /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\nMax-Forwards: 0\r\n\r\n"
                b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\n\r\n",
                count=2,
            )
        assert head.startswith(b"HTTP/1.1 200"), head
        allowed = {method.strip() for method in _headers(head).get("allow", "").split(",")}
        assert {"GET", "OPTIONS"} <= allowed, head
        assert "x-sidecar-error" not in _headers(head)
        assert next_head.startswith(b"HTTP/1.1 200"), next_head
        assert 1 == billing.hits  # the GET only

    async def test_trace_at_zero_reflects_the_request_without_credentials(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`TRACE` with `Max-Forwards: 0` gets 200 `message/http` from the sidecar: the
        request line and headers it received, without the values of Authorization,
        Proxy-Authorization and Cookie (RFC 9110 §9.3.8); nothing is forwarded."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            [(head, body)] = await raw_responses(
                sc.app_port,
                b"TRACE /v1/invoke/billing/echo?q=1 HTTP/1.1\r\nHost: app\r\nMax-Forwards: 0\r\n"
                b"X-Visible: yes\r\nAuthorization: Bearer secret-a\r\n"
                b"Proxy-Authorization: Basic secret-p\r\nCookie: session=secret-c\r\n\r\n",
            )
        assert head.startswith(b"HTTP/1.1 200"), head
        assert "message/http" == _headers(head).get("content-type")
        request_line, _, fields = body.partition(b"\r\n")
        assert b"TRACE /v1/invoke/billing/echo?q=1 HTTP/1.1" == request_line
        assert b"x-visible: yes\r\n" in fields.lower()
        assert b"host: app\r\n" in fields.lower()
        assert b"secret" not in body
        assert 0 == billing.hits

    async def test_max_forwards_that_is_no_number_is_400(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`Max-Forwards: abc` on OPTIONS gets 400 BAD_REQUEST; nothing is forwarded."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            [(head, body)] = await raw_responses(
                sc.app_port,
                b"OPTIONS /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\n"
                b"Max-Forwards: abc\r\n\r\n",
            )
        assert (400, "BAD_REQUEST", "BAD_REQUEST") == _error(head + body)
        assert 0 == billing.hits


class TestUnknownMethods:
    async def test_unknown_method_is_501_and_a_malformed_line_still_400(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A well-formed request whose method the sidecar cannot carry (`FROB`) gets 501
        NOT_IMPLEMENTED; bytes that are no request line (text, a TLS hello) still get
        400 BAD_REQUEST. Nothing is forwarded."""
        billing = await upstreams("billing")
        requests = {
            "FROB": b"FROB /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\n\r\n",
            "text": b"GARBAGE\r\n\r\n",
            "tls": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32),
        }
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answers = {name: await raw_until_close(sc.app_port, r) for name, r in requests.items()}
        assert {
            "FROB": (501, "NOT_IMPLEMENTED", "NOT_IMPLEMENTED"),
            "text": (400, "BAD_REQUEST", "BAD_REQUEST"),
            "tls": (400, "BAD_REQUEST", "BAD_REQUEST"),
        } == {name: _error(answer) for name, answer in answers.items()}
        assert 0 == billing.hits

    async def test_unknown_method_after_a_valid_request_is_answered_after_it(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Pipelined after a GET on the same connection, `FROB` gets its 501 after the
        GET's answer; only the GET is forwarded."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answer = await raw_until_close(
                sc.app_port,
                b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\n\r\n"
                b"FROB /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\n\r\n",
            )
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = int(_headers(head)["content-length"])
        echoed, second = rest[:length], rest[length:]
        assert head.startswith(b"HTTP/1.1 200"), answer
        assert "GET" == json.loads(echoed)["method"]
        assert (501, "NOT_IMPLEMENTED", "NOT_IMPLEMENTED") == _error(second)
        assert 1 == billing.hits


def _error(answer: bytes) -> tuple[int, str | None, Any]:
    """(status, x-sidecar-error, the JSON error's code) of one raw answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = body
    return status, _headers(head).get("x-sidecar-error"), code


class TestHost:
    async def test_two_host_fields_are_400(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """RFC 9112 §3.2: a request with more than one Host field line gets 400; nothing
        reaches the upstream (which Host would it be for?)."""
        up = await upstreams("billing")
        request = b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\nHost: evil.example\r\n\r\n"
        async with billing_sidecar(tmp_path, up.endpoint) as sc:
            answer = await raw_until_close(sc.app_port, request)
            one = await raw_until_close(
                sc.app_port,
                b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
            )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer
        assert "Host" in json.loads(body)["error"]["message"]
        assert one.startswith(b"HTTP/1.1 200 "), one
        assert 1 == up.hits
