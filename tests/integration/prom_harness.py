"""The real Prometheus tools for metrics tests: `promtool check metrics` on a scrape, and a
`prometheus` server scraping the sidecar, asked with PromQL over its HTTP API.

Both come from Debian's `prometheus` package (`/usr/bin/prometheus`, `/usr/bin/promtool`);
a test needing one that is missing is skipped with that reason (`require`). The server
binds 127.0.0.1 on a free port, keeps its TSDB in the test's directory, and is
terminated and reaped on leaving `Prometheus`. Every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest
import yaml

from tests.integration.harness import free_port, wait_http_ok

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def require(tool: str) -> str:
    """`tool`'s path; fails the calling test when it is not installed (scripts/test.sh
    installs it: a missing tool must not turn these tests into silent skips)."""
    if not Path(tool).is_file():
        pytest.fail(f"{tool} is not installed: apt-get install -y prometheus")
    return tool


async def promtool_check_metrics(exposition: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run `promtool check metrics` on `exposition` (stdin); its exit code and everything
    it printed. Clean text gives (0, ""); each lint problem is one line."""
    proc = await asyncio.create_subprocess_exec(
        require(PROMTOOL),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate(exposition.encode())
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"promtool check metrics took over {timeout:g}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


Result = list[dict[str, Any]]


class Prometheus:
    """A `prometheus` server scraping `targets` ({job: ["host:port", ...]}) every
    `scrape_interval`; `rule_files` are loaded as they are (alerting or recording rules).

    `async with Prometheus(tmp, {...}) as prom:` starts it and waits for `/-/ready`;
    leaving stops it (SIGTERM, SIGKILL after 10 s) and reaps it.
    """

    def __init__(
        self,
        tmp: Path,
        targets: Mapping[str, Sequence[str]],
        *,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        evaluation_interval: str = "1s",
    ) -> None:
        self.dir = tmp / "prometheus"
        self.port = free_port()
        self.config_path = self.dir / "prometheus.yml"
        self.log_path = self.dir / "prometheus.log"
        self.config: dict[str, Any] = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,  # may not exceed the interval
                "evaluation_interval": evaluation_interval,
            },
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(addresses)}]}
                for job, addresses in targets.items()
            ],
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Self:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    require(PROMETHEUS),
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll `/-/ready` until 200; fail with Prometheus's log if it exits or never is."""
        assert self.proc is not None
        await wait_http_ok("prometheus", self.proc, f"{self.url}/-/ready", self.logs, timeout)

    async def query(self, promql: str) -> Result:
        """The result of an instant query (`/api/v1/query`): for a vector, one
        `{"metric": {...}, "value": [time, "text"]}` per series."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/api/v1/query", params={"query": promql}) as resp,
        ):
            answer = await resp.json()
        if answer.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed ({resp.status}): {answer}")
        result: Result = answer["data"]["result"]
        return result

    async def wait_for(
        self, promql: str, done: Callable[[Result], bool], timeout: float = 30.0
    ) -> Result:
        """Ask `promql` until `done(result)` holds; fail with the last result after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            result = await self.query(promql)
            if done(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{promql!r}: still {result} after {timeout:g}s\n"
                    f"prometheus log tail:\n{self.logs()[-3000:]}"
                )
            await asyncio.sleep(0.2)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; reaped either way."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def __aenter__(self) -> Self:
        self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


def scalar(result: Result) -> float | None:
    """The one value of a single-series result, or None for an empty result."""
    if not result:
        return None
    [series] = result
    return float(series["value"][1])
