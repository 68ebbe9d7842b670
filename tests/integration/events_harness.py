"""The real RabbitMQ and a stand-in app, for the subscription tests.

`Broker` publishes test events with aio-pika as the publisher would (persistent,
CloudEvents binary headers, confirms), reads queues and deletes everything the
test declared. `EventApp` plays the service the events are POSTed to, with a
per-test `responder`. `TcpCut` sits between the sidecar and the broker so a test
can cut every connection. `rabbitmqctl` drives the broker itself. Everything waits
on state (`eventually`), never on a fixed sleep.

Other suites use the same broker, so stopping it follows their protocol (see
`amqp_harness`): a test holds `STOP_LOCK` shared while it needs the broker up, and
exclusive to stop it; whoever stops it starts it again before letting go.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiohttp import web
from multidict import CIMultiDict

from sidecar.config import (
    Config,
    ConsulConfig,
    EventsConfig,
    ServiceConfig,
    SubscriptionConfig,
)
from tests.integration.amqp_harness import wait_broker
from tests.integration.harness import serve

AMQP_HOST = "127.0.0.1"
AMQP_PORT = 5672
AMQP_URL = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/"
#: The lock every suite sharing this broker takes: shared to keep it up, exclusive to stop it.


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses: queues and exchanges outlive a process."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def events_config(
    service: str,
    app_port: int,
    exchange: str,
    *subscriptions: SubscriptionConfig,
    amqp_url: str = AMQP_URL,
) -> Config:
    """A sidecar config with events on and Consul off, for `Subscriptions` in-process."""
    return Config(
        service=ServiceConfig(name=service, id=f"{service}-1", address="127.0.0.1", port=app_port),
        consul=ConsulConfig(enabled=False),
        events=EventsConfig(
            enabled=True, amqp_url=amqp_url, exchange=exchange, subscriptions=subscriptions
        ),
    )


# --- the broker -------------------------------------------------------------------------


class Broker:
    """The test's own connection to RabbitMQ (reopened after a broker restart).

    Remembers every queue and exchange named to it and deletes them in `cleanup()`.
    """

    def __init__(self) -> None:
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    async def channel(self) -> AbstractChannel:
        """An open channel with publisher confirms; a new connection if the last one died."""
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        if self._connection is not None:
            await self._connection.close()
        self._connection = await aio_pika.connect(AMQP_URL, timeout=5)
        self._channel = await self._connection.channel(on_return_raises=True)
        return self._channel

    def owns(self, service: str, exchange: str, *subscriptions: str) -> None:
        """Delete these in `cleanup()`: the exchange, and each subscription's queue and DLQ."""
        self.exchanges.add(exchange)
        for name in subscriptions:
            self.queues.update({f"{service}.{name}", f"{service}.{name}.dlq"})

    async def publish(
        self,
        exchange: str,
        topic: str,
        ce_id: str,
        body: bytes = b'{"n": 1}',
        *,
        content_type: str = "application/json",
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish one event as the sidecar's publisher does: persistent, mandatory,
        confirmed, CloudEvents attributes as `ce-*` headers."""
        channel = await self.channel()
        target = await channel.get_exchange(exchange, ensure=False)
        message = aio_pika.Message(
            body,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=ce_id,
            headers={
                "ce-id": ce_id,
                "ce-source": "/tests/publisher",
                "ce-specversion": "1.0",
                "ce-type": f"test.{topic}",
                "ce-time": "2024-05-01T12:00:00.000Z",
                **(headers or {}),
            },
        )
        confirm = await target.publish(message, routing_key=topic, timeout=5)
        assert isinstance(confirm, aiormq.spec.Basic.Ack), confirm

    async def depth(self, queue: str) -> int:
        """Messages ready in `queue` (unacknowledged ones are not counted)."""
        channel = await self.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count

    async def exists(self, queue: str) -> bool:
        """Whether `queue` is declared (asked on a channel of its own: a passive declare of
        a missing queue closes the channel)."""
        await self.channel()
        assert self._connection is not None
        probe = await self._connection.channel()
        try:
            await probe.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        finally:
            await probe.close()
        return True

    async def delete(self, queue: str) -> None:
        channel = await self.channel()
        await channel.queue_delete(queue)

    async def drain(self, queue: str) -> list[AbstractIncomingMessage]:
        """Take every message ready in `queue` (acknowledged: they are gone after this)."""
        channel = await self.channel()
        declared = await channel.declare_queue(queue, passive=True)
        taken: list[AbstractIncomingMessage] = []
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return taken

    async def cleanup(self) -> None:
        """Delete what the test declared, then close the connection."""
        with contextlib.suppress(Exception):
            await wait_broker()
        channel = await self.channel()
        for queue in sorted(self.queues):
            await channel.queue_delete(queue)
        for exchange in sorted(self.exchanges):
            await channel.exchange_delete(exchange)
        assert self._connection is not None
        await self._connection.close()


# --- the app ------------------------------------------------------------------------------


@dataclass
class Received:
    """One POST the app got; `n` counts the POSTs of this `ce_id` so far (1 = the first)."""

    path: str
    headers: CIMultiDict[str]
    body: bytes
    n: int
    at: float = field(default_factory=time.monotonic)

    @property
    def ce_id(self) -> str:
        return self.headers.get("ce-id", "")


Responder = Callable[[Received], Awaitable[web.StreamResponse]]


async def accept(_: Received) -> web.StreamResponse:
    return web.Response(status=204)


class EventApp:
    """The service the events are POSTed to: records each POST and answers with
    `responder` (204 unless a test sets another)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answered: list[tuple[str, int]] = []  # (ce-id, status), in the order answered
        self.responder: Responder = accept
        self.port = 0
        self._runner: web.AppRunner | None = None

    def count(self, ce_id: str) -> int:
        return sum(1 for r in self.received if r.ce_id == ce_id)

    def ids(self) -> set[str]:
        return {r.ce_id for r in self.received}

    def of(self, ce_id: str) -> list[Received]:
        return [r for r in self.received if r.ce_id == ce_id]

    def acknowledged(self) -> set[str]:
        """The ce-ids answered 2xx at least once."""
        return {ce_id for ce_id, status in self.answered if 200 <= status < 300}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        ce_id = request.headers.get("ce-id", "")
        received = Received(request.path, CIMultiDict(request.headers), body, self.count(ce_id) + 1)
        self.received.append(received)
        response = await self.responder(received)
        self.answered.append((ce_id, response.status))
        return response

    async def start(self) -> EventApp:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner, self.port = await serve(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# --- cutting connections -----------------------------------------------------------------


class TcpCut:
    """A TCP relay to the broker; `cut()` aborts every connection through it at once."""

    def __init__(self) -> None:
        self.port = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def connections(self) -> int:
        return sum(1 for a, _ in self._pairs if not a.is_closing())

    async def start(self) -> TcpCut:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(AMQP_HOST, AMQP_PORT)
        except OSError:
            writer.transport.abort()
            return
        self._pairs.append((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(source, sink))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()

    def cut(self) -> None:
        """Abort both sides of every relayed connection, as a network failure would."""
        self.cuts += 1
        for a, b in self._pairs:
            a.transport.abort()
            b.transport.abort()
        self._pairs.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
