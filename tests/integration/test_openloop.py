"""The benchmark's open-loop load generator (tests/perf/openloop.c) counts honestly.

Its tail numbers are only worth reading if a stall of the server delays, in the
count, every request that fell due during it (not just the few in flight: that is
what a closed-loop tool such as wrk records), and if failed answers and dropped
connections are counted as failures, not as fast answers. A small asyncio server
here stalls, fails or drops requests on purpose.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "perf" / "openloop.c"
RATE = 2000
SECONDS = 2
DUE = RATE * SECONDS

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

#: What the server does with the n-th request (counted from 1 over all connections).
Behaviour = Callable[[int], str]


@pytest.fixture(scope="module")
def openloop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built with AddressSanitizer and UBSan: any memory error or undefined behaviour
    (a list overrun, a bad index) ends the run with an error status."""
    binary = tmp_path_factory.mktemp("openloop") / "openloop"
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    subprocess.run(["cc", "-O1", "-g", *sanitize, "-o", str(binary), str(SOURCE)], check=True)
    return binary


@asynccontextmanager
async def server(behaviour: Behaviour) -> AsyncIterator[int]:
    """An HTTP/1.1 keep-alive server on an ephemeral port, doing `behaviour(n)` to the
    n-th request: "ok" (200), "fail" (500), "drop" (close without answering), "stall"
    (block the whole server 60 ms, then answer 200), "close" (answer 200 with
    `Connection: close`, and close) or "idle" (answer 200, then close the connection
    once it has been idle 2 ms, unannounced, as a keep-alive timeout does)."""
    count = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        action = "ok"
        try:
            while True:
                try:
                    head = reader.readuntil(b"\r\n\r\n")
                    await (asyncio.wait_for(head, 0.002) if action == "idle" else head)
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    return
                count += 1
                action = behaviour(count)
                if action == "drop":
                    return
                if action == "stall":
                    time.sleep(0.06)  # noqa: ASYNC251 - the whole server stalls, on purpose
                status = b"500 Internal Server Error" if action == "fail" else b"200 OK"
                close = b"Connection: close\r\n" if action == "close" else b""
                writer.write(b"HTTP/1.1 %s\r\n%sContent-Length: 2\r\n\r\nok" % (status, close))
                await writer.drain()
                if action == "close":
                    return
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def load(openloop: Path, port: int, rate: int = RATE, warmup: int = 0) -> dict[str, float]:
    """Requests due at `rate` per second for SECONDS after `warmup` seconds, over 4
    connections; every one of them is either answered or an error."""
    proc = await asyncio.create_subprocess_exec(
        str(openloop),
        *("-c", "4", "-r", str(rate), "-d", str(SECONDS), "-w", str(warmup)),
        *("127.0.0.1", str(port), "/"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"},  # its arrays live to the end
    )
    out, err = await asyncio.wait_for(proc.communicate(), SECONDS + warmup + 20)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    result: dict[str, float] = json.loads(out)
    assert result["due"] == rate * SECONDS
    assert result["answered"] + result["errors"] == result["due"]
    return result


async def test_a_stall_counts_against_every_request_due_during_it(openloop: Path) -> None:
    async with server(lambda n: "stall" if n == 500 else "ok") as port:
        result = await load(openloop, port)
    assert (result["due"], result["answered"], result["errors"]) == (DUE, DUE, 0)
    # About 120 requests fall due in the 60 ms: the worst 1 % (40) waited 40-60 ms. A
    # tool that counts from when it sent would see 4 slow requests (one per connection).
    assert result["p99_us"] >= 20_000
    assert result["late_sends"] > 0  # due while all 4 connections were taken


async def test_answers_other_than_200_are_failures(openloop: Path) -> None:
    async with server(lambda n: "fail" if n % 10 == 0 else "ok") as port:
        result = await load(openloop, port)
    assert (result["answered"], result["errors"]) == (DUE - DUE // 10, DUE // 10)


async def test_a_connection_dropped_under_a_request_fails_it_and_is_replaced(
    openloop: Path,
) -> None:
    async with server(lambda n: "drop" if n % 100 == 0 else "ok") as port:
        result = await load(openloop, port)
    assert (result["answered"], result["errors"]) == (DUE - DUE // 100, DUE // 100)


async def test_a_connection_whose_answer_says_close_is_replaced(openloop: Path) -> None:
    """`Connection: close` on every answer: the next request goes on a new connection,
    never on the closing one, and each connection, counted once as idle, carries one
    request at a time."""
    async with server(lambda n: "close") as port:
        result = await load(openloop, port, rate=500)
    assert (result["answered"], result["errors"]) == (1000, 0)


async def test_a_connection_closed_while_idle_is_replaced_without_a_failure(
    openloop: Path,
) -> None:
    """A keep-alive timeout (unannounced, 2 ms after each answer; requests 50 ms apart,
    so a request never meets a connection being closed)."""
    async with server(lambda n: "idle") as port:
        result = await load(openloop, port, rate=20)
    assert (result["answered"], result["errors"], result["unsolicited"]) == (40, 0, 0)


async def test_failures_in_the_warm_up_are_not_counted(openloop: Path) -> None:
    """`-w 1`: requests due in the first second are sent, but not counted."""
    async with server(lambda n: "fail" if n <= RATE // 2 else "ok") as port:
        result = await load(openloop, port, warmup=1)
    assert (result["answered"], result["errors"]) == (DUE, 0)
