"""A real Prometheus Alertmanager (Debian's `prometheus-alertmanager`) for alert tests.

One process per test on a free 127.0.0.1 port, clustering off, a `null` receiver (no
notification goes anywhere), its storage in the test's temporary directory. Stopped
and reaped by the fixture that starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration.harness import free_port, wait_http_ok

#: Debian names the binary prometheus-alertmanager; upstream's tarball, alertmanager.
BINARIES = ("prometheus-alertmanager", "alertmanager")
CONFIG = """\
route:
  receiver: "null"
  group_wait: 0s
receivers:
  - name: "null"
"""


def alertmanager_binary() -> str:
    """The Alertmanager executable; AssertionError saying how to install it otherwise."""
    for name in BINARIES:
        path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin")
        if path:
            return path
    raise AssertionError(
        "Alertmanager not found (looked for prometheus-alertmanager and alertmanager): "
        "apt-get install -y prometheus-alertmanager"
    )


class Alertmanager:
    """`prometheus-alertmanager` on 127.0.0.1:<free port>; `url` is its base URL."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / "alertmanager"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "alertmanager.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Alertmanager:
        config = self.dir / "alertmanager.yml"
        config.write_text(CONFIG)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    alertmanager_binary(),
                    f"--config.file={config}",
                    f"--storage.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",  # empty: no gossip, no peers
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll `/-/ready` until 200; fail with Alertmanager's log if it never comes."""
        assert self.proc is not None
        await wait_http_ok("alertmanager", self.proc, f"{self.url}/-/ready", self.logs, timeout)

    async def alerts(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """`GET /api/v2/alerts`: the alerts it holds and has not seen resolved."""
        async with session.get(f"{self.url}/api/v2/alerts") as resp:
            assert 200 == resp.status, await resp.text()
            alerts: list[dict[str, Any]] = await resp.json()
        return alerts

    async def metric(self, session: aiohttp.ClientSession, series: str) -> float:
        """The value of one series of its own /metrics (0 when absent)."""
        async with session.get(f"{self.url}/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
        return 0.0

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; reaped either way."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def running_alertmanager(tmp: Path) -> AsyncIterator[Alertmanager]:
    manager = Alertmanager(tmp).start()
    try:
        await manager.wait_ready()
        yield manager
    finally:
        await manager.stop()
