"""Sidecars wired to the Consul double, and the apps beside them, for the Consul tests.

`ConsulSidecar` is the harness's `Sidecar` with Consul switched on against a
`ConsulDouble` and an environment of its own (CONSUL_HTTP_TOKEN, say); the
runner's own CONSUL_* variables are stripped since they would win over the file.
`Fleet` starts several of them and kills every one at the end of a test.
`RelayApp` is an app that calls other services through its own sidecar.
Everything here waits on state (the double, /v1/status, the log), never on a
fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.doubles.consul import ConsulDouble, RecordedRequest
from tests.integration.harness import Sidecar, eventually, poll_json, serve

#: The app's health probe: often enough that a test sees a change within a second.
INTERVAL = "200ms"
PROBE_TIMEOUT = "150ms"


def service_config(
    name: str,
    app_port: int,
    *,
    health_path: str | None = "/status/200",
    tags: Sequence[str] = (),
    meta: Mapping[str, str] | None = None,
    service_id: str | None = None,
) -> dict[str, Any]:
    """A `service:` section for an app on 127.0.0.1:`app_port`, probed every 200 ms;
    without `health_path` the probe is a TCP connect."""
    health: dict[str, Any] = {
        "interval": INTERVAL,
        "timeout": PROBE_TIMEOUT,
        "deregister_critical_after": "1m",
    }
    if health_path is not None:
        health["path"] = health_path
    return {
        "name": name,
        "id": service_id or f"{name}-1",
        "address": "127.0.0.1",  # what other sidecars dial: the default is a LAN address
        "port": app_port,
        "tags": list(tags),
        "meta": dict(meta or {}),
        "health": health,
    }


class ConsulSidecar(Sidecar):
    """A `sidecar run` process registered in (and discovering from) a Consul double."""

    def __init__(
        self,
        tmp: Path,
        consul: ConsulDouble | str,
        service: Mapping[str, Any],
        upstreams: dict[str, dict[str, Any]] | None = None,
        *,
        mode: str = "agent",
        node: str | None = None,
        env: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        address = consul if isinstance(consul, str) else consul.address
        settings: dict[str, Any] = {"enabled": True, "mode": mode, "address": address}
        if node is not None:
            settings["node"] = node
        super().__init__(tmp, upstreams or {}, consul=settings, service=dict(service), **extra)
        self.env = dict(env or {})

    @property
    def service_id(self) -> str:
        return str(self.config["service"]["id"])

    async def status(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(f"{self.admin}/v1/status") as r:
            body: dict[str, Any] = await r.json()
        return body

    async def wait_status(
        self, done: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """/v1/status once `done(status)` holds; fails with the sidecar's log otherwise."""
        async with aiohttp.ClientSession() as session:
            _, body = await poll_json(
                session, f"{self.admin}/v1/status", lambda _, s: done(s), timeout
            )
        if not done(body):
            raise AssertionError(f"/v1/status never matched; last: {body}\n{self.logs()}")
        result: dict[str, Any] = body
        return result

    async def wait_endpoints(
        self, upstream: str, expected: Sequence[str], timeout: float = 10.0
    ) -> dict[str, Any]:
        """/v1/status once `upstream` has exactly the endpoints `expected` (host:port)."""
        wanted = sorted(expected)
        return await self.wait_status(lambda s: wanted == endpoints_of(s, upstream), timeout)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == name]

    async def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first log event called `name`, once it is written."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} in the log after {timeout}s:\n{self.logs()}")
            await asyncio.sleep(0.02)


def endpoints_of(status: Mapping[str, Any], upstream: str) -> list[str]:
    """The sorted endpoint addresses of `upstream` in a /v1/status body ([] if absent)."""
    entry = status.get("upstreams", {}).get(upstream)
    if entry is None:
        return []
    return sorted(str(e["address"]) for e in entry["endpoints"])


#: Poll state of the double or an app in this process until it holds.
wait_until = eventually


class Fleet:
    """The sidecars of one test, each in a directory of its own; all killed by `kill_all`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sidecars: list[ConsulSidecar] = []

    def start(
        self,
        consul: ConsulDouble | str,
        service: Mapping[str, Any],
        upstreams: dict[str, dict[str, Any]] | None = None,
        **extra: Any,
    ) -> ConsulSidecar:
        where = self.tmp / f"sidecar-{len(self.sidecars)}-{service['name']}"
        sidecar = ConsulSidecar(where, consul, service, upstreams, **extra)
        self.sidecars.append(sidecar)
        return sidecar.start()

    async def ready(
        self,
        consul: ConsulDouble | str,
        service: Mapping[str, Any],
        upstreams: dict[str, dict[str, Any]] | None = None,
        **extra: Any,
    ) -> ConsulSidecar:
        """`start`, then wait for /ready."""
        sidecar = self.start(consul, service, upstreams, **extra)
        await sidecar.wait_ready()
        return sidecar

    def kill_all(self) -> None:
        for sidecar in self.sidecars:
            sidecar.kill()


@contextlib.asynccontextmanager
async def running_consul(port: int = 0, **options: Any) -> AsyncIterator[ConsulDouble]:
    """A started Consul double (options as `ConsulDouble` takes them), stopped on exit."""
    double = ConsulDouble(**options)
    await double.start(port)
    try:
        yield double
    finally:
        await double.stop()


async def watch_parked(double: ConsulDouble, sidecar: ConsulSidecar, upstream: str) -> int:
    """Wait until `sidecar`'s watch of `upstream` is blocked in the double: the double has
    a query carrying the index of the watch's last answer, and nothing changed since.
    Returns that index."""
    watch = (await sidecar.status())["upstreams"][upstream]["watch"]
    index, path = str(watch["index"]), f"/v1/health/service/{watch['service']}"
    await wait_until(
        f"{upstream} watch parked at index {index}",
        lambda: any(
            r.path == path and dict(r.query).get("index") == index for r in double.requests
        ),
    )
    return int(index)


def body_field(request: RecordedRequest, name: str) -> Any:
    """A field of a recorded JSON body, its key matched case-insensitively as Consul does."""
    body = json.loads(request.body)
    return next(v for k, v in body.items() if k.lower() == name.lower())


class RelayApp:
    """An app that calls other services through its own sidecar.

    `GET /relay/<upstream>/<path>` calls `/v1/invoke/<upstream>/<path>` on the sidecar
    at `sidecar_url` and answers `{"via": name, "status": ..., "answer": ...}`;
    `/echo...` answers `{"instance": name, "path": ...}`; `/healthz` answers 200.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.sidecar_url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> RelayApp:
        app = web.Application()

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def echo(request: web.Request) -> web.Response:
            return web.json_response({"instance": self.name, "path": request.raw_path})

        async def relay(request: web.Request) -> web.Response:
            assert self._session is not None
            upstream, tail = request.match_info["upstream"], request.match_info["tail"]
            url = f"{self.sidecar_url}/v1/invoke/{upstream}/{tail}"
            async with self._session.get(url) as resp:
                answer = await resp.json()
                status = resp.status
            return web.json_response({"via": self.name, "status": status, "answer": answer})

        app.router.add_get("/healthz", healthz)
        app.router.add_get("/echo{tail:.*}", echo)
        app.router.add_get("/relay/{upstream}/{tail:.*}", relay)
        self._session = aiohttp.ClientSession()
        self._runner, self.port = await serve(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None


@contextlib.asynccontextmanager
async def counting_listener() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP listener on 127.0.0.1 that counts connections; yields (port, [count])."""
    count = [0]

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count[0] += 1
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], count
    finally:
        server.close()
        await server.wait_closed()
