"""The Consul client's HTTP/1.1 pool (sidecar/discovery/http_client.py), against raw
servers that answer in the ways real ones do: kept-alive, chunked (Go's net/http for a
large answer), delimited by the close, closed while idle, cut mid-answer, malformed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.discovery.http_client import HTTPClientError, Pool
from tests.integration.consul_harness import ConsulSidecar, running_consul, service_config
from tests.integration.harness import raw_upstream


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body) as bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Consul-Index: 7\r\n\r\nok"


def pool(url: str) -> Pool:
    return Pool(url, None, name="Consul")


class TestAnswers:
    async def test_kept_alive_connection_serves_the_next_request(self) -> None:
        """Two requests, one connection; the request carries Host, its body and length;
        headers are looked up in any case."""
        seen: list[bytes] = []
        connections = 0

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            while True:
                seen.append(await read_request(reader))
                writer.write(OK)

        async with raw_upstream(answer) as endpoint:
            url = f"http://{endpoint}"
            client = pool(url)
            first = await client.request("PUT", f"{url}/v1/agent/x?a=1", b"{}", {"X-T": "t"})
            second = await client.request("GET", f"{url}/v1/status/leader")
            await client.close()
        assert (200, b"ok", "7", "7") == (
            first.status,
            first.body,
            first.headers["x-consul-index"],
            second.headers["X-Consul-Index"],
        )
        assert 1 == connections
        host = url.removeprefix("http://")
        assert seen[0] == (
            f"PUT /v1/agent/x?a=1 HTTP/1.1\r\nHost: {host}\r\n".encode()
            + seen[0].split(b"\r\n", 3)[2]  # User-Agent
            + b"\r\nX-T: t\r\nContent-Length: 2\r\n\r\n{}"
        )
        assert seen[1].startswith(b"GET /v1/status/leader HTTP/1.1\r\n")
        assert b"content-length" not in seen[1].lower()

    async def test_chunked_and_close_delimited_bodies_are_read_whole(self) -> None:
        """A chunked answer and one that ends with the connection both arrive whole; the
        second connection is not pooled."""
        answers = iter(
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\n[1,\r\n3\r\n 2]\r\n0\r\n\r\n",
                b"HTTP/1.0 200 OK\r\n\r\n[3, 4]",
            ]
        )

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(next(answers))
            await writer.drain()

        async with raw_upstream(answer) as endpoint:
            url = f"http://{endpoint}"
            client = pool(url)
            chunked = await client.request("GET", f"{url}/a")
            delimited = await client.request("GET", f"{url}/b")
            idle = len(client._idle)
            await client.close()
        assert (b"[1, 2]", b"[3, 4]", 0) == (chunked.body, delimited.body, idle)

    async def test_repeated_headers_are_joined(self) -> None:
        """A header sent twice reads as both values, comma-joined, in any case."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nVary: a\r\nvary: b\r\nContent-Length: 0\r\n\r\n")

        async with raw_upstream(answer) as endpoint:
            url = f"http://{endpoint}"
            client = pool(url)
            got = await client.request("GET", f"{url}/")
            await client.close()
        assert "a, b" == got.headers.get("VARY")


class TestFailures:
    async def test_a_kept_alive_connection_the_server_closed_is_replaced(self) -> None:
        """The server answers one request per connection and closes it without saying so:
        the next request goes out once more on a new connection and succeeds."""
        connections = 0

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            await read_request(reader)
            writer.write(OK)
            await writer.drain()

        async with raw_upstream(answer) as endpoint:
            url = f"http://{endpoint}"
            client = pool(url)
            await client.request("GET", f"{url}/1")
            while not client._idle[-1][0].at_eof():  # the close has reached the client
                await asyncio.sleep(0.01)
            second = await client.request("GET", f"{url}/2")
            await client.close()
        assert (200, 2) == (second.status, connections)

    @pytest.mark.parametrize(
        ("sent", "message"),
        [
            (b"", "Consul closed the connection without an answer"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                "Consul closed the connection mid-answer",
            ),
            (b"NOT HTTP\r\n\r\n", "Consul sent a malformed answer"),
        ],
        ids=["nothing", "cut", "malformed"],
    )
    async def test_a_broken_answer_is_an_error_naming_the_server(
        self, sent: bytes, message: str
    ) -> None:
        """Nothing, half an answer or not HTTP: an error naming Consul and what happened."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(sent)
            await writer.drain()

        async with raw_upstream(answer) as endpoint:
            url = f"http://{endpoint}"
            client = pool(url)
            with pytest.raises(HTTPClientError) as info:
                await client.request("GET", f"{url}/")
            await client.close()
        assert str(info.value).startswith(message)

    async def test_a_cancelled_request_does_not_pool_its_connection(self) -> None:
        """A request cut by the caller's timeout leaves no connection behind to be read
        by the next request (it would get the late answer)."""
        release = asyncio.Event()

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            await release.wait()
            writer.write(OK)
            await writer.drain()

        async with raw_upstream(answer) as endpoint:
            url = f"http://{endpoint}"
            client = pool(url)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await client.request("GET", f"{url}/slow")
            state = (len(client._idle), len(client._busy))
            release.set()
            await client.close()
        assert (0, 0) == state

    async def test_closed_pool_refuses(self) -> None:
        """After close(), a request fails at once, saying the client is closed."""
        client = pool("http://127.0.0.1:9")
        await client.close()
        with pytest.raises(HTTPClientError, match="closed"):
            await client.request("GET", "http://127.0.0.1:9/")


async def test_a_sidecar_registered_in_consul_does_not_load_aiohttp(tmp_path: Path) -> None:
    """With Consul on (and no alerts or subscriptions), the running sidecar registers and
    has no aiohttp in memory: the Consul client is this pool."""
    async with running_consul() as consul:
        sidecar = ConsulSidecar(tmp_path, consul, service_config("billing", 9, health_path=None))
        sidecar.start()
        try:
            await sidecar.wait_ready()
            assert sidecar.proc is not None
            maps = await asyncio.to_thread(Path(f"/proc/{sidecar.proc.pid}/maps").read_text)
            registered = "billing-1" in consul.services()
        finally:
            sidecar.kill()
    assert registered
    assert "httptools" in maps  # the check reads the right process
    assert "aiohttp" not in maps
