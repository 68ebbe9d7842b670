"""The local probe of the app: what the sidecar reports to Consul about its health.

`service.health.path` set: `GET http://127.0.0.1:<port><path>`; 2xx is passing,
429 warning (as Consul's own HTTP checks read them), anything else critical.
No path: a TCP connect to the port. Every result carries a note an operator can
act on: the status and latency, or the connect error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import NamedTuple

from sidecar.config import HealthConfig

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"

_MAX_STATUS_LINE = 8192


class ProbeResult(NamedTuple):
    status: str  # passing, warning or critical (Consul's words)
    note: str


class AppProbe:
    """Probes the app on 127.0.0.1:`port` as `health` says."""

    def __init__(self, port: int, health: HealthConfig, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.path = health.path
        self.timeout = health.timeout
        self.last: ProbeResult | None = None

    @property
    def target(self) -> str:
        where = f"{self.host}:{self.port}"
        return f"HTTP GET http://{where}{self.path}" if self.path else f"TCP connect {where}"

    async def check(self) -> ProbeResult:
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                status = await self._http() if self.path else await self._tcp()
        except TimeoutError:
            result = ProbeResult(CRITICAL, f"{self.target}: no answer within {self.timeout:g}s")
        except (OSError, ValueError) as exc:
            reason = os_reason(exc) if isinstance(exc, OSError) else str(exc)
            result = ProbeResult(CRITICAL, f"{self.target}: {reason}")
        else:
            took = f"{(time.monotonic() - began) * 1000:.1f} ms"
            if status is None:
                result = ProbeResult(PASSING, f"{self.target}: connected in {took}")
            else:
                word = PASSING if 200 <= status < 300 else WARNING if status == 429 else CRITICAL
                result = ProbeResult(word, f"{self.target}: {status} in {took}")
        self.last = result
        return result

    async def _tcp(self) -> int | None:
        """Connect and close; None: there is no status to report."""
        _, writer = await asyncio.open_connection(self.host, self.port)
        writer.close()
        await _closed(writer)
        return None

    async def _http(self) -> int:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "User-Agent: hms-sidecar-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise ValueError("connection closed before a response") from None
        except asyncio.LimitOverrunError:
            raise ValueError("unreadable response (status line too long)") from None
        finally:
            writer.close()
            await _closed(writer)
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {line[:60]!r}")
        return int(parts[1])

    def __repr__(self) -> str:
        return f"<AppProbe {self.target} last={self.last}>"


def os_reason(exc: OSError) -> str:
    """`Connection refused` rather than asyncio's `Connect call failed ('127.0.0.1', 1)`."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def _closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):  # a reset while closing says nothing about health
        await writer.wait_closed()
