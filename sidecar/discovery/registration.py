"""Registration of the app in Consul, and keeping its health there true.

Agent mode (`consul.mode: agent`): the service goes to the local agent with a TTL
check the sidecar keeps up to date from its own probe of the app; the TTL outlives
one slow probe, and `DeregisterCriticalServiceAfter` lets Consul reap an instance
whose sidecar died. A 404 on a check update means the agent forgot the service
(it restarted without its state): the sidecar registers again at once.

Catalog mode (`consul.mode: catalog`, agentless clusters): the sidecar registers
its own node, the service and one check on the servers' catalog, and re-registers
every interval with the probe's status and a heartbeat (the time, in the check's
output). The catalog has no TTL, so discovery (`discovery.consul`) skips an
instance whose heartbeat is older than three of its intervals, and each sidecar
removes sibling instances of its own service (same name, another sidecar's node)
whose heartbeat is older than `deregister_critical_after`: what Consul's reaper
does for TTL checks in agent mode.

Both modes: Consul unreachable or refusing → the sidecar keeps serving, retries
with jittered exponential backoff and says why in /ready and /v1/status;
`deregister()` (SIGTERM) removes the instance before the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sidecar.backoff import backoff_delay
from sidecar.config import Config
from sidecar.discovery.consul_client import ConsulClient
from sidecar.discovery.health import AppProbe, ProbeResult
from sidecar.discovery.heartbeat import HEARTBEAT_CHECK_PREFIX, heartbeat_line, heartbeat_time
from sidecar.errors import ConsulError, ConsulNotFound, ConsulPermissionDenied
from sidecar.telemetry.logging import get_logger

log = get_logger("sidecar.consul")

#: Backoff after a failed registration: full jitter, doubling from the first to the cap.
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0
#: Bound on the deregistration call made while shutting down.
DEREGISTER_TIMEOUT = 5.0


def _go_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class Registrar:
    """Registers the app, reports its health each interval and deregisters it on stop.

    `state` is one of: pending (not registered yet), registered, deregistering,
    deregistered, failed (deregistration failed).
    """

    def __init__(
        self,
        config: Config,
        client: ConsulClient,
        *,
        on_registered: Callable[[], None],
        explain: Callable[[str], None],
        rng: random.Random | None = None,
    ) -> None:
        service = config.service
        assert service.port is not None  # config requires it when Consul is on
        self.mode = config.consul.mode
        self.node = config.consul.node
        self.service = service
        self.client = client
        self.interval = service.health.interval
        self.ttl = 2 * service.health.interval + service.health.timeout
        self.check_id = (
            f"service:{service.id}"
            if self.mode == "agent"
            else f"{HEARTBEAT_CHECK_PREFIX}{service.id}"
        )
        self.probe = AppProbe(service.port, service.health)
        self.state = "pending"
        self.registered = False  # Consul holds this instance (as far as the sidecar knows)
        self._sent = False  # a registration was sent: Consul may hold it, answer or not
        self.last_error: str | None = None
        self.last_report: float | None = None  # wall-clock time of the last accepted update
        self._on_registered = on_registered
        self._explain = explain
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self.probe_status: str | None = None
        self._next_reap = 0.0
        self.reaped = 0

    # --- life -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="consul-register")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def deregister(self) -> None:
        """Stop reporting and remove this instance from Consul (SIGTERM, before the drain)."""
        await self.stop()
        if not self.registered and not self._sent:
            log.info("consul_deregister_skipped", reason="never registered", state=self.state)
            return
        self.state = "deregistering"
        try:
            async with asyncio.timeout(DEREGISTER_TIMEOUT):
                if self.mode == "agent":
                    await self.client.agent_deregister(self.service.id)
                else:
                    await self.client.catalog_deregister(self.node)
        except (ConsulError, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, ConsulError) else "timed out"
            if isinstance(exc, ConsulNotFound):
                self.state, self.registered = "deregistered", False
                log.info("consul_deregistered", service_id=self.service.id, note=reason)
                return
            self.state = "failed"
            self.last_error = reason
            log.warning(
                "consul_deregister_failed",
                service_id=self.service.id,
                error=reason,
                consequence="callers may still pick this instance until its check goes "
                "critical or its heartbeat is stale",
            )
            return
        self.state, self.registered = "deregistered", False
        log.info("consul_deregistered", mode=self.mode, service_id=self.service.id)

    # --- the loop -------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            result = await self.probe.check()
            try:
                if not self.registered:
                    await self._register(result)
                else:
                    await self._report(result)
            except ConsulNotFound as exc:
                if self.mode == "agent" and self.registered:
                    log.warning(
                        "consul_registration_lost",
                        service_id=self.service.id,
                        error=str(exc),
                        action="registering again",
                    )
                    self.registered = False
                    self.state = "pending"
                    continue
                await self._failed(exc)
                continue
            except ConsulError as exc:
                await self._failed(exc)
                continue
            self._failures = 0
            if self.mode == "catalog" and loop.time() >= self._next_reap:
                self._next_reap = loop.time() + self.service.health.deregister_critical_after / 2
                await self._reap_siblings()
            await asyncio.sleep(max(0.0, began + self.interval - loop.time()))

    async def _failed(self, exc: ConsulError) -> None:
        self._failures += 1
        delay = backoff_delay(self._failures, BACKOFF_FIRST, BACKOFF_CAP, self._rng)
        self.last_error = str(exc)
        hint = (
            "check the ACL token (CONSUL_HTTP_TOKEN or consul.token_file): it needs "
            f"service:write on {self.service.name!r}"
            + (" and node:write" if self.mode == "catalog" else "")
            if isinstance(exc, ConsulPermissionDenied)
            else None
        )
        if not self.registered:
            self._explain(f"consul: {self.service.name!r} not registered yet: {exc}")
        log.warning(
            "consul_register_failed" if not self.registered else "consul_check_update_failed",
            error=str(exc),
            hint=hint,
            retry_in_s=round(delay, 3),
            failures=self._failures,
        )
        await asyncio.sleep(delay)

    async def _register(self, result: ProbeResult) -> None:
        service = self.service
        self._sent = True
        if self.mode == "agent":
            check = {
                "CheckID": self.check_id,
                "Name": "hms-sidecar probe of the app",
                "Notes": f"Kept by hms-sidecar from its local probe ({self.probe.target}).",
                "TTL": _go_duration(self.ttl),
                "DeregisterCriticalServiceAfter": _go_duration(
                    service.health.deregister_critical_after
                ),
                "Status": result.status,
            }
            await self.client.agent_register(self._service_body("Name"), check)
            # A re-registration keeps the check's old status: report the probe now.
            await self.client.agent_check(self.check_id, result.status, result.note)
        else:
            await self._catalog(result, "register")
        self.registered = True
        self.probe_status = result.status
        self.state = "registered"
        self.last_error = None
        self.last_report = time.time()
        log.info(
            "consul_registered",
            mode=self.mode,
            service=service.name,
            service_id=service.id,
            address=f"{service.address}:{service.port}",
            check_id=self.check_id,
            status=result.status,
            note=result.note,
            **({"ttl_s": self.ttl} if self.mode == "agent" else {"node": self.node}),
        )
        self._on_registered()

    async def _report(self, result: ProbeResult) -> None:
        if self.mode == "agent":
            await self.client.agent_check(self.check_id, result.status, result.note)
        else:
            await self._catalog(result, "check_update")
        previous = self.probe_status
        self.probe_status = result.status
        self.last_report = time.time()
        if previous != result.status:
            level = log.info if result.status == "passing" else log.warning
            level("app_health_changed", old=previous, new=result.status, note=result.note)

    async def _catalog(self, result: ProbeResult, operation: str) -> None:
        service = self.service
        check = {
            "Node": self.node,
            "CheckID": self.check_id,
            "Name": "hms-sidecar probe of the app",
            "Notes": "Pushed by hms-sidecar every interval; stale heartbeat = sidecar gone.",
            "Status": result.status,
            "ServiceID": service.id,
            "Output": f"{result.note}\n{heartbeat_line(time.time(), self.interval)}",
        }
        await self.client.catalog_register(
            self.node, service.address, self._service_body("Service"), check, operation
        )

    async def _reap_siblings(self) -> None:
        """Deregister instances of this service whose sidecar stopped heartbeating longer
        than `deregister_critical_after` ago (SIGKILLed, node lost); errors are logged."""
        try:
            _, entries = await self.client.health_service(
                self.service.name, index=0, wait=1.0, passing=False
            )
        except ConsulError as exc:
            log.info("consul_reap_skipped", error=str(exc))
            return
        now = time.time()
        limit = self.service.health.deregister_critical_after
        for entry in entries:
            node_info = entry.get("Node") or {}
            node = node_info.get("Node")
            service_id = (entry.get("Service") or {}).get("ID")
            last_beat = heartbeat_time(entry)
            if last_beat is None or not node or node == self.node:
                continue
            if now - last_beat < limit:
                continue
            # A node this sidecar kind made holds one instance: remove it whole.
            ours = (node_info.get("Meta") or {}).get("external-source") == "hms-sidecar"
            try:
                await self.client.catalog_deregister(node, None if ours else service_id)
            except ConsulError as exc:
                log.warning("consul_reap_failed", node=node, service_id=service_id, error=str(exc))
                continue
            self.reaped += 1
            log.warning(
                "consul_reaped_stale_instance",
                node=node,
                service_id=service_id,
                silent_for_s=round(now - last_beat, 1),
                deregister_critical_after_s=limit,
            )

    def _service_body(self, name_key: str) -> dict[str, Any]:
        service = self.service
        return {
            "ID": service.id,
            name_key: service.name,
            "Address": service.address,
            "Port": service.port,
            "Tags": list(service.tags),
            "Meta": dict(service.meta),
        }

    @property
    def failing(self) -> bool:
        """Whether the last registration or health report did not reach Consul (the
        `consul_unreachable` alert); cleared by the next one that does."""
        return self._failures > 0

    def status(self) -> dict[str, Any]:
        """The registration part of /v1/status."""
        return {
            "mode": self.mode,
            "state": self.state,
            "service_id": self.service.id,
            "check_id": self.check_id,
            **({"node": self.node} if self.mode == "catalog" else {"ttl_s": self.ttl}),
            "app_health": None if self.probe.last is None else self.probe.last._asdict(),
            "last_report": _iso(self.last_report),
            "last_error": self.last_error,
        }

    def __repr__(self) -> str:
        return f"<Registrar {self.mode} {self.service.id} state={self.state}>"


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
