"""The admin API's own HTTP/1.1 server (sidecar/admin.py `AdminServer`): what clients
nobody here wrote (curl, requests, httpx, aiohttp) and raw sockets see of it.

The endpoints' answers are tested in tests/unit/test_admin.py and through running
sidecars everywhere else; here, the HTTP around them: keep-alive, pipelining, HEAD,
`Expect: 100-continue`, chunked bodies, limits, malformed requests, idle timeout and
closing at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import requests

from sidecar.admin import (
    MAX_BODY,
    MAX_HEAD,
    MAX_PIPELINED,
    AdminAPI,
    AdminRequest,
    AdminServer,
    Answer,
)
from sidecar.config import Address, config_from_mapping
from sidecar.discovery.base import Endpoint
from sidecar.discovery.static import StaticResolver
from sidecar.lifecycle import Readiness
from sidecar.proxy.upstream import Upstream
from sidecar.telemetry.logging import current_log_level, set_log_level
from sidecar.telemetry.metrics import Metrics
from tests.integration.harness import (
    billing_sidecar,
    eventually,
    raw_responses,
    raw_until_close,
)

CONFIG = config_from_mapping(
    {
        "service": {"name": "admin-http"},
        "consul": {"enabled": False},
        "upstreams": {"billing": {"endpoints": ["127.0.0.1:9"]}},
    },
    {},
)


def make_api(shutdowns: list[str] | None = None) -> AdminAPI:
    metrics = Metrics()
    billing = Upstream(
        CONFIG.upstreams["billing"], StaticResolver([Endpoint("127.0.0.1", 9)]), metrics
    )
    requested = shutdowns.append if shutdowns is not None else None
    return AdminAPI(CONFIG, Readiness(), {"billing": billing}, metrics, request_shutdown=requested)


@asynccontextmanager
async def serving(
    api: AdminAPI | None = None, keepalive_s: float = 75.0
) -> AsyncIterator[tuple[AdminServer, int]]:
    server = AdminServer(api or make_api(), keepalive_s=keepalive_s)
    listening = await server.start(Address("127.0.0.1", 0))
    try:
        yield server, listening.sockets[0].getsockname()[1]
    finally:
        await server.close()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode()


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode()
    return None


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        check=True,
    )


class TestClients:
    async def test_requests_session_keeps_one_connection(self) -> None:
        """requests.Session: three GETs on one connection, each answered as JSON."""
        async with serving() as (server, port):

            def three(session: requests.Session) -> list[tuple[int, str, object]]:
                answers = []
                for path in ("/live", "/ready", "/live"):
                    resp = session.get(f"http://127.0.0.1:{port}{path}", timeout=5)
                    answers.append((resp.status_code, resp.headers["Content-Type"], resp.json()))
                return answers

            # Counted while the session is still open: once it closes, the server may
            # already have dropped the connection.
            with requests.Session() as session:
                answers = await asyncio.to_thread(three, session)
                connections = len(server.connections)
        assert [
            (200, "application/json; charset=utf-8", {"live": True}),
            (200, "application/json; charset=utf-8", {"ready": True}),
            (200, "application/json; charset=utf-8", {"live": True}),
        ] == answers
        assert 1 == connections

    async def test_curl_head_has_the_get_length_and_no_body(self) -> None:
        """`curl -I`: HEAD answers 200 with the Content-Length of the GET, no body."""
        async with serving() as (_, port):
            got = await asyncio.to_thread(curl, f"http://127.0.0.1:{port}/v1/status")
            head = await asyncio.to_thread(curl, "-I", f"http://127.0.0.1:{port}/v1/status")
        lines = head.stdout.splitlines()
        assert "HTTP/1.1 200 OK" == lines[0]
        length = next(line for line in lines if line.lower().startswith("content-length:"))
        assert f"content-length: {len(got.stdout.encode())}" == length.lower()
        assert "admin-http" == json.loads(got.stdout)["service"]["name"]

    async def test_curl_expect_100_continue_then_the_body(self) -> None:
        """curl sending `Expect: 100-continue` gets 100 Continue, sends the body, and the
        log level changes."""
        previous = current_log_level()
        try:
            async with serving() as (_, port):
                done = await asyncio.to_thread(
                    curl,
                    "-X",
                    "PUT",
                    "-H",
                    "Expect: 100-continue",
                    "--data",
                    "warning",
                    "-w",
                    "\n%{http_code}",
                    f"http://127.0.0.1:{port}/v1/log-level",
                )
            body, code = done.stdout.rsplit("\n", 1)
            assert ("200", "warning") == (code, json.loads(body)["level"])
            assert "warning" == current_log_level()
        finally:
            set_log_level(previous)

    async def test_httpx_chunked_body(self) -> None:
        """A chunked request body (httpx with a generator) is read whole."""
        previous = current_log_level()

        def chunks() -> Iterator[bytes]:
            yield b'{"level": '
            yield b'"error"}'

        try:
            async with serving() as (_, port):

                def put() -> httpx.Response:
                    url = f"http://127.0.0.1:{port}/v1/log-level"
                    return httpx.put(url, content=chunks(), timeout=5)

                resp = await asyncio.to_thread(put)
            assert (200, "error") == (resp.status_code, resp.json()["level"])
        finally:
            set_log_level(previous)

    async def test_curl_h2c_upgrade_is_answered_in_http11(self) -> None:
        """curl --http2 on plain HTTP asks to upgrade to h2c: the admin API answers in
        HTTP/1.1 and the request is not lost."""
        async with serving() as (_, port):
            done = await asyncio.to_thread(curl, "--http2", "-i", f"http://127.0.0.1:{port}/live")
        assert done.stdout.startswith("HTTP/1.1 200 OK")
        assert {"live": True} == json.loads(done.stdout.split("\n\n", 1)[1])  # text mode: \n


class TestWire:
    async def test_pipelined_requests_are_answered_in_order(self) -> None:
        """More requests in one write than the server reads ahead: every one answered,
        in the order sent."""
        paths = ["/live", "/nope", "/ready"] * MAX_PIPELINED
        async with serving() as (_, port):
            answers = await raw_responses(port, b"".join(get(p) for p in paths), len(paths))
        expected = [200, 404, 200] * MAX_PIPELINED
        assert expected == [status_of(head) for head, _ in answers]
        assert {"live": True} == json.loads(answers[-3][1])

    async def test_http10_is_answered_and_closed(self) -> None:
        """HTTP/1.0 without keep-alive: one answer saying `Connection: close`, then EOF."""
        async with serving() as (_, port):
            raw = await raw_until_close(port, b"GET /live HTTP/1.0\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert (200, "close", {"live": True}) == (
            status_of(head),
            header(head, "Connection"),
            json.loads(body),
        )

    async def test_connection_close_ends_after_the_answer(self) -> None:
        """`Connection: close` is honoured; a request pipelined after it is not answered."""
        data = b"GET /live HTTP/1.1\r\nConnection: close\r\n\r\n" + get("/ready")
        async with serving() as (_, port):
            raw = await raw_until_close(port, data)
        assert 1 == raw.count(b"HTTP/1.1 ")
        assert b'{"live": true}' == raw.partition(b"\r\n\r\n")[2]

    async def test_malformed_request_is_400_json_and_closed(self) -> None:
        """Bytes that are not HTTP/1.x: 400 BAD_REQUEST in JSON, then the connection closes."""
        async with serving() as (_, port):
            raw = await raw_until_close(port, b"HELLO\x00 THERE\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert (400, "BAD_REQUEST") == (status_of(head), json.loads(body)["error"]["code"])

    async def test_a_request_after_a_good_one_that_is_malformed(self) -> None:
        """A good request then garbage on one connection: the good one is answered first."""
        async with serving() as (_, port):
            raw = await raw_until_close(port, get("/live") + b"\x01\x02 junk\r\n\r\n")
        statuses = [int(part[:3]) for part in raw.split(b"HTTP/1.1 ")[1:]]
        assert [200, 400] == [s for s in statuses if s in (200, 400)]

    @pytest.mark.parametrize("end", [b"\r\n\r\n", b""], ids=["complete", "endless"])
    async def test_oversized_head_is_431(self, end: bytes) -> None:
        """A head over MAX_HEAD bytes, whole or still coming: 431, closed."""
        huge = b"GET /live HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEAD + 1) + end
        async with serving() as (_, port):
            raw = await raw_until_close(port, huge)
        assert (431, "HEADERS_TOO_LARGE") == (
            status_of(raw),
            json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"],
        )

    async def test_oversized_body_is_413_and_the_level_stays(self) -> None:
        """A body over MAX_BODY: 413 BODY_TOO_LARGE, connection closed, nothing changed."""
        previous = current_log_level()
        body = b"d" * (MAX_BODY + 1)
        data = (b"PUT /v1/log-level HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
        async with serving() as (_, port):
            raw = await raw_until_close(port, data)
        head, _, answer = raw.partition(b"\r\n\r\n")
        assert (413, "BODY_TOO_LARGE", previous) == (
            status_of(head),
            json.loads(answer)["error"]["code"],
            current_log_level(),
        )

    async def test_query_string_and_encoded_names(self) -> None:
        """The query is not part of the path; a percent-encoded upstream name is decoded."""
        async with serving() as (_, port):
            answers = await raw_responses(
                port,
                get("/ready?verbose=1")
                + b"POST /v1/breakers/bill%69ng/reset HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                2,
            )
        assert [200, 200] == [status_of(head) for head, _ in answers]
        assert "billing" == json.loads(answers[1][1])["upstream"]

    async def test_a_failing_endpoint_is_500_and_the_server_goes_on(self) -> None:
        """An endpoint that raises: 500 INTERNAL, and the next request on the same
        connection is answered."""
        api = make_api()

        async def broken(_: AdminRequest) -> Answer:
            raise RuntimeError("bug")

        api.routes.insert(0, (re.compile("/broken"), {"GET": broken}))
        async with serving(api) as (_, port):
            answers = await raw_responses(port, get("/broken") + get("/live"), 2)
        assert [(500, "INTERNAL"), (200, None)] == [
            (status_of(head), json.loads(body).get("error", {}).get("code"))
            for head, body in answers
        ]


class TestLifetime:
    async def test_an_idle_keep_alive_connection_is_closed(self) -> None:
        """After the keep-alive timeout with nothing asked, the server closes the connection."""
        async with serving(keepalive_s=0.2) as (server, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(get("/live"))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                await reader.readexactly(int(header(head, "Content-Length") or 0))
                assert b"" == await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
                await writer.wait_closed()
            assert 0 == len(server.connections)

    async def test_close_ends_idle_connections_and_refuses_new_ones(self) -> None:
        """At shutdown an idle keep-alive client sees EOF and the port stops accepting."""
        server = AdminServer(make_api())
        listening = await server.start(Address("127.0.0.1", 0))
        port = listening.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(get("/live"))
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            await server.close()
            rest = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
            await writer.wait_closed()
        assert b'{"live": true}' == rest
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    async def test_the_shutdown_answer_goes_out_before_the_close(self) -> None:
        """POST /v1/shutdown followed at once by the server's close: the client still
        reads its 202, marked `Connection: close`."""
        shutdowns: list[str] = []
        server = AdminServer(make_api(shutdowns))
        listening = await server.start(Address("127.0.0.1", 0))
        port = listening.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /v1/shutdown HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            while not shutdowns:  # the endpoint ran: close as the app would, right away
                await asyncio.sleep(0)
            await server.close()
            raw = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
            await writer.wait_closed()
        assert 202 == status_of(raw)
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["shutting_down"]


def big_api(size: int, handled: list[str] | None = None) -> AdminAPI:
    """The admin API plus `/big` (a `size`-byte answer) and `/a`, `/b` (tiny ones), each
    call recorded in `handled`."""
    api = make_api()
    seen = handled if handled is not None else []

    def endpoint(name: str, body: bytes) -> Callable[[AdminRequest], Awaitable[Answer]]:
        async def answer(_: AdminRequest) -> Answer:
            seen.append(name)
            return Answer(200, body, "application/octet-stream")

        return answer

    api.routes[:0] = [
        (re.compile("/big"), {"GET": endpoint("big", b"x" * size)}),
        (re.compile("/a"), {"GET": endpoint("a", b"a")}),
        (re.compile("/b"), {"GET": endpoint("b", b"b")}),
    ]
    return api


class TestHostileClients:
    """Found by a review: one admin client must not stall the sidecar or grow its memory."""

    async def test_a_long_pipeline_does_not_hold_up_other_connections(self) -> None:
        """A thousand pipelined requests are answered one turn of the loop at a time: a
        request on another connection, sent once the first answer is in, is answered
        before the pipeline is done."""
        handled: list[str] = []
        async with serving(big_api(1, handled)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(get("/a") * 1000)
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                answers = await raw_responses(port, get("/b"))
            finally:
                writer.close()
                await writer.wait_closed()
        assert 200 == status_of(answers[0][0])
        assert handled.index("b") < len(handled) - 1, "the whole pipeline went first"

    async def test_a_client_that_does_not_read_is_not_buffered_without_end(self) -> None:
        """Pipelined requests for 1 MB answers, never read: the server stops answering
        once its buffer is full, and cuts the client after the keep-alive timeout."""
        handled: list[str] = []
        async with serving(big_api(1 << 20, handled), keepalive_s=0.5) as (server, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(get("/big") * 100)
                paused = lambda: any(c.writable for c in server.connections)  # noqa: E731
                await eventually("writing paused", paused)
                await eventually("the client cut", lambda: not server.connections)
            finally:
                writer.close()
        # Only what the kernel's buffers took was answered (a few, as they filled).
        assert len(handled) < 100

    async def test_a_closing_connection_whose_answer_is_never_read_is_cut(self) -> None:
        """HTTP/1.0: the answer, then a close that waits for it to be read, but not
        forever: cut after the keep-alive timeout."""
        async with serving(big_api(8 << 20), keepalive_s=0.3) as (server, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /big HTTP/1.0\r\n\r\n")
                await eventually("the answer buffered", lambda: bool(server.connections))
                await eventually("the client cut", lambda: not server.connections)
            finally:
                writer.close()

    async def test_a_body_declared_too_large_is_refused_at_once(self) -> None:
        """Content-Length over MAX_BODY with `Expect: 100-continue`: 413 straight away,
        no `100 Continue` inviting a body the server would not keep."""
        data = b"PUT /v1/log-level HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        data += b"Content-Length: %d\r\n\r\n" % (200 << 20)
        async with serving() as (_, port):
            raw = await raw_until_close(port, data)
        assert raw.startswith(b"HTTP/1.1 413 "), raw
        assert b"100 Continue" not in raw

    async def test_endless_trailers_are_refused(self) -> None:
        """A chunked body whose trailer section never ends (the parser buffers a field
        whole): 413 once the message passes MAX_BODY + MAX_HEAD bytes, then closed."""
        start = b"PUT /v1/log-level HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        start += b"4\r\ninfo\r\n0\r\nX-Trailer: "
        async with serving() as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(start)
                for _ in range(64):  # 4 MiB of one trailer value, unless cut before
                    writer.write(b"t" * 65536)
                    try:
                        await writer.drain()
                    except ConnectionError:
                        break
                raw = await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
        assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]

    async def test_100_continue_only_to_http11_and_in_order(self) -> None:
        """Not to HTTP/1.0 (RFC 9110 §10.1.1), and never ahead of the answer to an
        earlier pipelined request."""
        body = b'{"level": "info"}'
        put = b"PUT /v1/log-level HTTP/1.%d\r\nHost: a\r\nExpect: 100-continue\r\n"
        put += b"Content-Length: %d\r\n\r\n" % len(body)
        async with serving() as (_, port):
            old = await raw_until_close(port, (put % 0) + body)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(get("/live") + (put % 1))
                first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                await reader.readexactly(int(header(first, "Content-Length") or 0))
                writer.write(body)
                second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            finally:
                writer.close()
                await writer.wait_closed()
        assert b"100 Continue" not in old
        assert old.startswith(b"HTTP/1.1 200 ")
        assert (200, 200) == (status_of(first), status_of(second))

    async def test_absolute_form_targets_and_other_versions(self) -> None:
        """`GET http://host/live` is `/live` (RFC 9112 §3.2.2); HTTP/2.0 in a request
        line is not HTTP/1.x: 400."""
        async with serving() as (_, port):
            answers = await raw_responses(
                port, b"GET http://127.0.0.1/live?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            other = await raw_until_close(port, b"GET /live HTTP/2.0\r\nHost: a\r\n\r\n")
        assert {"live": True} == json.loads(answers[0][1])
        assert 400 == status_of(other)


async def test_a_sidecar_without_consul_does_not_load_aiohttp(tmp_path: Path) -> None:
    """A running sidecar with static upstreams and no alerts or subscriptions has no
    aiohttp in memory (it was ~13 MB of RSS), and its admin API answers curl."""
    async with billing_sidecar(tmp_path, "127.0.0.1:9") as sidecar:
        assert sidecar.proc is not None
        maps = await asyncio.to_thread(Path(f"/proc/{sidecar.proc.pid}/maps").read_text)
        live = await asyncio.to_thread(curl, f"{sidecar.admin}/live")
    assert {"live": True} == json.loads(live.stdout)
    assert "uvloop" in maps or "_asyncio" in maps  # the check reads the right process
    assert "aiohttp" not in maps
