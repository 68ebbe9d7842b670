"""Subscriptions against the real RabbitMQ (SPEC §6, §8): events POSTed to an app with
CloudEvents headers and acked; retries with back-off and Retry-After; dead-lettering of
poison and rejected events; attempt counts across restarts; recovery from a broker
restart and from a cut connection; graceful stop.

`Subscriptions` runs in the test's process; each test has its own service name and
exchange, and deletes every queue and exchange it declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from aiohttp import web

from sidecar.config import SubscriptionConfig
from sidecar.events.subscriber import Subscriptions
from sidecar.telemetry.metrics import Metrics
from tests.integration.amqp_harness import broker_lock, rabbitmqctl, wait_broker
from tests.integration.events_harness import (
    AMQP_URL,
    Broker,
    EventApp,
    Received,
    TcpCut,
    events_config,
    unique,
)
from tests.integration.harness import eventually, eventually_equal


def subscription(name: str = "orders", **overrides: Any) -> SubscriptionConfig:
    """A subscription to `orders.*` with back-off short enough for a test."""
    settings: dict[str, Any] = {
        "topic": "orders.*",
        "path": f"/events/{name}",
        "max_attempts": 5,
        "backoff_initial": 0.05,
        "backoff_max": 1.0,
        "prefetch": 8,
        "timeout": 5.0,
    }
    settings.update(overrides)
    return SubscriptionConfig(name=name, **settings)


@dataclass
class Setup:
    """One test's broker, app, names and the `Subscriptions` it started (stopped at the end)."""

    broker: Broker
    app: EventApp
    service: str = field(default_factory=lambda: unique("svc"))
    exchange: str = field(default_factory=lambda: unique("test-events"))
    metrics: Metrics = field(default_factory=Metrics)
    started: list[Subscriptions] = field(default_factory=list)

    async def start(self, *subs: SubscriptionConfig, amqp_url: str = AMQP_URL) -> Subscriptions:
        """A running `Subscriptions` whose consumers are all in place."""
        self.broker.owns(self.service, self.exchange, *(s.name for s in subs))
        config = events_config(self.service, self.app.port, self.exchange, *subs, amqp_url=amqp_url)
        subscriptions = Subscriptions(config, self.metrics)
        self.started.append(subscriptions)
        await subscriptions.start()
        await eventually("consuming", lambda: subscriptions.consuming)
        return subscriptions

    def delivered(self, sub: str, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "sidecar_events_delivered_total", {"subscription": sub, "outcome": outcome}
        )
        return value or 0.0

    def queue(self, sub: str = "orders") -> str:
        return f"{self.service}.{sub}"

    def dlq(self, sub: str = "orders") -> str:
        return f"{self.service}.{sub}.dlq"

    async def dead_letter(self, sub: str = "orders") -> tuple[Any, Any]:
        """The one message in `sub`'s DLQ (taken): its dead reason and attempt count."""
        [dead] = await self.broker.drain(self.dlq(sub))
        headers = dead.headers or {}
        return headers["x-sidecar-dead-reason"], headers["x-sidecar-attempts"]


@contextlib.asynccontextmanager
async def world(*, stops_broker: bool) -> AsyncIterator[Setup]:
    """The broker (answering, and kept up unless this test `stops_broker`), an app on a
    free port, unique names; afterwards every `Subscriptions` is stopped, the app too,
    and the test's queues and exchange deleted."""
    async with broker_lock(exclusive=stops_broker):
        broker = Broker()
        app = await EventApp().start()
        state = Setup(broker, app)
        try:
            yield state
        finally:
            for subscriptions in state.started:
                await subscriptions.stop(grace=0)
            await app.stop()
            await broker.cleanup()


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    """A test's world, with the broker kept up by the shared lock."""
    async with world(stops_broker=False) as state:
        yield state


@pytest.fixture
async def setup_stopping_broker() -> AsyncIterator[Setup]:
    """A test's world for a test that stops the broker (the exclusive lock)."""
    async with world(stops_broker=True) as state:
        yield state


def sub_status(subscriptions: Subscriptions, name: str = "orders") -> dict[str, Any]:
    status: dict[str, Any] = subscriptions.status()["subscriptions"][name]
    return status


class TestDelivery:
    async def test_every_event_is_posted_with_its_cloudevents_headers_and_acked(
        self, setup: Setup
    ) -> None:
        """Each event reaches the app once with its ce-* headers, Content-Type, traceparent
        and body; each is acked (the queue is empty) and counted."""
        subscriptions = await setup.start(subscription())
        ids = [f"evt-{i}" for i in range(20)]
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        for ce_id in ids:
            await setup.broker.publish(
                setup.exchange,
                "orders.created",
                ce_id,
                body=f'{{"id": "{ce_id}"}}'.encode(),
                headers={
                    "ce-subject": "order 7",
                    "traceparent": trace,
                    "tracestate": "vendor=1",
                    "x-internal": "not for the app",
                },
            )

        await eventually("all acked", lambda: sub_status(subscriptions)["delivered"] == 20)

        assert set(ids) == setup.app.ids()
        assert 20 == len(setup.app.received)
        first = setup.app.of("evt-3")[0]
        assert "/events/orders" == first.path
        assert b'{"id": "evt-3"}' == first.body
        expected = {
            "ce-id": "evt-3",
            "ce-source": "/tests/publisher",
            "ce-specversion": "1.0",
            "ce-type": "test.orders.created",
            "ce-time": "2024-05-01T12:00:00.000Z",
            "ce-subject": "order 7",
            "Content-Type": "application/json",
            "traceparent": trace,
            "tracestate": "vendor=1",
        }
        assert expected == {name: first.headers.get(name) for name in expected}
        assert "x-internal" not in first.headers
        await eventually_equal("queue depth", 0, lambda: setup.broker.depth(setup.queue()))
        assert 20 == setup.delivered("orders", "ack")

    async def test_queues_are_durable_quorum_queues_bound_with_the_topic_pattern(
        self, setup: Setup
    ) -> None:
        """The subscription's queue and its DLQ are durable quorum queues; only events
        matching the pattern reach the app."""
        subscriptions = await setup.start(subscription(topic="orders.*"))
        await setup.broker.publish(setup.exchange, "orders.created", "match")
        with pytest.raises(aio_pika.exceptions.PublishError):  # returned: no queue bound for it
            await setup.broker.publish(setup.exchange, "orders.eu.created", "two-words")

        await eventually("matching one acked", lambda: sub_status(subscriptions)["delivered"] == 1)

        listing = await rabbitmqctl(
            "list_queues", "-q", "--no-table-headers", "name", "type", "durable"
        )
        rows = {tuple(line.split()) for line in listing.splitlines() if line.strip()}
        assert (setup.queue(), "quorum", "true") in rows
        assert (setup.dlq(), "quorum", "true") in rows
        assert {"match"} == setup.app.ids()

    async def test_status_and_repr_show_the_state_without_the_broker_password(
        self, setup: Setup
    ) -> None:
        """/v1/status material: broker state, per subscription its queue and counts; the
        AMQP password appears in neither the status nor the repr."""
        subscriptions = await setup.start(subscription())
        await setup.broker.publish(setup.exchange, "orders.created", "one")
        await eventually("acked", lambda: sub_status(subscriptions)["delivered"] == 1)

        status = subscriptions.status()

        assert "connected" == status["broker"]["state"]
        assert "amqp://guest:***@127.0.0.1:5672/" == status["broker"]["url"]
        orders = status["subscriptions"]["orders"]
        expected = {"queue": setup.queue(), "dlq": setup.dlq(), "consuming": True}
        assert expected == {key: orders[key] for key in expected}
        assert (0, 1, 0, 0) == (
            orders["in_flight"],
            orders["delivered"],
            orders["retried"],
            orders["dead"],
        )
        assert "guest:guest" not in repr(subscriptions)
        assert "guest:guest" not in str(status)


class TestRetries:
    async def test_a_5xx_then_2xx_event_is_retried_then_acked(self, setup: Setup) -> None:
        """A 503 is retried after the back-off; the 2xx that follows acks the event."""

        async def flaky(received: Received) -> web.StreamResponse:
            return web.Response(status=503 if received.n == 1 else 200)

        setup.app.responder = flaky
        subscriptions = await setup.start(subscription())
        await setup.broker.publish(setup.exchange, "orders.created", "flaky")

        await eventually("acked", lambda: sub_status(subscriptions)["delivered"] == 1)

        assert 2 == setup.app.count("flaky")
        assert (1, 1, 0) == (
            setup.delivered("orders", "ack"),
            setup.delivered("orders", "retry"),
            setup.delivered("orders", "dead"),
        )
        await eventually_equal("dlq depth", 0, lambda: setup.broker.depth(setup.dlq()))

    async def test_retry_after_of_a_429_is_honoured_and_capped_at_backoff_max(
        self, setup: Setup
    ) -> None:
        """429 with `Retry-After: 1` is retried after about a second, not after the 10 ms
        back-off; `Retry-After: 3600` is cut to backoff_max (1.5 s)."""

        async def busy(received: Received) -> web.StreamResponse:
            if received.n > 1:
                return web.Response(status=204)
            wait = "1" if received.ce_id == "one-second" else "3600"
            return web.Response(status=429, headers={"Retry-After": wait})

        setup.app.responder = busy
        subscriptions = await setup.start(subscription(backoff_initial=0.01, backoff_max=1.5))
        await setup.broker.publish(setup.exchange, "orders.created", "one-second")
        await setup.broker.publish(setup.exchange, "orders.created", "an-hour")

        await eventually("both acked", lambda: sub_status(subscriptions)["delivered"] == 2)

        def gap(ce_id: str) -> float:
            first, second = setup.app.of(ce_id)
            return second.at - first.at

        assert 1.0 <= gap("one-second") < 1.5
        assert 1.5 <= gap("an-hour") < 3.0

    async def test_a_backing_off_event_does_not_hold_up_the_others(self, setup: Setup) -> None:
        """While one event waits for its retry (it holds one prefetch slot), the rest of
        the subscription is delivered and acked."""

        async def answer(received: Received) -> web.StreamResponse:
            if received.ce_id == "stuck":
                return web.Response(status=503, headers={"Retry-After": "30"})
            return web.Response(status=200)

        setup.app.responder = answer
        subscriptions = await setup.start(subscription(prefetch=2, backoff_max=60.0))
        await setup.broker.publish(setup.exchange, "orders.created", "stuck")
        await eventually("stuck tried", lambda: setup.app.count("stuck") == 1)
        others = [f"other-{i}" for i in range(10)]
        for ce_id in others:
            await setup.broker.publish(setup.exchange, "orders.created", ce_id)

        await eventually("others acked", lambda: sub_status(subscriptions)["delivered"] == 10)

        status = sub_status(subscriptions)
        assert (10, 1, 1) == (status["delivered"], status["retried"], status["in_flight"])
        assert 1 == setup.app.count("stuck")


class TestDeadLetters:
    async def test_a_poison_event_goes_to_the_dlq_after_max_attempts(self, setup: Setup) -> None:
        """An event the app always answers 500 is tried max_attempts times, then a copy
        with the reason and attempt count goes to the DLQ and the original is acked."""

        async def broken(_: Received) -> web.StreamResponse:
            return web.Response(status=500)

        setup.app.responder = broken
        subscriptions = await setup.start(subscription(max_attempts=3))
        await setup.broker.publish(
            setup.exchange, "orders.created", "poison", body=b"{}", headers={"ce-subject": "s"}
        )

        await eventually("dead-lettered", lambda: sub_status(subscriptions)["dead"] == 1)

        [dead] = await setup.broker.drain(setup.dlq())
        headers = dead.headers or {}
        assert ("status 500 after 3 attempts", 3) == (
            headers["x-sidecar-dead-reason"],
            headers["x-sidecar-attempts"],
        )
        assert ("poison", "s", "application/json", b"{}") == (
            headers["ce-id"],
            headers["ce-subject"],
            dead.content_type,
            dead.body,
        )
        assert 3 == setup.app.count("poison")
        await eventually_equal("queue depth", 0, lambda: setup.broker.depth(setup.queue()))
        assert (2, 1) == (setup.delivered("orders", "retry"), setup.delivered("orders", "dead"))

    async def test_a_400_event_goes_to_the_dlq_at_once(self, setup: Setup) -> None:
        """A 4xx other than 408/429 is final: dead-lettered after one attempt."""

        async def reject(_: Received) -> web.StreamResponse:
            return web.Response(status=400)

        setup.app.responder = reject
        subscriptions = await setup.start(subscription())
        await setup.broker.publish(setup.exchange, "orders.created", "bad")

        await eventually("dead-lettered", lambda: sub_status(subscriptions)["dead"] == 1)

        assert ("status 400", 1) == await setup.dead_letter()
        assert 1 == setup.app.count("bad")
        assert 0 == setup.delivered("orders", "retry")

    async def test_attempts_survive_a_restart_of_the_subscriptions(self, setup: Setup) -> None:
        """Two attempts, a stop during the back-off, a new instance: it makes only the third
        and last attempt, then dead-letters (the count comes from the quorum queue)."""

        async def failing(received: Received) -> web.StreamResponse:
            headers = {"Retry-After": "60"} if received.n >= 2 else {}
            return web.Response(status=503, headers=headers)

        setup.app.responder = failing
        sub = subscription(max_attempts=3, backoff_max=60.0)
        first = await setup.start(sub)
        await setup.broker.publish(setup.exchange, "orders.created", "restart")
        await eventually("second attempt in back-off", lambda: sub_status(first)["retried"] == 2)

        started = time.monotonic()
        await first.stop(grace=5)
        assert time.monotonic() - started < 2  # a back-off is not waited for
        second = await setup.start(sub)
        await eventually("dead-lettered", lambda: sub_status(second)["dead"] == 1)

        assert ("status 503 after 3 attempts", 3) == await setup.dead_letter()
        assert 3 == setup.app.count("restart")


class TestRecovery:
    async def test_delivery_resumes_after_the_broker_restarts(
        self, setup_stopping_broker: Setup
    ) -> None:
        """`rabbitmqctl stop_app` while an event is in flight, then `start_app`: the
        subscription reconnects, the event whose channel died is redelivered (its late
        2xx is not acked on the new channel) and every event arrives."""
        setup = setup_stopping_broker
        release = asyncio.Event()

        async def answer(received: Received) -> web.StreamResponse:
            if received.ce_id == "in-flight" and received.n == 1:
                await release.wait()
            return web.Response(status=200)

        setup.app.responder = answer
        subscriptions = await setup.start(subscription())
        before = [f"before-{i}" for i in range(5)]
        for ce_id in ["in-flight", *before]:
            await setup.broker.publish(setup.exchange, "orders.created", ce_id)
        await eventually("others acked", lambda: set(before) <= setup.app.acknowledged())
        assert 1 == setup.app.count("in-flight")

        try:
            await rabbitmqctl("stop_app")
            await eventually(
                "connection lost",
                lambda: subscriptions.status()["broker"]["state"] == "disconnected",
            )
            release.set()
        finally:
            await rabbitmqctl("start_app")
            await wait_broker()
        await eventually("consuming again", lambda: subscriptions.consuming, timeout=20)
        after = [f"after-{i}" for i in range(5)]
        for ce_id in after:
            await setup.broker.publish(setup.exchange, "orders.created", ce_id)

        everything = {"in-flight", *before, *after}
        await eventually("every event acked", lambda: everything <= setup.app.acknowledged())
        await eventually("nothing in flight", lambda: sub_status(subscriptions)["in_flight"] == 0)

        assert 2 == setup.app.count("in-flight")
        assert 1 <= sub_status(subscriptions)["redelivered_after_channel_loss"]
        assert 2 == subscriptions.status()["broker"]["connections"]
        await eventually_equal("queue depth", 0, lambda: setup.broker.depth(setup.queue()))

    async def test_delivery_resumes_after_the_connection_is_cut(self, setup: Setup) -> None:
        """A cut connection is replaced; the event in flight during the cut is not acked
        with its old delivery tag (which would close the new channel) but redelivered."""
        release = asyncio.Event()

        async def answer(received: Received) -> web.StreamResponse:
            if received.ce_id == "in-flight" and received.n == 1:
                await release.wait()
            return web.Response(status=200)

        setup.app.responder = answer
        relay = await TcpCut().start()
        try:
            subscriptions = await setup.start(subscription(), amqp_url=relay.url)
            await setup.broker.publish(setup.exchange, "orders.created", "in-flight")
            await eventually("in flight", lambda: setup.app.count("in-flight") == 1)

            relay.cut()
            await eventually(
                "reconnected", lambda: subscriptions.status()["broker"]["connections"] == 2
            )
            await eventually("consuming again", lambda: subscriptions.consuming)
            release.set()
            await setup.broker.publish(setup.exchange, "orders.created", "after")
            await eventually(
                "both acked", lambda: {"in-flight", "after"} <= setup.app.acknowledged()
            )
            await eventually(
                "nothing in flight", lambda: sub_status(subscriptions)["in_flight"] == 0
            )

            status = sub_status(subscriptions)
            assert 2 == setup.app.count("in-flight")
            assert (1, None) == (status["redelivered_after_channel_loss"], status["last_error"])
            assert 2 == subscriptions.status()["broker"]["connections"]
            await eventually_equal("queue depth", 0, lambda: setup.broker.depth(setup.queue()))
        finally:
            await relay.stop()

    async def test_a_deleted_queue_is_declared_again(self, setup: Setup) -> None:
        """The broker cancels the consumer of a deleted queue; the subscription re-opens
        its channel, which declares and binds the queue again, and delivery goes on."""
        subscriptions = await setup.start(subscription())

        await setup.broker.delete(setup.queue())
        await eventually(
            "declared again", lambda: sub_status(subscriptions)["last_error"] is not None
        )
        await eventually("consuming again", lambda: subscriptions.consuming)
        assert await setup.broker.exists(setup.queue())
        await setup.broker.publish(setup.exchange, "orders.created", "after-delete")
        await eventually("acked", lambda: sub_status(subscriptions)["delivered"] == 1)

        assert (
            "channel closed: consumer cancelled by the broker"
            == sub_status(subscriptions)["last_error"]
        )
        assert 1 == subscriptions.status()["broker"]["connections"]


class TestStop:
    async def test_graceful_stop_finishes_the_delivery_in_flight_and_leaves_the_rest(
        self, setup: Setup
    ) -> None:
        """stop(grace) cancels the consumer at once, lets the POST in flight finish and
        acks it; events not yet delivered stay in the queue."""
        release = asyncio.Event()

        async def slow(_: Received) -> web.StreamResponse:
            await release.wait()
            return web.Response(status=200)

        setup.app.responder = slow
        subscriptions = await setup.start(subscription(prefetch=1))
        for ce_id in ("first", "second", "third"):
            await setup.broker.publish(setup.exchange, "orders.created", ce_id)
        await eventually("first in flight", lambda: setup.app.count("first") == 1)

        stopping = asyncio.get_running_loop().create_task(subscriptions.stop(grace=10))
        await eventually("stopping", lambda: not subscriptions.consuming)
        release.set()
        await stopping

        assert "stopped" == subscriptions.status()["broker"]["state"]
        assert ["first"] == [r.ce_id for r in setup.app.received]
        assert 1 == setup.delivered("orders", "ack")
        await eventually_equal("queue depth", 2, lambda: setup.broker.depth(setup.queue()))

    async def test_a_delivery_unfinished_after_the_grace_stays_queued(self, setup: Setup) -> None:
        """A POST still running when the grace period ends is abandoned, not acked: the
        broker keeps the event for the next consumer."""
        never = asyncio.Event()

        async def hang(_: Received) -> web.StreamResponse:
            await never.wait()
            return web.Response(status=200)

        setup.app.responder = hang
        subscriptions = await setup.start(subscription(prefetch=1))
        for ce_id in ("first", "second"):
            await setup.broker.publish(setup.exchange, "orders.created", ce_id)
        await eventually("first in flight", lambda: setup.app.count("first") == 1)

        started = time.monotonic()
        await subscriptions.stop(grace=0.3)
        took = time.monotonic() - started

        assert 0.3 <= took < 2
        assert 0 == setup.delivered("orders", "ack")
        await eventually_equal("queue depth", 2, lambda: setup.broker.depth(setup.queue()))
