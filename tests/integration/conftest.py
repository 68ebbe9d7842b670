"""Fixtures that start real upstream servers and stop them after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.integration.amqp_harness import AmqpScope, broker_lock
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


@pytest.fixture
async def broker_shared() -> AsyncIterator[None]:
    """RabbitMQ answering, and not stopped by a cooperating suite while the test runs."""
    async with broker_lock(exclusive=False):
        yield


@pytest.fixture
async def scope(broker_shared: None) -> AsyncIterator[AmqpScope]:
    """An exchange of the test's own (and the queues it binds), deleted afterwards."""
    async with AmqpScope() as amqp:
        yield amqp
