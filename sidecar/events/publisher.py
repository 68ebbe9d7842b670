"""The event relay: the app's events to RabbitMQ, through the spool whenever needed.

`publish()` answers only once the event is durable:

- **confirmed**: the broker acked it (publisher confirms, `mandatory`, persistent),
  within `events.confirm_timeout`;
- **spooled**: committed to the SQLite spool because the broker is down, slow,
  nacked, returned it as unroutable, the connection dropped with the event
  unconfirmed, or the spool already holds events of that topic (per-topic order).

The relay task drains the spool in arrival order while the broker is connected,
pipelining publishes and deleting each event only after its confirm. Unroutable
events (returned: no queue bound) stay in the spool, counted and logged, and are
tried again every `UNROUTABLE_RETRY` seconds. The connection is this module's own
(aio-pika, non-robust) with a reconnect loop, so its state is always known.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import struct
import time
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from pamqp.commands import Basic
from pamqp.common import FieldTable

from sidecar.backoff import backoff_delay
from sidecar.config import Config
from sidecar.errors import ErrorCode, ProxyError
from sidecar.events.cloudevents import Event, from_http
from sidecar.events.spool import Spool, SpoolError, SpoolFull
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import PRODUCER, TraceContext, Tracer

log = get_logger("sidecar.events")

#: Spooled events published per round of the relay (pipelined, then deleted at once).
RELAY_BATCH = 256
#: A topic whose events came back unroutable is tried again after this long.
UNROUTABLE_RETRY = 5.0
CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 15.0

_CONFIRMED, _UNROUTABLE, _FAILED = "confirmed", "unroutable", "failed"


def masked_url(url: str) -> str:
    """The AMQP URL with its password replaced, for logs and /v1/status."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")  # the last @: a raw @ in a password stays hidden
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class EventRelay:
    """See the module docstring. The proxy calls `publish`; the app owns start and stop."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        events = config.events
        self.config = events
        self.source = f"/{config.service.name}"
        self.max_event_bytes = events.max_event_bytes
        self.spool = Spool(events.spool.path, events.spool.max_bytes)
        self.state = "disconnected"  # connecting, connected, disconnected, closed
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self._metrics = metrics
        self._published: dict[tuple[str, str], Any] = {}
        self._seq = 0
        self._exchange: AbstractExchange | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._channel: AbstractChannel | None = None
        self._connection: AbstractConnection | None = None
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._blocked: dict[str, float] = {}  # unroutable topic -> retry time (monotonic)
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random()
        self._relay_failures = 0  # rounds in a row that did not confirm everything
        self.tracer: Tracer | None = None  # a PRODUCER span per sampled publish

    # --- life -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (SpoolError if it cannot be) and start connecting and relaying."""
        await self.spool.open()
        self._seq = self.spool.last_seq
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._connect_forever(), name="amqp-connect"),
            loop.create_task(self._relay_forever(), name="spool-relay"),
        ]

    async def stop(self) -> None:
        """Stop relaying, close the broker connection; the spool keeps what is left."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # a bug in a background task must not break the shutdown
                log.exception("events_task_failed", task=task.get_name())
        self._tasks = []
        self.state = "closed"
        await self._close_connection()
        await self.spool.close()
        log.info("events_stopped", spooled=self.spool.depth)

    # --- publishing -------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        trace: TraceContext | None = None,
    ) -> bytes:
        """Make the app's event durable; the JSON of the 202 answer. ProxyError otherwise.

        With `trace` (tracing on) the event carries that context on in its
        `traceparent` header, spooled or not; a sampled one gets a PRODUCER span
        whose context the event carries, so its consumers join the trace.
        """
        try:
            event = from_http(topic, headers, body, source=self.source, now=time.time())
        except ProxyError:
            self._count(topic if len(topic) <= 255 else "", "rejected")
            raise
        tracer = self.tracer
        if trace is None or tracer is None:
            return _answer(event, await self._publish(event))
        producer = None
        if trace.span is not None:
            destination = f"{self.config.exchange}:{event.topic}"
            producer = tracer.child(
                trace,
                f"publish {destination}",
                PRODUCER,
                {
                    "messaging.system": "rabbitmq",
                    "messaging.operation.name": "publish",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": destination,
                    "messaging.rabbitmq.destination.routing_key": event.topic,
                    "messaging.message.id": event.id,
                    "messaging.message.body.size": len(event.body),
                },
            )
            trace = producer
        event.headers["traceparent"] = trace.header.decode("latin-1")
        if trace.tracestate:
            event.headers["tracestate"] = trace.tracestate
        else:
            event.headers.pop("tracestate", None)
        if producer is None:
            return _answer(event, await self._publish(event))
        assert producer.span is not None
        try:
            outcome = await self._publish(event)
        except ProxyError as exc:
            producer.span.attributes["error.type"] = exc.code.value
            tracer.end(producer, exc.code.value)
            raise
        except BaseException as exc:
            tracer.end(producer, type(exc).__name__)
            raise
        producer.span.attributes["sidecar.event.outcome"] = outcome
        tracer.end(producer)
        return _answer(event, outcome)

    async def _publish(self, event: Event) -> str:
        """Confirm or spool the event; its outcome, "confirmed" or "spooled"."""
        self._seq += 1
        event.seq = self._seq
        if self.state == "connected" and event.topic not in self.spool.topics:
            outcome = await self._publish_one(event)
            if outcome == _CONFIRMED:
                self._count(event.topic, "confirmed")
                return _CONFIRMED
        else:
            outcome = _FAILED
        try:
            self.spool.reserve(event)
        except SpoolFull as exc:
            self._count(event.topic, "rejected")
            log.warning("event_rejected_spool_full", topic=event.topic, id=event.id, error=str(exc))
            raise ProxyError(ErrorCode.SPOOL_FULL, f"event not accepted: {exc}") from None
        try:
            await self.spool.append(event)
        except SpoolError as exc:
            self._count(event.topic, "rejected")
            raise ProxyError(
                ErrorCode.EVENTS_UNAVAILABLE,
                f"event not accepted: the broker did not confirm it and {exc}",
            ) from None
        if outcome == _UNROUTABLE:
            await self._unroutable(event)
        self._count(event.topic, "spooled")
        self._wake.set()
        return "spooled"

    def _count(self, topic: str, outcome: str) -> None:
        child = self._published.get((topic, outcome))
        if child is None:
            child = self._published[(topic, outcome)] = self._metrics.events_published.labels(
                topic, outcome
            )
        child.inc()

    async def _publish_one(self, event: Event) -> str:
        channel = self._underlay
        if channel is None:
            return _FAILED
        # aiormq directly, with the properties built once: aio-pika's Message and
        # Exchange.publish cost about a fifth of a confirmed publish and add nothing here.
        headers: FieldTable = dict(event.headers)
        properties = Basic.Properties(
            headers=headers,
            content_type=event.content_type,
            message_id=event.id,
            timestamp=datetime.fromtimestamp(int(event.time), UTC),
            delivery_mode=2,  # persistent
            app_id="hms-sidecar",
        )
        try:
            # basic_publish's timeout covers the send and the wait for the confirm.
            result = await channel.basic_publish(
                event.body,
                exchange=self.config.exchange,
                routing_key=event.topic,
                properties=properties,
                mandatory=True,
                timeout=self.config.confirm_timeout,
            )
        except TimeoutError:
            self.last_error = f"no confirm within {self.config.confirm_timeout:g}s"
            return _FAILED
        except aiormq.exceptions.DeliveryError:  # basic.nack: the broker refused it
            self.last_error = "the broker nacked an event"
            return _FAILED
        except asyncio.CancelledError:
            raise
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            # The event cannot be encoded (validated at publish time; an older spool may
            # hold one): keep it aside like an unroutable one, never block the others.
            log.error("event_unpublishable", topic=event.topic, id=event.id, error=str(exc))
            return _UNROUTABLE
        except Exception as exc:  # a dead connection surfaces in many types
            self.last_error = f"publish failed: {_describe(exc)}"
            self._lost.set()
            return _FAILED
        if isinstance(result, Basic.Ack):
            return _CONFIRMED
        if isinstance(result, aiormq.abc.DeliveredMessage):  # basic.return: no queue bound
            return _UNROUTABLE
        return _FAILED

    async def _unroutable(self, event: Event) -> None:
        await self.spool.mark_unroutable(event)
        self._metrics.events_unroutable.labels(event.topic).inc()
        first = event.topic not in self._blocked
        self._blocked[event.topic] = time.monotonic() + UNROUTABLE_RETRY
        if first:
            log.warning(
                "event_unroutable",
                topic=event.topic,
                id=event.id,
                exchange=self.config.exchange,
                action=f"kept in the spool; tried again every {UNROUTABLE_RETRY:g}s until a "
                "queue is bound for this topic",
            )

    # --- the relay --------------------------------------------------------------------

    async def _relay_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # also retries unroutable topics
                    await self._wake.wait()
            self._wake.clear()
            try:
                while self.state == "connected" and self.spool.depth:
                    if not await self._relay_batch():
                        break
                if self._relay_failures:
                    # A broker that takes events without confirming them: back off, and
                    # the next round sends one event, so copies cannot pile up.
                    await asyncio.sleep(
                        backoff_delay(self._relay_failures, BACKOFF_FIRST, BACKOFF_CAP, self._rng)
                    )
            except SpoolError as exc:
                log.error("spool_relay_failed", error=str(exc))
                await asyncio.sleep(1.0)

    async def _relay_batch(self) -> bool:
        """Publish the oldest spooled events; whether the round made progress."""
        now = time.monotonic()
        self._blocked = {t: until for t, until in self._blocked.items() if until > now}
        size = 1 if self._relay_failures else RELAY_BATCH
        batch = await self.spool.head(size, self._blocked)
        if not batch:
            return False
        outcomes = await asyncio.gather(*(self._publish_one(e) for e in batch))
        failed = _FAILED in outcomes
        self._relay_failures = self._relay_failures + 1 if failed else 0
        done = [e for e, o in zip(batch, outcomes, strict=True) if o == _CONFIRMED]
        await self.spool.delete(done)
        if done:
            self._metrics.events_relayed.inc(len(done))
        for event, outcome in zip(batch, outcomes, strict=True):
            if outcome == _UNROUTABLE:
                await self._unroutable(event)
        return len(done) == len(batch) or (bool(done) and _FAILED not in outcomes)

    # --- the connection ---------------------------------------------------------------

    async def _connect_forever(self) -> None:
        failures = 0
        url = self.config.amqp_url
        while True:
            self.state = "connecting"
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    connection = await aio_pika.connect(url, timeout=CONNECT_TIMEOUT)
                    channel = await connection.channel(publisher_confirms=True)
                    exchange = await channel.declare_exchange(
                        self.config.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                    )
                    underlay = await channel.get_underlay_channel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # aiormq raises anything from a dead socket
                failures += 1
                delay = backoff_delay(failures, BACKOFF_FIRST, BACKOFF_CAP, self._rng)
                self.state = "disconnected"
                self.last_error = f"cannot connect to {masked_url(url)}: {_describe(exc)}"
                log.warning(
                    "broker_connect_failed",
                    error=self.last_error,
                    retry_in_s=round(delay, 3),
                    failures=failures,
                    spooled=self.spool.depth,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._connection, self._channel, self._exchange = connection, channel, exchange
            self._underlay = underlay
            self._lost.clear()
            connection.close_callbacks.add(self._on_close)
            channel.close_callbacks.add(self._on_close)
            self.state = "connected"
            self.connected_since = time.time()
            self.last_error = None
            log.info(
                "broker_connected",
                url=masked_url(url),
                exchange=self.config.exchange,
                spooled=self.spool.depth,
            )
            self._wake.set()
            await self._lost.wait()
            self.state = "disconnected"
            self._exchange = self._underlay = None
            log.warning("broker_connection_lost", error=self.last_error, spooled=self.spool.depth)
            await self._close_connection()

    def _on_close(self, _: object, exc: BaseException | None = None) -> None:
        if exc is not None and self.last_error is None:
            self.last_error = _describe(exc)
        self._lost.set()

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = self._underlay = None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()

    # --- state ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "broker": {
                "url": masked_url(self.config.amqp_url),
                "state": self.state,
                "exchange": self.config.exchange,
                "last_error": self.last_error,
            },
            "spool": self.spool.status(),
            "unroutable_topics": sorted(self._blocked),
        }

    def __repr__(self) -> str:
        return f"<EventRelay {self.state} spool={self.spool.depth}>"


def _answer(event: Event, status: str) -> bytes:
    return json.dumps({"id": event.id, "topic": event.topic, "status": status}).encode()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
