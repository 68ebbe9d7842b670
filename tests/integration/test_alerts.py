"""Threshold alerts end to end: a real Alertmanager told when an upstream's circuit opens
and when it closes, the `alerts.<name>` events in a RabbitMQ queue, the gauge, /v1/status,
and alerting that goes on when Alertmanager or the broker cannot be reached.

Each test declares an exchange of its own (deleted at the end) and holds the broker lock
shared, so no cooperating suite stops RabbitMQ under it. Intervals are short (100 ms
evaluation, 500 ms resend) so the tests are quick.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.alertmanager_harness import Alertmanager, running_alertmanager
from tests.integration.amqp_harness import (
    AmqpScope,
    closed_port_url,
    events_config,
    wait_events,
)
from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import Sidecar, free_port, metric_samples

FAST = {"evaluation_interval": "100ms", "resend_interval": "500ms"}
CIRCUIT_RULE = {
    "name": "billing-circuit",
    "kind": "circuit_open",
    "upstream": "billing",
    "for": "0s",
    "severity": "critical",
}


pytestmark = pytest.mark.usefixtures("broker_shared")


@pytest.fixture
async def alertmanager(tmp_path: Path) -> AsyncIterator[Alertmanager]:
    async with running_alertmanager(tmp_path) as manager:
        yield manager


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def flaky_billing(endpoint: str) -> dict[str, Any]:
    """`billing` whose circuit opens after 3 failures and lets a probe through after 1 s."""
    return {
        "endpoints": [endpoint],
        "retries": {"max": 0},
        "circuit_breaker": {"failure_threshold": 3, "open_for": "1s"},
        "outlier": {"consecutive_failures": 1000},  # the breaker, not ejection, reacts
    }


async def started(sidecar: Sidecar) -> Sidecar:
    sidecar.start()
    try:
        await sidecar.wait_ready()
    except BaseException:
        sidecar.kill()
        raise
    return sidecar


async def status(session: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    async with session.get(f"{sidecar.admin}/v1/status") as resp:
        body: dict[str, Any] = await resp.json()
    return body


async def wait_status(
    session: aiohttp.ClientSession,
    sidecar: Sidecar,
    done: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Poll /v1/status until `done(status)`; fail with the last status and the log."""
    deadline = time.monotonic() + timeout
    while True:
        body = await status(session, sidecar)
        if done(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} not reached in {timeout:g}s; status: {body}\n"
                f"sidecar log tail:\n{sidecar.logs()[-3000:]}"
            )
        await _pause()


async def wait_alertmanager(
    session: aiohttp.ClientSession,
    manager: Alertmanager,
    done: Callable[[list[dict[str, Any]]], bool],
    what: str,
    *,
    sidecar: Sidecar,
    timeout: float = 20.0,
) -> list[dict[str, Any]]:
    """Poll Alertmanager's GET /api/v2/alerts until `done(alerts)`."""
    deadline = time.monotonic() + timeout
    while True:
        alerts = await manager.alerts(session)
        if done(alerts):
            return alerts
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} not reached in {timeout:g}s; Alertmanager holds: {alerts}\n"
                f"sidecar log tail:\n{sidecar.logs()[-3000:]}"
            )
        await _pause()


async def _pause() -> None:
    await asyncio.sleep(0.05)


def named(alerts: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["labels"].get("alertname") == name]


def firing_names(body: dict[str, Any]) -> list[str]:
    return [a["name"] for a in body["alerts"]["firing"]]


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class TestAlertmanager:
    async def test_open_circuit_fires_in_alertmanager_and_closing_resolves_it(
        self,
        tmp_path: Path,
        upstreams: UpstreamFactory,
        alertmanager: Alertmanager,
        scope: AmqpScope,
        session: aiohttp.ClientSession,
    ) -> None:
        """billing fails until its circuit opens: Alertmanager holds an active
        billing-circuit alert with the sidecar's labels, kept active past its first endsAt
        by re-sends; /v1/status and the gauge show it firing. billing recovers, a probe
        closes the circuit: Alertmanager receives the resolution and no longer lists the
        alert, and a queue bound to alerts.# got the firing and the resolved event."""
        billing = await upstreams("billing")
        billing.failing = True
        queue = await scope.bind("alerts.#")
        sidecar = Sidecar(
            tmp_path,
            {"billing": flaky_billing(billing.endpoint)},
            events=events_config(scope.exchange, tmp_path / "spool.db"),
            alerts={"alertmanager_url": alertmanager.url, **FAST, "rules": [CIRCUIT_RULE]},
        )
        await started(sidecar)
        try:
            await wait_events(
                session, sidecar, lambda s: s["broker"]["state"] == "connected", what="broker"
            )
            url = f"{sidecar.url}/v1/invoke/billing/flaky"
            answers = []
            for _ in range(4):
                async with session.get(url) as resp:
                    answers.append((resp.status, resp.headers.get("x-sidecar-error")))
            assert [(500, None)] * 3 + [(503, "CIRCUIT_OPEN")] == answers

            active = await wait_alertmanager(
                session,
                alertmanager,
                lambda alerts: bool(named(alerts, "billing-circuit")),
                "the alert active in Alertmanager",
                sidecar=sidecar,
            )
            [alert] = named(active, "billing-circuit")
            assert {
                "alertname": "billing-circuit",
                "service": "itest",
                "instance": f"itest-{socket.gethostname()}",
                "severity": "critical",
                "kind": "circuit_open",
                "upstream": "billing",
            } == alert["labels"]
            assert "active" == alert["status"]["state"]
            assert "Circuit open for upstream billing" == alert["annotations"]["summary"]
            first_ends = parse_time(alert["endsAt"])
            firing = await status(session, sidecar)
            assert ["billing-circuit"] == firing_names(firing)
            samples = await metric_samples(sidecar)
            assert 1.0 == samples['sidecar_alerts_firing{alert="billing-circuit"}']

            # Re-sent while firing: still active after the endsAt of the first POST (no
            # request reaches billing meanwhile, so the circuit stays open, then half-open).
            still = await wait_alertmanager(
                session,
                alertmanager,
                lambda alerts: (
                    not named(alerts, "billing-circuit") or datetime.now(UTC) > first_ends
                ),
                "the first endsAt passing",
                sidecar=sidecar,
            )
            assert ["active"] == [a["status"]["state"] for a in named(still, "billing-circuit")]

            billing.failing = False
            async with session.get(url) as resp:  # the half-open probe: closes the circuit
                assert 200 == resp.status
            await wait_alertmanager(
                session,
                alertmanager,
                lambda alerts: not named(alerts, "billing-circuit"),
                "the alert resolved in Alertmanager",
                sidecar=sidecar,
            )
            resolved_received = await alertmanager.metric(
                session, 'alertmanager_alerts_received_total{status="resolved",version="v2"}'
            )
            after = await wait_status(
                session, sidecar, lambda s: not s["alerts"]["firing"], "no alert firing"
            )
            samples = await metric_samples(sidecar)
            received = await scope.read(queue, count=2)
        finally:
            sidecar.kill()
        assert resolved_received >= 1  # told by the sidecar, not expired on its own
        assert ([], "closed") == (
            after["alerts"]["firing"],
            after["upstreams"]["billing"]["circuit"],
        )
        assert 0.0 == samples['sidecar_alerts_firing{alert="billing-circuit"}']
        assert [("alerts.billing-circuit", "firing"), ("alerts.billing-circuit", "resolved")] == [
            (m.routing_key, m.json()["state"]) for m in received
        ]
        assert ["io.hms-sidecar.alert"] * 2 == [m.headers["ce-type"] for m in received]
        firing_event, resolved_event = (m.json() for m in received)
        assert (2.0, None, "billing") == (
            firing_event["value"],
            firing_event["endsAt"],
            firing_event["labels"]["upstream"],
        )
        assert firing_event["startsAt"] == resolved_event["startsAt"] < resolved_event["endsAt"]
        logged = [e["event"] for e in sidecar.log_events() if e.get("logger") == "sidecar.alerts"]
        assert ["alert_firing", "alert_resolved"] == logged


class TestWithoutAlertmanager:
    async def test_unreachable_alertmanager_does_not_stop_alerting(
        self,
        tmp_path: Path,
        upstreams: UpstreamFactory,
        session: aiohttp.ClientSession,
    ) -> None:
        """Alertmanager's port refuses connections: an error_rate alert still fires (status,
        gauge, log line), and /v1/status says why Alertmanager was not told."""
        billing = await upstreams("billing")
        billing.failing = True
        rule = {
            "name": "billing-errors",
            "kind": "error_rate",
            "upstream": "billing",
            "threshold": 0.5,
            "window": "10s",
            "min_requests": 5,
        }
        cfg = {**flaky_billing(billing.endpoint), "circuit_breaker": {"failure_threshold": 100}}
        sidecar = Sidecar(
            tmp_path,
            {"billing": cfg},
            alerts={"alertmanager_url": f"http://127.0.0.1:{free_port()}", **FAST, "rules": [rule]},
        )
        await started(sidecar)
        try:
            for _ in range(5):
                async with session.get(f"{sidecar.url}/v1/invoke/billing/flaky") as resp:
                    assert 500 == resp.status
            body = await wait_status(
                session,
                sidecar,
                lambda s: bool(s["alerts"]["firing"] and s["alerts"]["alertmanager"]["last_error"]),
                "the alert firing with Alertmanager unreachable",
            )
            samples = await metric_samples(sidecar)
        finally:
            sidecar.kill()
        [alert] = body["alerts"]["firing"]
        assert ("billing-errors", 1.0, 0.5) == (alert["name"], alert["value"], alert["threshold"])
        assert "cannot POST to" in body["alerts"]["alertmanager"]["last_error"]
        assert 1.0 == samples['sidecar_alerts_firing{alert="billing-errors"}']
        events = [e["event"] for e in sidecar.log_events() if e.get("logger") == "sidecar.alerts"]
        assert ["alert_firing", "alertmanager_send_failed"] == events[:2]

    async def test_broker_down_fires_broker_and_spool_alerts(
        self, tmp_path: Path, session: aiohttp.ClientSession
    ) -> None:
        """No broker at the AMQP URL: broker_unreachable fires; its own event goes to the
        spool (nothing lost), which makes spool_depth (threshold 1) fire too. SIGTERM then
        stops the sidecar cleanly (exit 0) with both alert events in the spool."""
        rules = [
            {"name": "broker", "kind": "broker_unreachable"},
            {"name": "spool", "kind": "spool_depth", "threshold": 1},
        ]
        sidecar = Sidecar(
            tmp_path,
            {},
            events=events_config("unused", tmp_path / "spool.db", url=closed_port_url()),
            alerts={**FAST, "rules": rules},
        )
        await started(sidecar)
        try:
            body = await wait_status(
                session,
                sidecar,
                lambda s: sorted(firing_names(s)) == ["broker", "spool"],
                "both alerts firing",
            )
            sidecar.signal(signal.SIGTERM)
            code = await sidecar.wait_exit()
        finally:
            sidecar.kill()
        assert body["events"]["spool"]["depth"] >= 1
        assert None is body["alerts"]["alertmanager"]
        assert 0 == code
        [stopped] = [e for e in sidecar.log_events() if e["event"] == "events_stopped"]
        assert 2 == stopped["spooled"]  # the firing events of both rules, kept
        assert [] == [e for e in sidecar.log_events() if e["level"] in ("error", "critical")]
