"""The real RabbitMQ for event tests: a TCP proxy to cut, broker stop/start, queue readers.

Every test declares its own exchange (a fresh name) and queues through `AmqpScope`,
which deletes them all on exit. Stopping the broker (`rabbitmqctl stop_app`) happens
only under an exclusive `flock` on `STOP_LOCK`, which other suites stopping the same
broker take too; a test that needs the broker to stay up holds the lock shared, so
no cooperating suite stops it meanwhile. Whoever stops the broker starts it again
and waits until an AMQP connection succeeds before letting go of the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import aio_pika
import aiohttp
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from tests.integration.harness import Sidecar, free_port

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
BROKER_ADDRESS = ("127.0.0.1", 5672)
STOP_LOCK = "/tmp/hms-rabbit-stop.lock"
RABBITMQCTL = "rabbitmqctl"
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


def amqp_url(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/"


def closed_port_url() -> str:
    """An AMQP URL where nothing listens: the sidecar cannot reach a broker there."""
    return amqp_url(free_port())


def unique_name(prefix: str = "itest") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


# --- the broker's life ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def broker_lock(*, exclusive: bool, timeout: float = 180.0) -> AsyncIterator[None]:
    """Hold `STOP_LOCK`: exclusive to stop and start the broker, shared to keep it up.

    Polled without blocking, so the event loop never waits on `flock` itself.
    """
    fd = os.open(STOP_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{STOP_LOCK} not free after {timeout:g}s") from None
                await asyncio.sleep(0.05)
        await wait_broker()  # whoever held it exclusively may have just started it
        yield
    finally:
        os.close(fd)  # releases the lock


async def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        RABBITMQCTL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"rabbitmqctl {' '.join(args)} took over {timeout:g}s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} exited {proc.returncode}:\n{text}")
    return text


async def broker_answers() -> bool:
    """Whether the AMQP port accepts and a connection with a channel succeeds."""
    try:
        async with asyncio.timeout(5):
            _, writer = await asyncio.open_connection(*BROKER_ADDRESS)
            writer.close()
            await writer.wait_closed()
            connection = await aio_pika.connect(AMQP_URL, timeout=5)
            try:
                await connection.channel()
            finally:
                await connection.close()
    except (TimeoutError, OSError, aiormq.exceptions.AMQPError):
        return False
    return True


async def wait_broker(timeout: float = 60.0) -> None:
    """Return once the broker takes connections; fail with a reason after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await broker_answers():
        if time.monotonic() > deadline:
            raise AssertionError(f"RabbitMQ at {BROKER_ADDRESS} not answering after {timeout:g}s")
        await asyncio.sleep(0.2)


async def stop_broker() -> None:
    """`rabbitmqctl stop_app`; the caller holds `broker_lock(exclusive=True)`."""
    await rabbitmqctl("stop_app")


async def start_broker() -> None:
    """`rabbitmqctl start_app`, then wait until a connection succeeds."""
    await rabbitmqctl("start_app")
    await wait_broker()


@contextlib.asynccontextmanager
async def broker_in_my_hands() -> AsyncIterator[None]:
    """The exclusive lock, and on exit the broker running and answering, whatever happened."""
    async with broker_lock(exclusive=True):
        try:
            yield
        finally:
            await start_broker()


# --- a TCP proxy that can be cut ------------------------------------------------------


class _Pipe(asyncio.Protocol):
    """One side of a proxied connection: what it reads, its peer writes."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.early: list[bytes] = []  # read before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        stalled = self.link.proxy.stalled and peer is self.link.down
        if peer is not None and peer.transport is not None and not stalled:
            peer.transport.resume_reading()


class _Link:
    """A client connection and its connection to the target; closing one closes both."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.down = _Pipe(self)
        self.up = _Pipe(self)
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.links.discard(self)
        for pipe in (self.down, self.up):
            if pipe.transport is not None:
                pipe.transport.abort()

    async def connect(self) -> None:
        assert self.down.transport is not None
        self.down.transport.pause_reading()
        try:
            await asyncio.get_running_loop().create_connection(lambda: self.up, *self.proxy.target)
        except OSError:
            self.close()
            return
        if self.closed:
            self.close()
            return
        self.down.peer, self.up.peer = self.up, self.down
        assert self.up.transport is not None
        for data in self.down.early:
            self.up.transport.write(data)
        self.down.early = []
        if not self.proxy.stalled:
            self.down.transport.resume_reading()


class TcpProxy:
    """A TCP proxy on 127.0.0.1 to `target` (the broker): `cut()` aborts every connection
    it carries; while `accepting` is False it aborts new ones at once (a broker that is
    unreachable), and `accepting = True` lets them through again. `stall()` stops
    passing on what clients send, connections kept open (a broker that does not
    answer); `unstall()` passes on what waited."""

    def __init__(self, target: tuple[str, int] = BROKER_ADDRESS, accepting: bool = True) -> None:
        self.target = target
        self.accepting = accepting
        self.links: set[_Link] = set()
        self.connections = 0  # accepted and passed on, ever
        self.stalled = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return amqp_url(self.port)

    async def start(self, port: int = 0) -> TcpProxy:
        self._server = await asyncio.get_running_loop().create_server(
            self._accept, "127.0.0.1", port
        )
        return self

    def _accept(self) -> asyncio.Protocol:
        link = _Link(self)
        down = link.down
        original = down.connection_made

        def made(transport: asyncio.BaseTransport) -> None:
            original(transport)
            if not self.accepting:
                link.close()
                return
            self.connections += 1
            self.links.add(link)
            task = asyncio.get_running_loop().create_task(link.connect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        down.connection_made = made  # type: ignore[method-assign]
        return down

    def cut(self) -> int:
        """Abort every proxied connection (both sides); how many there were."""
        links = list(self.links)
        for link in links:
            link.close()
        return len(links)

    def stall(self) -> None:
        self.stalled = True
        for link in self.links:
            if link.down.transport is not None:
                link.down.transport.pause_reading()

    def unstall(self) -> None:
        self.stalled = False
        for link in self.links:
            if link.down.transport is not None and link.down.peer is not None:
                link.down.transport.resume_reading()

    async def stop(self) -> None:
        self.accepting = False
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted transports run connection_lost

    def __repr__(self) -> str:
        state = "accepting" if self.accepting else "refusing"
        return f"<TcpProxy {state} links={len(self.links)} -> {self.target}>"


@contextlib.asynccontextmanager
async def tcp_proxy(accepting: bool = True) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy(accepting=accepting).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


# --- exchanges, queues and what arrives in them ---------------------------------------


@dataclass(frozen=True)
class Received:
    """One message as a consumer of the bound queue saw it."""

    routing_key: str
    body: bytes
    headers: dict[str, Any]
    content_type: str | None
    message_id: str | None
    delivery_mode: int | None
    timestamp: datetime | None
    redelivered: bool

    @property
    def ce_id(self) -> str:
        return str(self.headers.get("ce-id"))

    def json(self) -> Any:
        return json.loads(self.body)


def _received(message: AbstractIncomingMessage) -> Received:
    headers = {
        k: v.decode() if isinstance(v, bytes) else v for k, v in (message.headers or {}).items()
    }
    mode = message.delivery_mode
    return Received(
        routing_key=message.routing_key or "",
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        message_id=message.message_id,
        delivery_mode=None if mode is None else int(mode),
        timestamp=message.timestamp,
        redelivered=bool(message.redelivered),
    )


@contextlib.asynccontextmanager
async def _channel(url: str = AMQP_URL, timeout: float = 30.0) -> AsyncIterator[Any]:
    """A fresh connection's channel (retried until `timeout`: the broker may be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=5)
            break
        except (OSError, aiormq.exceptions.AMQPError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


class AmqpScope:
    """An exchange of the test's own and the quorum queues it binds; all deleted on exit.

    Every call opens a connection of its own, so a broker restarted in between does
    not matter.
    """

    def __init__(self) -> None:
        self.exchange = unique_name("itest-events")
        self.queues: list[str] = []

    async def __aenter__(self) -> AmqpScope:
        async with _channel() as channel:
            await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        return self

    async def __aexit__(self, *_: object) -> None:
        async with _channel(timeout=60) as channel:
            for queue in self.queues:
                await channel.queue_delete(queue)
            await channel.exchange_delete(self.exchange)

    async def bind(
        self, pattern: str = "#", quorum: bool = True, arguments: dict[str, Any] | None = None
    ) -> str:
        """A new durable (quorum) queue bound to the exchange by `pattern`; its name."""
        name = unique_name("itest-q")
        self.queues.append(name)
        async with _channel() as channel:
            queue = await channel.declare_queue(
                name, durable=True, arguments={**(QUORUM if quorum else {}), **(arguments or {})}
            )
            await queue.bind(self.exchange, routing_key=pattern)
        return name

    async def depth(self, queue: str) -> int:
        """Messages ready in `queue`."""
        async with _channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)

    async def read(
        self, queue: str, count: int | None = None, timeout: float = 30.0, settle: float = 0.3
    ) -> list[Received]:
        """Consume and ack `count` messages, leaving any others in the queue. Without
        `count`, everything: as many as the queue reports ready, then whatever else
        comes until `settle` seconds pass without a message (the reported count can lag
        a moment behind the confirms)."""
        received: list[Received] = []
        arrived = asyncio.Event()
        async with _channel() as channel:
            await channel.set_qos(prefetch_count=count or 1000)
            declared = await channel.declare_queue(queue, passive=True)
            wanted = count if count is not None else declared.declaration_result.message_count

            async def take(message: AbstractIncomingMessage) -> None:
                if count is not None and len(received) >= count:
                    return  # not ours: requeued when the channel closes
                received.append(_received(message))
                await message.ack()
                arrived.set()

            tag = await declared.consume(take)
            try:
                async with asyncio.timeout(timeout):
                    while len(received) < (wanted or 0):
                        await arrived.wait()
                        arrived.clear()
                while count is None:
                    arrived.clear()
                    try:
                        async with asyncio.timeout(settle):
                            await arrived.wait()
                    except TimeoutError:
                        break
            except TimeoutError:
                raise AssertionError(
                    f"{len(received)} of {wanted} messages arrived in {queue} within {timeout:g}s"
                ) from None
            finally:
                await declared.cancel(tag)
        return received


# --- the sidecar's side ---------------------------------------------------------------


def events_config(exchange: str, spool: Path, url: str = AMQP_URL, **more: Any) -> dict[str, Any]:
    """The sidecar's `events` section for a test."""
    return {"amqp_url": url, "exchange": exchange, "spool": {"path": str(spool)}, **more}


def event_sidecar(run_dir: Path, events: dict[str, Any]) -> Sidecar:
    """A sidecar (not started) with no upstreams and this `events` section; its config and
    log in `run_dir`, so several runs over one spool keep their logs apart."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return Sidecar(run_dir, {}, events=events)


async def events_status(session: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    async with session.get(f"{sidecar.admin}/v1/status") as resp:
        status: dict[str, Any] = (await resp.json())["events"]
    return status


async def wait_events(
    session: aiohttp.ClientSession,
    sidecar: Sidecar,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 20.0,
    what: str = "the condition",
) -> dict[str, Any]:
    """Poll /v1/status until `done(events section)`; fail with the last one and the log."""
    deadline = time.monotonic() + timeout
    while True:
        status = await events_status(session, sidecar)
        if done(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} not reached in {timeout:g}s; events status: {status}\n"
                f"sidecar log tail:\n{sidecar.logs()[-3000:]}"
            )
        await asyncio.sleep(0.05)


async def wait_relay_started(
    session: aiohttp.ClientSession, sidecar: Sidecar, timeout: float = 20.0
) -> dict[str, Any]:
    """Wait until the relay's start() has finished: the spool is open and the broker has
    been tried at least once (a state other than the initial `disconnected`, or an error).

    /ready alone does not say so (it answers 200 while the spool is still opening; see
    test_publish.TestStartup), and a publish in that window is not what most tests test.
    """
    return await wait_events(
        session,
        sidecar,
        lambda s: (
            s["spool"]["writable"]
            and (s["broker"]["state"] != "disconnected" or bool(s["broker"]["last_error"]))
        ),
        timeout,
        "the relay started",
    )


async def wait_drained(
    session: aiohttp.ClientSession, sidecar: Sidecar, timeout: float = 20.0
) -> dict[str, Any]:
    return await wait_events(
        session,
        sidecar,
        lambda s: s["broker"]["state"] == "connected" and s["spool"]["depth"] == 0,
        timeout,
        "an empty spool with the broker connected",
    )


async def publish(
    session: aiohttp.ClientSession,
    sidecar: Sidecar,
    topic: str,
    body: bytes | str,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """POST /v1/publish/{topic}; the status and the JSON answer."""
    async with session.post(
        f"{sidecar.url}/v1/publish/{topic}", data=body, headers=headers or {}
    ) as resp:
        return resp.status, await resp.json(content_type=None)


def by_topic(messages: Iterable[Received]) -> dict[str, list[Received]]:
    topics: dict[str, list[Received]] = {}
    for message in messages:
        topics.setdefault(message.routing_key, []).append(message)
    return topics


def first_occurrences(messages: Iterable[Received]) -> list[Received]:
    """The messages with every repeat of an already-seen ce-id left out."""
    seen: set[str] = set()
    firsts = []
    for message in messages:
        if message.ce_id not in seen:
            seen.add(message.ce_id)
            firsts.append(message)
    return firsts
