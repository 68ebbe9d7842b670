"""`PUT /v1/log-level` on a running sidecar (SPEC §7): the level changes at once for loggers
already in use, for loopback clients only.

A line is written before the admin API answers the request that caused it (stderr is
line-buffered), so once an answer is in, its line is in the log file or never will be.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.amqp_harness import closed_port_url
from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import Sidecar, billing_sidecar, running_sidecar


async def put_level(
    session: aiohttp.ClientSession, admin: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    """PUT /v1/log-level with `json=` or `data=`; the status and the JSON answer."""
    async with session.put(f"{admin}/v1/log-level", **body) as resp:
        answer: dict[str, Any] = await resp.json()
        return resp.status, answer


async def reset_breaker(session: aiohttp.ClientSession, sidecar: Sidecar) -> None:
    async with session.post(f"{sidecar.admin}/v1/breakers/billing/reset") as resp:
        assert 200 == resp.status


def events_named(sidecar: Sidecar, name: str) -> list[dict[str, Any]]:
    return [e for e in sidecar.log_events() if e.get("event") == name]


LogEvents = list[dict[str, Any]]


async def wait_log(
    sidecar: Sidecar, what: str, found: Callable[[LogEvents], bool], timeout: float = 20.0
) -> LogEvents:
    """The sidecar's log events once `found(events)` holds; fail with the log's tail."""
    deadline = time.monotonic() + timeout
    while not found(events := sidecar.log_events()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not logged in {timeout:g}s:\n{sidecar.logs()[-3000:]}")
        await asyncio.sleep(0.05)
    return events


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one: the source
    address the kernel picks for a route out (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route matters
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


class TestLogLevelAtRunTime:
    async def test_debug_lines_of_a_running_loop_appear_after_switching_to_debug(
        self, tmp_path: Path
    ) -> None:
        """The subscriber's reconnect loop logs its repeated `broker_connect_failed` at
        debug: hidden at info; after `PUT debug` from loopback the next ones appear, from
        the module-level logger that was in use all along."""
        events = {
            "amqp_url": closed_port_url(),
            "exchange": "itest-unused",
            "spool": {"path": str(tmp_path / "spool.db")},
            "subscriptions": [{"name": "orders", "topic": "orders.*", "path": "/events"}],
        }
        async with (
            running_sidecar(tmp_path, {}, events=events) as sidecar,
            aiohttp.ClientSession() as session,
        ):
            await wait_log(
                sidecar,
                "the subscriber's first connect failure",
                lambda evs: any(
                    e.get("event") == "broker_connect_failed" and e.get("failures") == 1
                    for e in evs
                ),
            )
            answer = await put_level(session, sidecar.admin, json={"level": "debug"})
            logged = await wait_log(
                sidecar,
                "a debug broker_connect_failed",
                lambda evs: any(
                    e.get("event") == "broker_connect_failed" and e.get("level") == "debug"
                    for e in evs
                ),
            )
        assert (200, {"level": "debug", "previous": "info"}) == answer
        names = [e.get("event") for e in logged]
        switch = names.index("log_level_changed")
        assert ("info", "debug", "127.0.0.1") == (
            logged[switch]["old"],
            logged[switch]["new"],
            logged[switch]["remote"],
        )
        assert [] == [e for e in logged[:switch] if e.get("level") == "debug"]

    async def test_info_lines_disappear_at_warning_and_come_back(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """At `warning` a breaker reset's info line `circuit_reset` is not written; back at
        `info` (sent as plain text, as `curl --data info` does) it is again."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sidecar,
            aiohttp.ClientSession() as session,
        ):
            quiet = await put_level(session, sidecar.admin, data="warning")
            await reset_breaker(session, sidecar)
            resets_when_quiet = len(events_named(sidecar, "circuit_reset"))
            loud = await put_level(session, sidecar.admin, data="info")
            await reset_breaker(session, sidecar)
            resets = len(events_named(sidecar, "circuit_reset"))
            changes = [(e["old"], e["new"]) for e in events_named(sidecar, "log_level_changed")]
        assert (200, {"level": "warning", "previous": "info"}) == quiet
        assert (200, {"level": "info", "previous": "warning"}) == loud
        assert (0, 1) == (resets_when_quiet, resets)
        assert [("info", "warning"), ("warning", "info")] == changes

    async def test_an_unknown_level_is_400_and_changes_nothing(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`verbose` is no level: 400 BAD_REQUEST naming the accepted ones; the sidecar
        keeps logging at info."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sidecar,
            aiohttp.ClientSession() as session,
        ):
            status, answer = await put_level(session, sidecar.admin, json={"level": "verbose"})
            await reset_breaker(session, sidecar)
            resets = len(events_named(sidecar, "circuit_reset"))
        assert (400, "BAD_REQUEST") == (status, answer["error"]["code"])
        assert "debug, info, warning, error" in answer["error"]["message"]
        assert (1, []) == (resets, events_named(sidecar, "log_level_changed"))

    async def test_a_non_loopback_client_is_forbidden(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """With the admin API on 0.0.0.0 (its default), a PUT reaching it from this host's
        own non-loopback address gets 403 FORBIDDEN and the level stays."""
        address = non_loopback_address()
        if address is None:
            pytest.skip("no non-loopback IPv4 address here (tests/unit/test_admin.py covers 403)")
        billing = await upstreams("billing")
        sidecar = Sidecar(tmp_path, {"billing": {"endpoints": [billing.endpoint]}})
        sidecar.config["admin"]["listen"] = f"0.0.0.0:{sidecar.admin_port}"
        sidecar.start()
        try:
            await sidecar.wait_ready()
            async with aiohttp.ClientSession() as session:
                status, answer = await put_level(
                    session, f"http://{address}:{sidecar.admin_port}", data="debug"
                )
                await reset_breaker(session, sidecar)
        finally:
            sidecar.kill()
        assert (403, "FORBIDDEN") == (status, answer["error"]["code"])
        assert ([], 1) == (
            events_named(sidecar, "log_level_changed"),
            len(events_named(sidecar, "circuit_reset")),
        )
