"""Fixtures that start real upstream servers and stop them after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.integration.harness import Upstream, gunicorn_httpbin

UpstreamFactory = Callable[[str], Awaitable[Upstream]]


@pytest.fixture
async def upstreams() -> AsyncIterator[UpstreamFactory]:
    """Start aiohttp upstream instances on ephemeral ports; all are stopped afterwards."""
    started: list[Upstream] = []

    async def start(name: str = "upstream") -> Upstream:
        upstream = await Upstream(name).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


@pytest.fixture
async def httpbin(tmp_path: Path) -> AsyncIterator[str]:
    """gunicorn + httpbin with two sync workers, answering; its endpoint. Stopped and
    reaped afterwards, workers included."""
    async with gunicorn_httpbin(tmp_path / "gunicorn.log") as endpoint:
        yield endpoint
