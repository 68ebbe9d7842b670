"""No event answered 202 is lost, whatever happens to RabbitMQ or the sidecar mid-stream.

Each test publishes a numbered stream (several topics, several concurrent publishers,
the number in the body and in `ce-id`) while one fault strikes: RabbitMQ stopped and
started, the TCP connection to it cut, the sidecar killed with SIGKILL. Then it reads
the bound quorum queue and checks three things:

- every event the sidecar answered 202 for is there;
- per topic, the first occurrences keep the order the sidecar answered in: an event
  answered before another was sent comes first;
- a message appears more than once only as the same event (same ce-id, same body).

A publisher whose request fails (the sidecar is being killed) sends the same event,
same ce-id, again; that is what an app does, and what makes duplicates legitimate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.amqp_harness import (
    AmqpScope,
    Received,
    broker_lock,
    event_sidecar,
    events_config,
    first_occurrences,
    start_broker,
    stop_broker,
    tcp_proxy,
    wait_drained,
    wait_events,
)
from tests.integration.harness import Sidecar

TOPICS = ("orders", "payments", "shipments", "audit")
PUBLISHERS_PER_TOPIC = 2
EVENTS_PER_PUBLISHER = 300  # 4 topics x 2 publishers x 300 = 2,400 events
TOTAL = len(TOPICS) * PUBLISHERS_PER_TOPIC * EVENTS_PER_PUBLISHER
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)
GIVE_UP_AFTER = 40.0  # a publisher stops retrying an event after this long

# Each test is meant to take under ~30 s; this bounds a hung one.
pytestmark = pytest.mark.timeout(90)


@dataclass
class Sent:
    """One event of the stream and what became of it."""

    topic: str
    publisher: int
    n: int
    first_sent: float = 0.0  # monotonic, the first attempt
    answered: float | None = None  # monotonic, the 202
    status: str = ""  # confirmed or spooled, from the 202
    attempts: int = 0

    @property
    def id(self) -> str:
        return f"{self.topic}.p{self.publisher}.{self.n}"

    @property
    def body(self) -> bytes:
        return json.dumps({"topic": self.topic, "p": self.publisher, "n": self.n}).encode()


class Stream:
    """The numbered stream. `answered` counts 202s; publishers that reach `hold_at` of
    their events wait for `resume`, so some events are always published after the fault
    is over, however fast the machine. With `fault_at`, publishers that reach that share
    of their events wait for `fault` (set by the test once the fault is in effect), so
    some events are always published during it."""

    def __init__(self, url: str, hold_at: float = 0.75, fault_at: float | None = None) -> None:
        self.url = url
        self.events = {
            (t, p): [Sent(t, p, n) for n in range(EVENTS_PER_PUBLISHER)]
            for t in TOPICS
            for p in range(PUBLISHERS_PER_TOPIC)
        }
        self.answered = 0
        self.failures: dict[str, int] = {}
        self.resume = asyncio.Event()
        self.fault = asyncio.Event()
        if fault_at is None:
            self.fault.set()
        self._hold_at = int(EVENTS_PER_PUBLISHER * hold_at)
        self._fault_at = int(EVENTS_PER_PUBLISHER * (fault_at or 0.0))

    def all(self) -> list[Sent]:
        return [e for events in self.events.values() for e in events]

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
            await asyncio.gather(*(self._publisher(session, ev) for ev in self.events.values()))

    async def _publisher(self, session: aiohttp.ClientSession, events: list[Sent]) -> None:
        for event in events:
            if event.n == self._fault_at:
                await self.fault.wait()
            if event.n == self._hold_at:
                await self.resume.wait()
            await self._send(session, event)

    async def _send(self, session: aiohttp.ClientSession, event: Sent) -> None:
        event.first_sent = time.monotonic()
        headers = {"ce-id": event.id, "content-type": "application/json"}
        while time.monotonic() - event.first_sent < GIVE_UP_AFTER:
            event.attempts += 1
            try:
                async with session.post(
                    f"{self.url}/v1/publish/{event.topic}", data=event.body, headers=headers
                ) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status == 202:
                        event.answered = time.monotonic()
                        event.status = answer["status"]
                        self.answered += 1
                        return
                    reason = f"HTTP {resp.status} {answer.get('error', {}).get('code')}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                reason = type(exc).__name__
            self.failures[reason] = self.failures.get(reason, 0) + 1
            await asyncio.sleep(0.05)

    async def wait_answered(self, fraction: float, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.answered < TOTAL * fraction:
            assert time.monotonic() < deadline, f"{self.answered} of {TOTAL} answered in time"
            await asyncio.sleep(0.01)


def check_delivery(stream: Stream, received: list[Received]) -> dict[str, Any]:
    """The three properties of the module docstring, as lists that are empty when they
    hold; and counts for the failure message."""
    sent = {e.id: e for e in stream.all()}
    impostors = []  # a message that is not the event its ce-id names
    for message in received:
        event = sent.get(message.ce_id)
        if (
            event is None
            or message.body != event.body
            or message.routing_key != event.topic
            or message.message_id != event.id
        ):
            impostors.append((message.ce_id, message.routing_key, message.body))
    arrived = {m.ce_id for m in received}
    missing = sorted(e.id for e in sent.values() if e.answered is not None and e.id not in arrived)
    out_of_order = []
    for topic in TOPICS:
        order = [sent[m.ce_id] for m in first_occurrences(received) if m.routing_key == topic]
        # Going backwards, the earliest answer among the events placed after this one:
        # if it came before this event was even sent, that event was overtaken.
        earliest_after = float("inf")
        earliest_event: Sent | None = None
        for event in reversed(order):
            if earliest_event is not None and earliest_after < event.first_sent:
                out_of_order.append((event.id, "delivered before", earliest_event.id))
            if event.answered is not None and event.answered < earliest_after:
                earliest_after, earliest_event = event.answered, event
    return {
        "missing": missing,
        "out_of_order": out_of_order[:20],
        "impostors": impostors[:20],
        "answered": sum(1 for e in sent.values() if e.answered is not None),
        "received": len(received),
        "duplicates": len(received) - len(arrived),
        "spooled": sum(1 for e in sent.values() if e.status == "spooled"),
        "publish_failures": stream.failures,
    }


def assert_no_loss(report: dict[str, Any]) -> None:
    assert ([], [], []) == (report["missing"], report["out_of_order"], report["impostors"]), report
    assert TOTAL == report["answered"], report


@contextlib.asynccontextmanager
async def streaming(stream: Stream) -> AsyncIterator[asyncio.Task[None]]:
    """The stream running in a task; on the way out it is let go (`resume`) and finished,
    or cancelled if the test failed."""
    task = asyncio.get_running_loop().create_task(stream.run())
    try:
        yield task
        stream.fault.set()
        stream.resume.set()
        await asyncio.wait_for(task, GIVE_UP_AFTER + 20)
    finally:
        stream.fault.set()
        stream.resume.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def started(sidecar: Sidecar) -> Sidecar:
    await sidecar.start().wait_ready()
    return sidecar


async def drained_queue(
    scope: AmqpScope, queue: str, sidecar: Sidecar, timeout: float = 30.0
) -> list[Received]:
    async with aiohttp.ClientSession() as session:
        await wait_drained(session, sidecar, timeout)
    return await scope.read(queue)


async def wait_connected(sidecar: Sidecar, timeout: float = 20.0) -> None:
    async with aiohttp.ClientSession() as session:
        await wait_events(
            session,
            sidecar,
            lambda s: s["broker"]["state"] == "connected",
            timeout,
            "a broker connection",
        )


class TestPublishUnderFaults:
    async def test_broker_stopped_and_started_mid_stream(self, tmp_path: Path) -> None:
        """RabbitMQ stopped (`rabbitmqctl stop_app`) a quarter into the stream and started
        again 2 s later (half the stream waits for the stop, so part of it is published
        during the outage): every event answered 202 arrives, in per-topic order."""
        async with (
            broker_lock(exclusive=True),
            AmqpScope() as scope,
        ):
            queue = await scope.bind("#")
            sidecar = event_sidecar(tmp_path, events_config(scope.exchange, tmp_path / "spool.db"))
            try:
                await started(sidecar)
                await wait_connected(sidecar)
                stream = Stream(sidecar.url, fault_at=0.5)
                async with streaming(stream):
                    await stream.wait_answered(0.25)
                    try:
                        await stop_broker()
                        stream.fault.set()
                        await asyncio.sleep(2.0)
                    finally:
                        await start_broker()
                received = await drained_queue(scope, queue, sidecar)
            finally:
                sidecar.kill()
        report = check_delivery(stream, received)
        assert_no_loss(report)
        assert report["spooled"] > 0, "the outage was meant to send events to the spool"
        assert any(e["event"] == "broker_connection_lost" for e in sidecar.log_events())

    async def test_connection_cut_by_a_proxy_mid_stream(
        self, tmp_path: Path, scope: AmqpScope
    ) -> None:
        """The sidecar's AMQP connection, through a TCP proxy, is cut twice mid-stream:
        once refused for a second after, once taken back at once: no event answered 202
        is lost, per-topic order holds."""
        async with tcp_proxy() as proxy:
            queue = await scope.bind("#")
            events = events_config(scope.exchange, tmp_path / "spool.db", proxy.url)
            sidecar = event_sidecar(tmp_path, events)
            try:
                await started(sidecar)
                await wait_connected(sidecar)
                stream = Stream(sidecar.url)
                async with streaming(stream):
                    await stream.wait_answered(0.25)
                    proxy.accepting = False
                    cut = [proxy.cut()]
                    await asyncio.sleep(1.0)
                    proxy.accepting = True
                    await wait_connected(sidecar)
                    await stream.wait_answered(0.5)
                    cut.append(proxy.cut())  # and reconnecting may start at once
                    await wait_connected(sidecar)
                received = await drained_queue(scope, queue, sidecar)
            finally:
                sidecar.kill()
        report = check_delivery(stream, received)
        assert_no_loss(report)
        assert [1, 1] == cut
        assert 3 <= proxy.connections

    async def test_sidecar_killed_mid_stream(self, tmp_path: Path, scope: AmqpScope) -> None:
        """The sidecar is SIGKILLed twice mid-stream and restarted on the same spool: once
        while events wait in the spool (broker unreachable), once with publishes in flight
        to the broker. Every event answered 202 arrives, in per-topic order."""
        async with tcp_proxy() as proxy:
            queue = await scope.bind("#")
            events = events_config(scope.exchange, tmp_path / "spool.db", proxy.url)
            sidecar = event_sidecar(tmp_path, events)
            spooled_at_kill = 0
            try:
                await started(sidecar)
                await wait_connected(sidecar)
                stream = Stream(sidecar.url)
                async with streaming(stream):
                    await stream.wait_answered(0.2)
                    proxy.accepting = False
                    proxy.cut()
                    await stream.wait_answered(0.3)
                    async with (
                        aiohttp.ClientSession() as session,
                        session.get(f"{sidecar.admin}/v1/status") as resp,
                    ):
                        spooled_at_kill = (await resp.json())["events"]["spool"]["depth"]
                    sidecar.kill()
                    sidecar.log_path = tmp_path / "sidecar-2.log"
                    proxy.accepting = True
                    await started(sidecar)
                    await stream.wait_answered(0.5)
                    sidecar.kill()
                    sidecar.log_path = tmp_path / "sidecar-3.log"
                    await started(sidecar)
                received = await drained_queue(scope, queue, sidecar)
            finally:
                sidecar.kill()
        report = check_delivery(stream, received)
        assert_no_loss(report)
        assert spooled_at_kill > 0, "the first kill was meant to find events in the spool"
        assert sum(report["publish_failures"].values()) > 0, "the kills were meant to be felt"
