"""Subscriptions: events from RabbitMQ POSTed to the app, acknowledged only once it took them.

Each subscription owns a durable quorum queue `<service>.<subscription>` bound to
the events exchange with its topic pattern, a dead-letter queue `<queue>.dlq`, and
a channel of its own, so `prefetch` bounds that subscription alone. Every delivery
runs in a task of its own: one POST to `http://127.0.0.1:<service.port><path>` with
the CloudEvents HTTP binary headers (`ce-*`, `Content-Type`, `traceparent`).

Outcomes: 2xx acks. 408, 429, 5xx, other non-2xx non-4xx answers, a timeout or a
connection error are retried; any other 4xx dead-letters at once, and so does the
last failed attempt. Dead-lettering publishes a persistent copy to the DLQ (headers
`x-sidecar-dead-reason`, `x-sidecar-attempts`, the original ones kept) and acks the
original only after the broker confirmed that copy.

A retry holds its message (one prefetch slot) for the back-off, then gives it back
with `basic.nack(requeue)`; the broker delivers it again, possibly to another
replica. One broker delivery is therefore one attempt, and the attempt number is the
quorum queue's `x-delivery-count` (`x-acquired-count` on RabbitMQ 4, whose delivery
count skips returns caused by a closed channel) plus one: exact across restarts and
crashes of the sidecar. Only the returns are counted, so a message that was
prefetched but never POSTed when a sidecar stopped loses one attempt.

Connections are plain (not aio-pika's robust ones): a supervisor reconnects with
jittered back-off, and each subscription re-opens its channel on the new connection.
A delivery remembers the channel it came on and is never settled on another one: if
that channel closed, its delivery tag died with it and the broker has already
requeued the message, so the result of the POST is dropped and the redelivery is
POSTed again (at-least-once; `ce-id` lets the app de-duplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple
from urllib.parse import quote

import aio_pika
import aiohttp
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from yarl import URL

from sidecar.backoff import backoff_delay
from sidecar.config import Config, SubscriptionConfig
from sidecar.events.publisher import masked_url
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import CLIENT, CONSUMER, TraceContext, Tracer, unbind_log_ids

__all__ = [
    "Outcome",
    "Subscriptions",
    "classify",
    "http_headers",
    "previous_attempts",
    "retry_after",
]

log = get_logger("sidecar.events")

#: Reconnecting to the broker: jittered, doubling from the first delay to the cap.
RECONNECT_FIRST = 0.2
RECONNECT_CAP = 5.0
#: Bounds on broker operations, so that no wait on a broker that stopped answering is endless.
CONNECT_TIMEOUT = 10.0
ATTACH_TIMEOUT = 10.0  # open a channel, declare the queues and the exchange, bind, consume
DEAD_LETTER_TIMEOUT = 10.0  # publish the DLQ copy and get its confirm
CLOSE_TIMEOUT = 5.0
#: A connection or channel lost sooner than this after it opened counts as a failure to open it.
CHANNEL_MIN_LIFE = 10.0

#: Broker-maintained headers: meaningless on the DLQ copy (the DLQ's own deliveries set them).
_BROKER_COUNTS = ("x-delivery-count", "x-acquired-count")
#: An HTTP field name (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Field values sent as they are; anything else is percent-encoded (CloudEvents HTTP binding).
_PLAIN_VALUE = re.compile(r"[\x20-\x7e]*")
_CE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


# --- pure decisions ---------------------------------------------------------------------


class Outcome(enum.Enum):
    """What one answer of the app means for its message."""

    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


def classify(status: int) -> Outcome:
    """2xx acks; 408, 429 and 5xx retry; any other 4xx is final (bad event, 404, 410 gone).

    1xx and 3xx answers (a redirect is not followed) are "non-2xx" and retried (SPEC §6).
    """
    if 200 <= status < 300:
        return Outcome.ACK
    if 400 <= status < 500 and status not in (408, 429):
        return Outcome.DEAD
    return Outcome.RETRY


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a `Retry-After` value asks for (delta-seconds or an HTTP-date, RFC 9110
    §10.2.3), never negative; None when absent or malformed."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def previous_attempts(headers: Mapping[str, Any]) -> int:
    """Attempts made on earlier deliveries of a message, from the quorum queue's counts.

    RabbitMQ 3.x counts every return in `x-delivery-count`; 4.x counts there only
    nacks and rejects, and every return in `x-acquired-count`.
    """
    counts = [0]
    for name in _BROKER_COUNTS:
        value = headers.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            counts.append(value)
        elif isinstance(value, str) and value.isdigit():
            counts.append(int(value))
    return max(counts)


def _header_value(value: object) -> str | None:
    """An AMQP field value as an HTTP field value; None for tables and arrays."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("utf-8", "replace")
    elif isinstance(value, int | float | Decimal):
        text = str(value)
    elif isinstance(value, datetime):
        stamp = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        text = stamp.astimezone(UTC).isoformat().replace("+00:00", "Z")
    else:
        return None
    if _PLAIN_VALUE.fullmatch(text):
        return text
    # CloudEvents HTTP binding §3.1.3.2: UTF-8, then percent-encode what is not printable
    # ASCII, plus space, '"' and '%'. Plain values are left as they are: most apps read
    # ce-* headers without decoding them.
    return quote(text, safe=_CE_SAFE)


def http_headers(amqp_headers: Mapping[str, Any], content_type: str | None) -> dict[str, str]:
    """The HTTP headers of one delivery: every `ce-*` AMQP header, `traceparent`,
    `tracestate` and the data's `Content-Type`. Invalid names and values are left out."""
    out: dict[str, str] = {}
    for name, value in amqp_headers.items():
        key = name.lower()
        if not (key.startswith("ce-") or key in ("traceparent", "tracestate")):
            continue
        text = _header_value(value)
        if text is not None and _TOKEN.fullmatch(key):
            out[key] = text
    if content_type and _PLAIN_VALUE.fullmatch(content_type):
        out["Content-Type"] = content_type
    return out


# --- live state -------------------------------------------------------------------------


class _Answer(NamedTuple):
    outcome: Outcome
    reason: str  # "status 503", "timeout", "connection error"
    detail: str = ""  # the error's own words, for the log
    wait: float | None = None  # Retry-After, in seconds
    status: int = 0  # the app's HTTP status; 0 when it gave none


@dataclass(eq=False)
class _Generation:
    """One broker connection; `closed` is set when it is lost or closed."""

    number: int
    connection: AbstractConnection
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None


@dataclass(eq=False)
class _Link:
    """One subscription's channel on one connection; its delivery tags are valid only on it."""

    generation: _Generation
    channel: AbstractChannel
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    queue: AbstractQueue | None = None
    consumer_tag: str | None = None
    error: str | None = None
    opened: float = field(default_factory=time.monotonic)

    @property
    def stale(self) -> bool:
        return self.closed.is_set() or self.generation.closed.is_set()

    async def wait_closed(self, seconds: float) -> bool:
        """Wait up to `seconds`; True if the channel closed meanwhile."""
        if self.stale:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.closed.wait()
        return self.stale


@dataclass(eq=False)
class _Delivery:
    message: AbstractIncomingMessage
    link: _Link
    phase: str = "received"  # posting, backoff, dead-lettering, settling
    attempt: int = 0
    trace: TraceContext | None = None  # the CONSUMER span's context, when tracing is on
    outcome: str = ""  # ack, retry, dead: for the span


class _Subscription:
    """One subscription's queues, channel, deliveries in flight and counts."""

    def __init__(self, config: SubscriptionConfig, service: str, app_port: int) -> None:
        self.config = config
        self.name = config.name
        self.queue = f"{service}.{config.name}"
        self.dlq = f"{self.queue}.dlq"
        self.url = f"http://127.0.0.1:{app_port}{config.path}"
        self.port = app_port
        self.timeout = aiohttp.ClientTimeout(total=config.timeout)
        self.link: _Link | None = None
        self.consuming = False
        self.deliveries: dict[asyncio.Task[None], _Delivery] = {}
        self.delivered = 0
        self.retried = 0
        self.dead = 0
        self.stale = 0  # results dropped because the delivery's channel had closed
        self.last_error: str | None = None
        self.runner: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "dlq": self.dlq,
            "topic": self.config.topic,
            "path": self.config.path,
            "consuming": self.consuming,
            "prefetch": self.config.prefetch,
            "in_flight": len(self.deliveries),
            "delivered": self.delivered,
            "retried": self.retried,
            "dead": self.dead,
            "redelivered_after_channel_loss": self.stale,
            "last_error": self.last_error,
        }


class Subscriptions:
    """Consumes every configured subscription and delivers its events to the app.

    `state`: idle (not started), disabled (no subscriptions), connecting (no connection
    yet), connected, disconnected (lost, reconnecting), stopping, stopped.
    """

    def __init__(
        self, config: Config, metrics: Metrics, *, rng: random.Random | None = None
    ) -> None:
        events = config.events
        port = config.service.port
        if events.subscriptions and port is None:
            raise ValueError("subscriptions need service.port: events are POSTed to the app")
        self._url = events.amqp_url
        self._password = URL(events.amqp_url).password or ""
        self.broker = masked_url(events.amqp_url)
        self.exchange = events.exchange
        self.service = config.service.name
        self._subs = [_Subscription(s, self.service, port or 0) for s in events.subscriptions]
        self._metrics = metrics
        self._rng = rng or random.Random()
        self.state = "idle"
        self._stopping = False
        self._generation: _Generation | None = None
        self._live = asyncio.Event()  # set while `_generation` is an open connection
        self._connections = 0
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing: set[asyncio.Task[None]] = set()  # channel closes started from callbacks
        self.tracer: Tracer | None = None  # a CONSUMER span per sampled delivery

    # --- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin connecting and consuming in the background; returns at once."""
        if self.state != "idle":
            raise RuntimeError(f"start() on {self!r}")
        if not self._subs:
            self.state = "disabled"
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # prefetch bounds the POSTs in flight
            auto_decompress=False,
        )
        self.state = "connecting"
        loop = asyncio.get_running_loop()
        self._supervisor = loop.create_task(self._supervise(), name="events-broker")
        for sub in self._subs:
            sub.runner = loop.create_task(self._run(sub), name=f"events-subscription:{sub.name}")

    async def stop(self, grace: float) -> None:
        """Cancel every consumer now, let deliveries in flight finish within `grace`
        seconds, then close. Unfinished and unstarted messages stay in their queues."""
        if self.state in ("idle", "disabled", "stopping", "stopped"):
            self.state = "stopped" if self.state in ("idle", "disabled") else self.state
            return
        started = time.monotonic()
        self._stopping = True
        self.state = "stopping"
        background = [t for t in (self._supervisor, *(s.runner for s in self._subs)) if t]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.gather(*(self._cancel_consumer(sub) for sub in self._subs))
        # A message waiting for its back-off would be retried only after the stop; the broker
        # gives it back to the queue when its channel closes.
        for sub in self._subs:
            for task, delivery in sub.deliveries.items():
                if delivery.phase == "backoff":
                    task.cancel()
        in_flight = [task for sub in self._subs for task in sub.deliveries]
        unfinished: set[asyncio.Task[None]] = set()
        if in_flight:
            _, unfinished = await asyncio.wait(in_flight, timeout=max(0.0, grace))
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
        for sub in self._subs:
            if sub.link is not None:
                await self._close(sub.link.channel.close())
            sub.consuming = False
        if self._generation is not None:
            await self._close(self._generation.connection.close())
        self._live.clear()
        if self._session is not None:
            await self._session.close()
        self.state = "stopped"
        log.info(
            "subscriptions_stopped",
            unfinished=len(unfinished),
            took_s=round(time.monotonic() - started, 3),
        )

    @property
    def consuming(self) -> bool:
        """Every subscription has a consumer on the broker."""
        return bool(self._subs) and all(sub.consuming for sub in self._subs)

    # --- the broker connection ----------------------------------------------------------

    async def _supervise(self) -> None:
        failures = 0
        lost_at: float | None = None
        while True:
            try:
                connection = await aio_pika.connect(
                    self._url,
                    timeout=CONNECT_TIMEOUT,
                    client_properties={"connection_name": f"{self.service} subscriptions"},
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure to connect is retried
                failures += 1
                self._last_error = self._mask(exc)
                delay = backoff_delay(failures, RECONNECT_FIRST, RECONNECT_CAP, self._rng)
                emit = log.warning if failures == 1 or failures % 12 == 0 else log.debug
                emit(
                    "broker_connect_failed",
                    broker=self.broker,
                    error=self._last_error,
                    failures=failures,
                    retry_in_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            self._connections += 1
            generation = _Generation(self._connections, connection)
            connection.close_callbacks.add(self._on_connection_closed(generation))
            self._generation = generation
            opened = time.monotonic()
            if connection.connected.is_set():  # else lost before the callback was in place
                self._live.set()
                self.state = "connected"
                self._connected_since = time.time()
                if lost_at is None:
                    log.info("broker_connected", broker=self.broker)
                else:
                    log.info(
                        "broker_connection_restored",
                        broker=self.broker,
                        down_s=round(opened - lost_at, 3),
                    )
                await generation.closed.wait()
            lost_at = time.monotonic()
            self.state = "disconnected"
            self._connected_since = None
            self._last_error = generation.error
            log.warning(
                "broker_connection_lost",
                broker=self.broker,
                error=generation.error,
                in_flight=sum(len(sub.deliveries) for sub in self._subs),
            )
            await self._close(connection.close())
            # A broker that takes connections and drops them at once is not hammered.
            failures = 0 if lost_at - opened >= CHANNEL_MIN_LIFE else failures + 1
            if failures:
                await asyncio.sleep(
                    backoff_delay(failures, RECONNECT_FIRST, RECONNECT_CAP, self._rng)
                )

    def _on_connection_closed(self, generation: _Generation) -> Callable[[Any, Any], None]:
        def closed(_: Any, exc: Any) -> None:
            if isinstance(exc, BaseException) and not isinstance(exc, asyncio.CancelledError):
                generation.error = self._mask(exc)
            else:
                generation.error = generation.error or "closed"
            if self._generation is generation:
                self._live.clear()
            generation.closed.set()

        return closed

    async def _live_generation(self) -> _Generation:
        while True:
            await self._live.wait()
            generation = self._generation
            if generation is not None and not generation.closed.is_set():
                return generation
            self._live.clear()

    # --- one subscription ---------------------------------------------------------------

    async def _run(self, sub: _Subscription) -> None:
        """Keep a consumer on `sub`'s queue: (re)open its channel on each connection."""
        failures = 0
        while True:
            generation = await self._live_generation()
            try:
                async with asyncio.timeout(ATTACH_TIMEOUT):
                    link = await self._attach(sub, generation)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # declared wrongly elsewhere, broker gone...
                if sub.link is not None:
                    await self._close(sub.link.channel.close())
                if generation.closed.is_set():
                    continue  # the connection went: wait for the next one
                failures += 1
                sub.last_error = f"consume failed: {self._mask(exc)}"
                delay = backoff_delay(failures, RECONNECT_FIRST, RECONNECT_CAP, self._rng)
                log.warning(
                    "subscription_start_failed",
                    subscription=sub.name,
                    queue=sub.queue,
                    error=sub.last_error,
                    retry_in_s=round(delay, 3),
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await generation.closed.wait()
                continue
            sub.consuming = True
            log.info(
                "subscription_started",
                subscription=sub.name,
                queue=sub.queue,
                topic=sub.config.topic,
                exchange=self.exchange,
                prefetch=sub.config.prefetch,
                connection=generation.number,
            )
            await link.closed.wait()
            sub.consuming = False
            await asyncio.sleep(0)  # the connection's own close callback may come second
            if generation.closed.is_set():
                continue
            lived = time.monotonic() - link.opened
            failures = 0 if lived >= CHANNEL_MIN_LIFE else failures + 1
            sub.last_error = f"channel closed: {link.error}"
            delay = (
                backoff_delay(failures, RECONNECT_FIRST, RECONNECT_CAP, self._rng)
                if failures
                else 0.0
            )
            log.warning(
                "subscription_channel_lost",
                subscription=sub.name,
                error=link.error,
                in_flight=len(sub.deliveries),
                retry_in_s=round(delay, 3),
            )
            await self._close(link.channel.close())
            if delay:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await generation.closed.wait()

    async def _attach(self, sub: _Subscription, generation: _Generation) -> _Link:
        """Open `sub`'s channel on this connection, declare its topology and consume."""
        channel = generation.connection.channel(publisher_confirms=True, on_return_raises=True)
        link = _Link(generation, channel)
        sub.link = link

        def closed(_: Any, exc: Any) -> None:
            if link.error is None:
                link.error = self._mask(exc) if isinstance(exc, BaseException) else "closed"
            link.closed.set()

        channel.close_callbacks.add(closed)
        await channel
        await channel.set_qos(prefetch_count=sub.config.prefetch)
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await channel.declare_queue(sub.dlq, durable=True, arguments={"x-queue-type": "quorum"})
        queue = await channel.declare_queue(
            sub.queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                # What the broker itself dead-letters (RabbitMQ 4's default delivery-limit
                # of 20) lands in the DLQ too, rather than being dropped.
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": sub.dlq,
            },
        )
        await queue.bind(exchange, routing_key=sub.config.topic)
        link.queue = queue

        def cancelled_by_broker(_: Any) -> None:
            # The queue was deleted: re-open the channel, which declares it again.
            link.error = "consumer cancelled by the broker"
            task = asyncio.get_running_loop().create_task(self._close(channel.close()))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(cancelled_by_broker)
        link.consumer_tag = await queue.consume(self._consumer(sub, link), no_ack=False)
        return link

    def _consumer(
        self, sub: _Subscription, link: _Link
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            if self._stopping or link.stale:
                return  # not started: the broker requeues it when the channel closes
            delivery = _Delivery(message, link)
            task = asyncio.get_running_loop().create_task(
                self._deliver(sub, delivery), name=f"events-delivery:{sub.name}"
            )
            sub.deliveries[task] = delivery
            task.add_done_callback(lambda t: sub.deliveries.pop(t, None))

        return on_message

    async def _cancel_consumer(self, sub: _Subscription) -> None:
        sub.consuming = False
        link = sub.link
        if link is None or link.queue is None or link.consumer_tag is None or link.stale:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await link.queue.cancel(link.consumer_tag)
        except Exception as exc:  # the channel closing returns the messages anyway
            log.debug("subscription_cancel_failed", subscription=sub.name, error=self._mask(exc))

    # --- one delivery -------------------------------------------------------------------

    async def _deliver(self, sub: _Subscription, delivery: _Delivery) -> None:
        tracer = self.tracer
        trace = None if tracer is None else self._consumer_span(tracer, sub, delivery)
        tokens = None if trace is None else trace.bind_log_ids()
        error: str | None = None
        try:
            await self._attempt(sub, delivery)
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        except Exception:  # a bug must not keep the message's prefetch slot
            error = "internal_error"
            log.exception("delivery_failed", subscription=sub.name, ce_id=_ce_id(delivery))
            await self._settle(sub, delivery, requeue=True)
        finally:
            if tokens is not None:
                unbind_log_ids(tokens)
            if trace is not None and tracer is not None:
                self._end_consumer_span(tracer, trace, delivery, error)

    def _consumer_span(
        self, tracer: Tracer, sub: _Subscription, delivery: _Delivery
    ) -> TraceContext | None:
        """The CONSUMER `process` span of a delivery: a child of, and linked to, the
        producer's context that the message carries (W3C `traceparent` header)."""
        message = delivery.message
        headers = message.headers or {}
        parent = _header_value(headers.get("traceparent"))
        state = _header_value(headers.get("tracestate"))
        destination = f"{self.exchange}:{message.routing_key}:{sub.queue}"
        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": destination,
            "messaging.destination.subscription.name": sub.name,
            "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
            "messaging.rabbitmq.message.delivery_tag": message.delivery_tag or 0,
            "messaging.message.body.size": len(message.body),
        }
        if message.message_id:
            attributes["messaging.message.id"] = message.message_id
        trace = tracer.begin(
            parent.encode("latin-1") if parent else None,
            state.encode("latin-1") if state else None,
            f"process {destination}",
            CONSUMER,
            attributes,
        )
        if trace.span is None:
            return None
        if trace.span.parent_id:  # the creation context: also a link, per the conventions
            trace.span.links = ((trace.trace_id, trace.span.parent_id, True),)
        delivery.trace = trace
        return trace

    def _end_consumer_span(
        self, tracer: Tracer, trace: TraceContext, delivery: _Delivery, error: str | None
    ) -> None:
        assert trace.span is not None
        attributes = trace.span.attributes
        attributes["sidecar.delivery.attempt"] = delivery.attempt
        if delivery.outcome:
            attributes["sidecar.delivery.outcome"] = delivery.outcome
        if error is None and delivery.outcome in ("retry", "dead"):
            error = delivery.outcome
        if error is not None:
            attributes["error.type"] = error
        tracer.end(trace, error)

    async def _attempt(self, sub: _Subscription, delivery: _Delivery) -> None:
        config = sub.config
        headers = delivery.message.headers or {}
        delivery.attempt = attempt = previous_attempts(headers) + 1
        if attempt > config.max_attempts:
            # The last attempt failed but its dead-lettering did not finish.
            reason = f"max_attempts ({config.max_attempts}) reached on earlier deliveries"
            await self._dead_letter(sub, delivery, reason, attempt - 1)
            return
        delivery.phase = "posting"
        answer = await self._post(sub, delivery)
        if delivery.link.stale:
            self._dropped(sub, delivery, answer.outcome.value)
            return
        if answer.outcome is Outcome.ACK:
            delivery.outcome = "ack"
            if await self._settle(sub, delivery):
                sub.delivered += 1
                self._metrics.events_delivered.labels(sub.name, "ack").inc()
            return
        sub.last_error = answer.reason
        delivery.outcome = "retry"
        if answer.outcome is Outcome.DEAD or attempt >= config.max_attempts:
            delivery.outcome = "dead"
        if answer.outcome is Outcome.DEAD:
            await self._dead_letter(sub, delivery, answer.reason, attempt)
            return
        if attempt >= config.max_attempts:
            reason = f"{answer.reason} after {attempt} attempts"
            await self._dead_letter(sub, delivery, reason, attempt)
            return
        if answer.wait is not None:
            delay = min(answer.wait, config.backoff_max)
        else:
            delay = backoff_delay(attempt, config.backoff_initial, config.backoff_max, self._rng)
        sub.retried += 1
        self._metrics.events_delivered.labels(sub.name, "retry").inc()
        log.info(
            "delivery_retry",
            subscription=sub.name,
            ce_id=_ce_id(delivery),
            attempt=attempt,
            max_attempts=config.max_attempts,
            reason=answer.reason,
            error=answer.detail or None,
            retry_in_s=round(delay, 3),
        )
        if self._stopping:
            return  # the channel's close gives it back; this attempt is counted
        delivery.phase = "backoff"
        if await delivery.link.wait_closed(delay):
            self._dropped(sub, delivery, "retry")
            return
        await self._settle(sub, delivery, requeue=True)

    async def _post(self, sub: _Subscription, delivery: _Delivery) -> _Answer:
        trace, tracer = delivery.trace, self.tracer
        if trace is None or tracer is None:
            return await self._post_once(sub, delivery, None)
        client = tracer.child(
            trace,
            "POST",
            CLIENT,
            {
                "http.request.method": "POST",
                "url.full": sub.url,
                "server.address": "127.0.0.1",
                "server.port": sub.port,
                "sidecar.delivery.attempt": delivery.attempt,
            },
        )
        assert client.span is not None
        try:
            answer = await self._post_once(sub, delivery, client)
        except BaseException as exc:  # cancelled at shutdown, or a bug: the span still ends
            tracer.end(client, type(exc).__name__)
            raise
        error = None
        if answer.status:
            client.span.attributes["http.response.status_code"] = answer.status
            if answer.status >= 400:
                error = str(answer.status)
        else:
            error = answer.reason.replace(" ", "_")
        if error is not None:
            client.span.attributes["error.type"] = error
        tracer.end(client, error)
        return answer

    async def _post_once(
        self, sub: _Subscription, delivery: _Delivery, client: TraceContext | None
    ) -> _Answer:
        assert self._session is not None
        message = delivery.message
        headers = http_headers(message.headers or {}, message.content_type)
        if client is not None:
            headers["traceparent"] = client.header.decode("latin-1")
            if client.tracestate:
                headers["tracestate"] = client.tracestate
        try:
            async with self._session.post(
                sub.url,
                data=message.body,
                headers=headers,
                skip_auto_headers=() if "Content-Type" in headers else ("Content-Type",),
                allow_redirects=False,
                timeout=sub.timeout,
            ) as response:
                await response.read()
                status = response.status
                wait = retry_after(response.headers.get("Retry-After"), time.time())
        except TimeoutError:
            return _Answer(Outcome.RETRY, "timeout", f"no answer within {sub.config.timeout}s")
        except (aiohttp.ClientError, OSError) as exc:
            return _Answer(Outcome.RETRY, "connection error", str(exc) or type(exc).__name__)
        outcome = classify(status)
        return _Answer(
            outcome,
            f"status {status}",
            wait=wait if outcome is Outcome.RETRY else None,
            status=status,
        )

    async def _dead_letter(
        self, sub: _Subscription, delivery: _Delivery, reason: str, attempts: int
    ) -> None:
        delivery.phase = "dead-lettering"
        link = delivery.link
        if link.stale:
            self._dropped(sub, delivery, "dead")
            return
        message = delivery.message
        headers = {k: v for k, v in (message.headers or {}).items() if k not in _BROKER_COUNTS}
        headers.update(
            {
                "x-sidecar-dead-reason": reason,
                "x-sidecar-attempts": attempts,
                "x-sidecar-subscription": sub.name,
                "x-sidecar-exchange": message.exchange or "",
                "x-sidecar-routing-key": message.routing_key or "",
            }
        )
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=message.priority,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )  # no expiration (the copy must stay) and no user_id (the broker checks it)
        try:
            async with asyncio.timeout(DEAD_LETTER_TIMEOUT):
                confirm = await link.channel.default_exchange.publish(
                    copy, routing_key=sub.dlq, mandatory=True
                )
            if not isinstance(confirm, aiormq.spec.Basic.Ack):
                raise RuntimeError(f"not confirmed: {confirm!r}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # not confirmed: keep the message, try later
            error = self._mask(exc) if str(exc) else type(exc).__name__
            sub.last_error = f"dead-lettering failed: {error}"
            delay = backoff_delay(
                attempts, sub.config.backoff_initial, sub.config.backoff_max, self._rng
            )
            log.error(
                "delivery_dead_letter_failed",
                subscription=sub.name,
                dlq=sub.dlq,
                ce_id=_ce_id(delivery),
                reason=reason,
                error=error,
                retry_in_s=round(delay, 3),
            )
            if self._stopping:
                return
            with contextlib.suppress(Exception):  # in case the DLQ was deleted
                async with asyncio.timeout(DEAD_LETTER_TIMEOUT):
                    await link.channel.declare_queue(
                        sub.dlq, durable=True, arguments={"x-queue-type": "quorum"}
                    )
            delivery.phase = "backoff"
            if not await link.wait_closed(delay):
                await self._settle(sub, delivery, requeue=True)
            return
        if not await self._settle(sub, delivery):
            return  # the original comes back and is dead-lettered again: a duplicate in the DLQ
        sub.dead += 1
        self._metrics.events_delivered.labels(sub.name, "dead").inc()
        log.warning(
            "delivery_dead_lettered",
            subscription=sub.name,
            dlq=sub.dlq,
            reason=reason,
            attempts=attempts,
            ce_id=_ce_id(delivery),
        )

    async def _settle(
        self, sub: _Subscription, delivery: _Delivery, *, requeue: bool | None = None
    ) -> bool:
        """Ack (requeue None) or nack the delivery on its own channel; False if that channel
        is gone, since its delivery tag died with it and the broker requeued the message."""
        delivery.phase = "settling"
        action = "ack" if requeue is None else "nack"
        if delivery.link.stale:
            self._dropped(sub, delivery, action)
            return False
        try:
            if requeue is None:
                await delivery.message.ack()
            else:
                await delivery.message.nack(requeue=requeue)
        except Exception as exc:  # ChannelInvalidStateError, connection errors
            self._dropped(sub, delivery, action, error=self._mask(exc))
            return False
        return True

    def _dropped(
        self, sub: _Subscription, delivery: _Delivery, action: str, error: str | None = None
    ) -> None:
        sub.stale += 1
        log.info(
            "delivery_settle_skipped",
            subscription=sub.name,
            ce_id=_ce_id(delivery),
            action=action,
            attempt=delivery.attempt,
            reason="its channel closed: the broker redelivers the message",
            error=error or delivery.link.error,
        )

    # --- helpers --------------------------------------------------------------------------

    async def _close(self, closing: Awaitable[Any]) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await closing

    def _mask(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        if self._password:
            text = text.replace(self._url, self.broker).replace(self._password, "******")
        return text

    def status(self) -> dict[str, Any]:
        """The subscriptions part of /v1/status."""
        since = self._connected_since
        return {
            "broker": {
                "state": self.state,
                "url": self.broker,
                "exchange": self.exchange,
                "connected_since": None
                if since is None
                else datetime.fromtimestamp(since, UTC).isoformat(timespec="milliseconds"),
                "connections": self._connections,
                "last_error": self._last_error,
            },
            "subscriptions": {sub.name: sub.status() for sub in self._subs},
        }

    def __repr__(self) -> str:
        in_flight = sum(len(sub.deliveries) for sub in self._subs)
        consuming = sum(sub.consuming for sub in self._subs)
        return (
            f"<Subscriptions {self.state} {self.broker} consuming={consuming}/{len(self._subs)} "
            f"in_flight={in_flight}>"
        )


def _ce_id(delivery: _Delivery) -> str | None:
    value = (delivery.message.headers or {}).get("ce-id")
    return None if value is None else str(value)
