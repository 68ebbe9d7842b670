"""Real processes for integration tests: the `sidecar run` daemon, aiohttp upstreams and
gunicorn serving httpbin.

Everything binds 127.0.0.1 on ephemeral ports and is stopped by the fixtures
that start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Self

import aiohttp
import httptools
import yaml
from aiohttp import web

# Ports are handed out from below the kernel's ephemeral range (32768-60999 on Linux), so a
# later bind to port 0 - an upstream, a client socket - can never take one before the sidecar
# binds it; and never twice in one run, so two addresses in one config never collide.
_PORT_RANGE = range(20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A 127.0.0.1 port that is free now and was not handed out before in this run."""
    for _ in range(1000):
        port = random.choice(_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port found in {_PORT_RANGE}")


async def eventually(what: str, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `done()` until it holds; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s")
        await asyncio.sleep(0.01)


async def eventually_equal(
    what: str, expected: object, probe: Callable[[], Awaitable[object]], timeout: float = 10.0
) -> None:
    """Poll `await probe()` until it returns `expected` (a queue's depth, a gauge on
    /metrics: state that settles asynchronously); AssertionError with the last value
    after `timeout`."""
    deadline = time.monotonic() + timeout
    while (actual := await probe()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: {expected!r} expected, still {actual!r} after {timeout}s"
            )
        await asyncio.sleep(0.02)


def proc_number(pid: int, name: str, prefix: str, column: int) -> int:
    """A number from /proc/<pid>/<name>: field `column` of the line starting with `prefix`
    (`proc_number(pid, "io", "syscw:", 1)`)."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(prefix):
            return int(line.split()[column])
    raise AssertionError(f"no {prefix!r} in /proc/{pid}/{name}")


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """Run `app` on 127.0.0.1 (`port`, or a free one); its runner (to clean up) and port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def wait_http_ok(
    name: str,
    proc: subprocess.Popen[bytes],
    url: str,
    logs: Callable[[], str],
    timeout: float,
) -> None:
    """Poll `url` until it answers 200; AssertionError with the process's log if it exits
    first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{logs()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{name} not ready after {timeout:g}s:\n{logs()}")


async def poll_json(
    session: aiohttp.ClientSession,
    url: str,
    done: Callable[[int, Any], bool],
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """GET `url` until `done(status, json)` holds or `timeout` passes; the last answer.

    For waiting on a state change (a signal handled, `open_for` passed) without a
    fixed sleep that a slow machine could outrun.
    """
    deadline = time.monotonic() + timeout
    while True:
        async with session.get(url) as resp:
            answer = (resp.status, await resp.json())
        if done(*answer) or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.01)


async def settled_status(sidecar: Sidecar, upstream: str = "billing") -> dict[str, Any]:
    """`upstream`'s entry in /v1/status once no request to it is in flight.

    The sidecar settles an exchange (the endpoint's verdict, the breaker's) as it ends,
    which can be just after the app has its answer; waiting for `in_flight` 0 makes
    what is read final.
    """
    async with aiohttp.ClientSession() as session:
        _, status = await poll_json(
            session,
            f"{sidecar.admin}/v1/status",
            lambda _, status: status["upstreams"][upstream]["in_flight"] == 0,
        )
    entry: dict[str, Any] = status["upstreams"][upstream]
    return entry


def unblamed(entry: dict[str, Any]) -> bool:
    """Whether an upstream's /v1/status entry holds nothing against it: circuit closed,
    and no endpoint with a failure counted or ejected."""
    return entry["circuit"] == "closed" and all(
        e["consecutive_failures"] == 0 and not e["ejected"] for e in entry["endpoints"]
    )


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


async def metric_samples(sidecar: Sidecar) -> dict[str, float]:
    """The sidecar's /metrics as {'name{a="1",b="2"}': value}, labels sorted by name."""
    async with aiohttp.ClientSession() as session, session.get(f"{sidecar.admin}/metrics") as resp:
        text = await resp.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name, brace, labels = series.partition("{")
            if brace:
                pairs = sorted(_LABEL.findall(labels))
                name += "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"
            samples[name] = float(value)
    return samples


async def raw_until_close(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return everything read until the peer closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()


async def raw_responses(
    port: int, data: bytes, count: int = 1, bodiless: Collection[int] = ()
) -> list[tuple[bytes, bytes]]:
    """Send raw bytes and read `count` Content-Length-framed responses as (head, body);
    the responses numbered in `bodiless` (answers to HEAD) have no body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        writer.write(data)
        for i in range(count):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if i in bodiless:
                answers.append((head, b""))
                continue
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            answers.append((head, await reader.readexactly(length)))
        return answers
    finally:
        writer.close()
        await writer.wait_closed()


class ResponseCounter:
    """Counts the complete responses in a stream of pipelined ones (httptools callbacks):
    feed what is read to `parser`."""

    def __init__(self) -> None:
        self.count = 0
        self.statuses: set[int] = set()
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.count += 1
        self.statuses.add(self.parser.get_status_code())


def connect_reader(sock: socket.socket, port: int, rcvbuf: int) -> None:
    """Connect `sock` to 127.0.0.1:port as an app whose receive buffer is `rcvbuf` bytes
    (a small one makes a slow reader), non-blocking for the loop's `sock_*` calls."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(handler: RawHandler) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 that runs `handler` per connection, for upstreams that
    misbehave below HTTP; yields its endpoint ("127.0.0.1:port").

    On exit every handler is cancelled and awaited and every connection closed, so
    nothing outlives the test's event loop (Python 3.11's `Server.wait_closed` does
    not wait for open connections).
    """
    tasks: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the sidecar closed the connection: how most of these handlers end
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports run connection_lost


class Gunicorn:
    """gunicorn serving httpbin with sync workers: a real upstream nobody here wrote.

    It runs in a session of its own, so `stop` ends the master and every worker it
    forked: SIGTERM (workers get `--graceful-timeout 1`), then SIGKILL to the whole
    group for whatever is left after 5 s, then the master is reaped.
    """

    def __init__(self, log_path: Path, workers: int = 2) -> None:
        self.port = free_port()
        self.workers = workers
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Gunicorn:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--bind",
                    self.endpoint,
                    "--workers",
                    str(self.workers),
                    "--graceful-timeout",
                    "1",
                    "httpbin:app",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def wait_answering(self, timeout: float = 30.0) -> None:
        """Poll `GET /status/200` until 200; fail with gunicorn's log if it never comes."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"gunicorn exited {self.proc.returncode}:\n{self.logs()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://{self.endpoint}/status/200") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError(f"gunicorn not answering after {timeout}s:\n{self.logs()}")

    def _exited(self) -> bool:
        """Whether the master exited, without reaping it: while it is not reaped its pid,
        which is the group's id, cannot be reused, so the group can still be killed."""
        assert self.proc is not None
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, self.proc.pid, flags) is not None

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the group (workers a master did not stop), then
        reap the master."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        deadline = time.monotonic() + 5
        while not self._exited() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._kill_group()


@contextlib.asynccontextmanager
async def gunicorn_httpbin(log_path: Path, workers: int = 2) -> AsyncIterator[str]:
    """gunicorn + httpbin on a free port, once it answers; yields its endpoint
    ("127.0.0.1:port"). Stopped, workers included, and reaped on exit."""
    server = Gunicorn(log_path, workers).start()
    try:
        await server.wait_answering()
        yield server.endpoint
    finally:
        await server.stop()


class Upstream:
    """An aiohttp app that plays one instance of an upstream service.

    Routes: `/echo/...` answers what it received as JSON; `/status/{code}` answers
    that status; `/slow?delay=S` waits first; `/upload` hashes a streamed body;
    `/download?size=N` streams N bytes; `/flaky` answers 500 while `self.failing`;
    `/truncate` promises 1000 bytes, sends 10 and drops the connection; `/chunked`
    sends three chunks.
    `hits` counts requests received.
    """

    def __init__(self, name: str = "upstream") -> None:
        self.name = name
        self.hits = 0
        self.failing = False
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.hits += 1
            result: web.StreamResponse = await handler(request)
            return result

        app.middlewares.append(count)

        async def echo(request: web.Request) -> web.Response:
            body = await request.read()
            return web.json_response(
                {
                    "instance": self.name,
                    "method": request.method,
                    "path_qs": request.raw_path,
                    "headers": [
                        [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
                    ],
                    "body": body.decode("latin-1"),
                }
            )

        async def status(request: web.Request) -> web.Response:
            code = int(request.match_info["code"])
            return web.json_response({"instance": self.name, "status": code}, status=code)

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(float(request.query.get("delay", "1")))
            return web.json_response({"instance": self.name, "slow": True})

        async def upload(request: web.Request) -> web.Response:
            digest = hashlib.sha256()
            size = 0
            async for chunk in request.content.iter_chunked(1 << 16):
                digest.update(chunk)
                size += len(chunk)
            return web.json_response({"size": size, "sha256": digest.hexdigest()})

        async def download(request: web.Request) -> web.StreamResponse:
            size = int(request.query["size"])
            resp = web.StreamResponse()
            resp.content_length = size
            await resp.prepare(request)
            block = bytes(range(256)) * 256  # 64 KiB, deterministic
            sent = 0
            while sent < size:
                piece = block[: min(len(block), size - sent)]
                await resp.write(piece)
                sent += len(piece)
            await resp.write_eof()
            return resp

        async def truncate(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            resp.content_length = 1000
            await resp.prepare(request)
            await resp.write(b"0123456789")
            assert request.transport is not None
            request.transport.abort()  # die mid-body
            return resp

        async def chunked(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(3):
                await resp.write(b"part%d\n" % i)
            await resp.write_eof()
            return resp

        async def flaky(request: web.Request) -> web.Response:
            if self.failing:
                return web.json_response({"instance": self.name, "failing": True}, status=500)
            return web.json_response({"instance": self.name, "ok": True})

        app.router.add_route("*", "/echo{tail:.*}", echo)
        app.router.add_route("*", "/status/{code}", status)
        app.router.add_get("/slow", slow)
        app.router.add_post("/upload", upload)
        app.router.add_put("/upload", upload)
        app.router.add_get("/download", download)
        app.router.add_route("*", "/flaky", flaky)
        app.router.add_get("/truncate", truncate)
        app.router.add_get("/chunked", chunked)
        return app

    async def start(self, port: int = 0) -> Upstream:
        self._runner, self.port = await serve(self._app(), port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


#: Set by test_compiled.py for the integration tests it runs on the compiled build: every
#: sidecar they start must say, in its `started` log line, that it runs that build.
HOT_PATH_ENV = "HMS_TEST_HOT_PATH"


class Sidecar:
    """A `sidecar run` process with a config written for the test."""

    def __init__(self, tmp: Path, upstreams: dict[str, dict[str, Any]], **extra: Any) -> None:
        self.app_port = free_port()
        self.admin_port = free_port()
        self.config: dict[str, Any] = {
            "service": {"name": "itest", "port": 8080},
            "listen": f"127.0.0.1:{self.app_port}",
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "consul": {"enabled": False},
            "telemetry": {"log_format": "json", "log_level": "info"},
            "shutdown": {"drain": "0s", "grace": "5s"},
            "upstreams": upstreams,
            **extra,
        }
        self.path = tmp / "sidecar.yaml"
        self.log_path = tmp / "sidecar.log"
        self.env: dict[str, str] = {}  # added to the process's environment
        self.command = [sys.executable, "-m", "sidecar"]  # or the `sidecar` console script
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, write_config: bool = True) -> Self:
        """Start the process; with `write_config` False, the test provides `self.path`."""
        if write_config:
            self.path.write_text(yaml.safe_dump(self.config))
        # The runner's own SIDECAR_*/CONSUL_*/OTEL_* variables would win over the test's file.
        prefixes = ("SIDECAR_", "HTTP_PROXY", "CONSUL_", "OTEL_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)} | self.env
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*self.command, "run", "-c", str(self.path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll /ready until 200; fail with the sidecar's log if it never comes."""
        assert self.proc is not None
        await wait_http_ok("sidecar", self.proc, f"{self.admin}/ready", self.logs, timeout)
        expected = os.environ.get(HOT_PATH_ENV)
        telemetry = self.config.get("telemetry") or {}
        logged = telemetry.get("log_format") == "json" and telemetry.get("log_level") == "info"
        if expected and logged:  # test_compiled.py's run: make sure this is that build
            await self.wait_hot_path(expected, timeout)

    async def wait_hot_path(self, expected: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            started = [e for e in self.log_events() if e.get("event") == "started"]
            if started:
                assert expected == started[0].get("hot_path"), started[0]
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no 'started' log line in {timeout}s:\n{self.logs()}")
            await asyncio.sleep(0.02)

    def proc_status(self, field: str) -> str:
        """A field of the process's /proc/<pid>/status (`VmRSS`, `VmHWM`, `SigCgt`, ...)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split()[1]
        raise AssertionError(f"{field} not in /proc/{self.proc.pid}/status")

    def rss_kib(self, field: str = "VmRSS") -> int:
        """Resident memory now (`VmRSS`) or at its peak (`VmHWM`), in KiB."""
        return int(self.proc_status(field))

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar did not exit in {timeout}s:\n{self.logs()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.asynccontextmanager
async def running_sidecar(
    tmp: Path, upstreams: dict[str, dict[str, Any]], **extra: Any
) -> AsyncIterator[Sidecar]:
    sidecar = Sidecar(tmp, upstreams, **extra).start()
    try:
        await sidecar.wait_ready()
        yield sidecar
    finally:
        sidecar.kill()


def billing_sidecar(
    tmp: Path, *endpoints: str, **upstream: Any
) -> AbstractAsyncContextManager[Sidecar]:
    """A running sidecar whose one upstream, `billing`, has these endpoints and settings."""
    return running_sidecar(tmp, {"billing": {"endpoints": list(endpoints), **upstream}})
