"""Fixtures that start real upstream servers and stop them after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.integration.harness import Upstream

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
