"""Discovery from Consul: one long-lived blocking query per upstream.

`ConsulResolver` watches `/v1/health/service/<service>?passing` (with the
upstream's tags and the configured datacenter) by Consul's rules for blocking
queries: it sends the last `X-Consul-Index`, resets to 0 when the index goes
backwards, clamps it to at least 1, waits at least `MIN_INTERVAL` between two
queries so a flapping service cannot cause a query storm, and backs off with
full jitter on errors. Only a changed endpoint set is pushed to the balancer.
During an outage the last known endpoints stay in service and the watch is
`stale`. Instances registered in catalog mode carry a heartbeat; one older than
three of its intervals is skipped even though the catalog still says passing.
After a failed query the next one does not block, so recovery shows at once.

`DynamicServices` serves `discovery.allow_any_service`: a watch per service
name the app calls, started on first use (after asking the catalog whether the
name exists at all), stopped after `idle_after` without a request, at most
`max_services` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from sidecar.backoff import backoff_delay
from sidecar.discovery.base import Endpoint, Listener
from sidecar.discovery.consul_client import ConsulClient
from sidecar.discovery.heartbeat import heartbeat_deadline
from sidecar.errors import ConsulError
from sidecar.telemetry.logging import get_logger

log = get_logger("sidecar.consul")

#: Consul's default `wait`; the answer comes sooner when the service changes.
WAIT = 300.0
#: Minimum time between the starts of two queries of one watch.
MIN_INTERVAL = 0.25
BACKOFF_FIRST = 0.5
#: Longest pause between two failed queries: also the longest a recovered Consul waits.
BACKOFF_CAP = 10.0


def _endpoint(entry: dict[str, Any]) -> Endpoint | None:
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    host = service.get("Address") or node.get("Address")
    port = service.get("Port")
    if not host or not isinstance(port, int) or not 0 < port < 65536:
        return None
    meta = (("id", str(service.get("ID", ""))), ("node", str(node.get("Node", ""))))
    return Endpoint(str(host), port, meta)


class ConsulResolver:
    """A live endpoint set for one Consul service. See the module docstring."""

    def __init__(
        self,
        client: ConsulClient,
        service: str,
        tags: Sequence[str] = (),
        *,
        upstream: str | None = None,
        wait: float = WAIT,
        min_interval: float = MIN_INTERVAL,
        backoff_cap: float = BACKOFF_CAP,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.service = service
        self.tags = tuple(tags)
        self.upstream = upstream or service
        self.wait = wait
        self.min_interval = min_interval
        self.backoff_cap = backoff_cap
        self.index = 0
        self.last_success: float | None = None  # wall-clock time of the last good answer
        self.failing_since: float | None = None  # wall-clock time of the first failed query
        self.last_error: str | None = None
        self.skipped_stale = 0
        self._rng = rng or random.Random()
        self._listeners: list[Listener] = []
        self._endpoints: tuple[Endpoint, ...] = ()
        self._entries: list[dict[str, Any]] = []
        self._answered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refilter: asyncio.TimerHandle | None = None
        self._failures = 0

    # --- Resolver -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._answered.is_set()

    @property
    def stale(self) -> bool:
        return self.failing_since is not None

    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        if self.ready:
            listener(self._endpoints)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"consul-watch-{self.service}"
            )

    async def stop(self) -> None:
        if self._refilter is not None:
            self._refilter.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def first_answer(self) -> None:
        """Return once the first answer is in (bound it with `asyncio.timeout`)."""
        await self._answered.wait()

    # --- the watch ------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_start = -self.min_interval
        while True:
            pause = last_start + self.min_interval - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            last_start = loop.time()
            # After a failure the next query does not block: Consul's answer says at once
            # that it is back (and what changed meanwhile) instead of up to `wait` later.
            since = 0 if self.failing_since is not None else self.index
            try:
                index, entries = await self.client.health_service(
                    self.service, index=since, wait=self.wait, tags=self.tags
                )
            except ConsulError as exc:
                await self._failed(exc)
                continue
            self._succeeded()
            if index < self.index:
                log.info(
                    "consul_index_went_backwards",
                    service=self.service,
                    was=self.index,
                    now=index,
                    action="starting over from index 0",
                )
                self.index = 0  # Consul's rule: a lower index means reset
            else:
                self.index = max(index, 1)  # never block on 0
            self._entries = entries
            self._publish()

    def _succeeded(self) -> None:
        now = time.time()
        if self.failing_since is not None:
            log.info(
                "consul_watch_recovered",
                upstream=self.upstream,
                service=self.service,
                stale_for_s=round(now - self.failing_since, 3),
            )
        self.last_success = now
        self.failing_since = None
        self.last_error = None
        self._failures = 0

    async def _failed(self, exc: ConsulError) -> None:
        self._failures += 1
        if self.failing_since is None:
            self.failing_since = time.time()
        self.last_error = str(exc)
        delay = backoff_delay(self._failures, BACKOFF_FIRST, self.backoff_cap, self._rng)
        log.warning(
            "consul_watch_failed",
            upstream=self.upstream,
            service=self.service,
            error=str(exc),
            keeping=[str(e) for e in self._endpoints],
            retry_in_s=round(delay, 3),
            failures=self._failures,
        )
        await asyncio.sleep(delay)

    def _publish(self) -> None:
        """Filter the last answer (stale heartbeats out) and push it if it changed."""
        if self._refilter is not None:
            self._refilter.cancel()
            self._refilter = None
        now = time.time()
        endpoints: list[Endpoint] = []
        next_stale = float("inf")
        skipped = 0
        for entry in self._entries:
            endpoint = _endpoint(entry)
            if endpoint is None:
                continue
            deadline = heartbeat_deadline(entry)
            if deadline is not None:
                if deadline <= now:
                    skipped += 1
                    continue
                next_stale = min(next_stale, deadline)
            endpoints.append(endpoint)
        if skipped != self.skipped_stale:
            log.info(
                "consul_stale_heartbeats",
                upstream=self.upstream,
                service=self.service,
                skipped=skipped,
            )
            self.skipped_stale = skipped
        if next_stale != float("inf"):
            loop = asyncio.get_running_loop()
            self._refilter = loop.call_later(max(0.0, next_stale - now) + 0.01, self._publish)
        fresh = tuple(sorted(endpoints, key=lambda e: (e.host, e.port)))
        first = not self._answered.is_set()
        if fresh == self._endpoints and not first:
            return
        self._endpoints = fresh
        self._answered.set()
        for listener in self._listeners:
            listener(fresh)

    def status(self) -> dict[str, Any]:
        """The discovery part of this upstream's /v1/status entry."""
        now = time.time()
        return {
            "source": "consul",
            "service": self.service,
            "tags": list(self.tags),
            "index": self.index,
            "stale": self.stale,
            "stale_for_s": None
            if self.failing_since is None
            else round(now - self.failing_since, 3),
            "last_success_age_s": None
            if self.last_success is None
            else round(now - self.last_success, 3),
            "last_error": self.last_error,
            "skipped_stale_heartbeats": self.skipped_stale,
        }

    def __repr__(self) -> str:
        return (
            f"<ConsulResolver {self.service} index={self.index} stale={self.stale} "
            f"endpoints={len(self._endpoints)}>"
        )


class DynamicServices:
    """Upstreams made on demand for `discovery.allow_any_service`."""

    def __init__(
        self,
        client: ConsulClient,
        make: Callable[[str, ConsulResolver], Any],
        retire: Callable[[str, Any], None],
        *,
        max_services: int,
        idle_after: float,
        first_answer_timeout: float = 5.0,
        unknown_ttl: float = 5.0,
    ) -> None:
        self.client = client
        self._make = make  # (name, resolver) -> an Upstream, whose `served` counts requests
        self._retire = retire  # (name, upstream): out of routing, connections closed
        self.max_services = max_services
        self.idle_after = idle_after
        self.first_answer_timeout = first_answer_timeout
        self.unknown_ttl = unknown_ttl
        self.watches: dict[str, tuple[Any, ConsulResolver]] = {}
        self._unknown: dict[str, float] = {}  # name -> until when "not in Consul" is cached
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._last_seen: dict[str, tuple[int, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def lookup(self, name: str) -> Any | None:
        """The upstream for `name`, starting its watch on first use; None when Consul does
        not know the name (or too many watches exist). Raises ConsulError when Consul
        cannot be asked."""
        known = self.watches.get(name)
        if known is not None:
            return known[0]
        if self._unknown.get(name, 0.0) > time.monotonic():
            return None
        pending = self._pending.get(name)
        if pending is None:
            pending = self._pending[name] = asyncio.ensure_future(self._start(name))
            pending.add_done_callback(lambda done: self._started(name, done))
        return await asyncio.shield(pending)

    def _started(self, name: str, done: asyncio.Future[Any]) -> None:
        self._pending.pop(name, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have gone

    async def _start(self, name: str) -> Any | None:
        if len(self.watches) >= self.max_services:
            log.warning(
                "dynamic_service_limit",
                service=name,
                max_services=self.max_services,
                hint="raise discovery.max_services or configure the upstream",
            )
            return None
        if not await self.client.service_known(name):
            self._unknown[name] = time.monotonic() + self.unknown_ttl
            return None
        resolver = ConsulResolver(self.client, name)
        upstream = self._make(name, resolver)
        await resolver.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.first_answer_timeout):
                await resolver.first_answer()
        if not resolver.ready:
            log.warning("dynamic_service_no_answer", service=name)
        self.watches[name] = (upstream, resolver)
        self._last_seen[name] = (-1, time.monotonic())
        log.info("dynamic_service_watch_started", service=name, watches=len(self.watches))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return upstream

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_after / 4, 30.0))
            now = time.monotonic()
            for name, (upstream, resolver) in list(self.watches.items()):
                served = upstream.served
                seen, since = self._last_seen[name]
                if served != seen or upstream.inflight:
                    self._last_seen[name] = (served, now)
                elif now - since >= self.idle_after:
                    del self.watches[name]
                    del self._last_seen[name]
                    await resolver.stop()
                    self._retire(name, upstream)
                    log.info("dynamic_service_watch_stopped", service=name, reason="idle")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for pending in list(self._pending.values()):
            pending.cancel()
        for _, resolver in self.watches.values():
            await resolver.stop()

    def __repr__(self) -> str:
        return f"<DynamicServices watches={sorted(self.watches)} max={self.max_services}>"


__all__ = ["ConsulResolver", "DynamicServices"]
