"""Consul end to end (SPEC §5, §7, §8): real `sidecar run` processes against the
Consul double: registration and its TTL check, discovery by other sidecars,
the awkward parts of blocking queries, outages, ACL tokens, catalog mode and
the shutdown order.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.doubles.consul import ConsulDouble, Policy, RecordedRequest
from tests.integration.conftest import UpstreamFactory
from tests.integration.consul_harness import (
    Fleet,
    RelayApp,
    body_field,
    counting_listener,
    endpoints_of,
    running_consul,
    service_config,
    wait_until,
    watch_parked,
)
from tests.integration.harness import free_port, metric_samples


@pytest.fixture
async def consul() -> AsyncIterator[ConsulDouble]:
    """A Consul double with ACLs off, on a free port; stopped afterwards."""
    async with running_consul() as double:
        yield double


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """Starts sidecars against a double; every one is killed afterwards."""
    started = Fleet(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


async def get_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


HEARTBEAT = "hms-sidecar heartbeat"


def _utc(when: float) -> str:
    """A heartbeat's time stamp: UTC, milliseconds, `Z`."""
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def health_queries(double: ConsulDouble, service: str) -> list[RecordedRequest]:
    """The blocking queries the double saw for `service`'s healthy instances."""
    return [
        r
        for r in double.requests
        if r.method == "GET" and r.path == f"/v1/health/service/{service}"
    ]


class TestAgentRegistration:
    @pytest.mark.parametrize("probe", ["http", "tcp"])
    async def test_registers_with_a_passing_ttl_check(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory, probe: str
    ) -> None:
        """The agent holds the service as configured (ID, name, address, port, tags, meta)
        with a TTL check of 2*interval+timeout and DeregisterCriticalServiceAfter, passing
        with a note naming the probe; /metrics and /v1/status say registered."""
        app = await upstreams("billing")
        path = "/status/200" if probe == "http" else None
        service = service_config(
            "billing", app.port, health_path=path, tags=["v1", "blue"], meta={"version": "1.4.2"}
        )
        sc = await fleet.ready(consul, service)

        registered = consul.services()["billing-1"]
        assert {
            "ID": "billing-1",
            "Service": "billing",
            "Address": "127.0.0.1",
            "Port": app.port,
            "Tags": ["v1", "blue"],
            "Meta": {"version": "1.4.2"},
        } == {k: registered[k] for k in ("ID", "Service", "Address", "Port", "Tags", "Meta")}
        check = consul.checks()["service:billing-1"]
        assert ("billing-1", "ttl", pytest.approx(0.55), 60.0) == (
            check["ServiceID"],
            check["Type"],
            check["TTL"],
            check["DeregisterAfter"],
        )
        await wait_until(
            "the check passes", lambda: consul.checks()["service:billing-1"]["Status"] == "passing"
        )
        note = consul.checks()["service:billing-1"]["Output"]
        target = (
            f"HTTP GET http://127.0.0.1:{app.port}/status/200: 200 in "
            if probe == "http"
            else f"TCP connect 127.0.0.1:{app.port}: connected in "
        )
        assert note.startswith(target), note
        assert 1.0 == (await metric_samples(sc))["sidecar_consul_registered"]
        registration = (await sc.status())["consul"]["registration"]
        assert ("agent", "registered", "billing-1", "service:billing-1", None) == (
            registration["mode"],
            registration["state"],
            registration["service_id"],
            registration["check_id"],
            registration["last_error"],
        )


class TestAppHealth:
    async def test_failing_app_leaves_other_sidecars_endpoints_and_comes_back(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """The app's health path answering 500 turns the TTL check critical with a note
        saying so; a second sidecar discovering the service drops the instance (its calls
        get 503 NO_HEALTHY_ENDPOINTS) and takes it back once the app is healthy again."""
        app = await upstreams("billing")
        await fleet.ready(consul, service_config("billing", app.port, health_path="/flaky"))
        caller_app = await upstreams("web")
        caller = await fleet.ready(consul, service_config("web", caller_app.port), {"billing": {}})
        await caller.wait_endpoints("billing", [app.endpoint])

        app.failing = True
        await wait_until(
            "the check goes critical",
            lambda: consul.checks()["service:billing-1"]["Status"] == "critical",
        )
        note = consul.checks()["service:billing-1"]["Output"]
        assert note.startswith(f"HTTP GET http://127.0.0.1:{app.port}/flaky: 500 in "), note
        await caller.wait_endpoints("billing", [])
        status, body = await get_json(f"{caller.url}/v1/invoke/billing/echo")
        assert (503, "NO_HEALTHY_ENDPOINTS") == (status, body["error"]["code"])

        app.failing = False
        await caller.wait_endpoints("billing", [app.endpoint])
        status, body = await get_json(f"{caller.url}/v1/invoke/billing/echo/back")
        assert (200, "billing") == (status, body["instance"])

    async def test_stopped_app_goes_critical_with_the_connect_error(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """With a TCP probe, an app that stopped listening turns the check critical with
        the connect error as its note, and the instance leaves discovery."""
        app = await upstreams("billing")
        await fleet.ready(consul, service_config("billing", app.port, health_path=None))
        caller_app = await upstreams("web")
        caller = await fleet.ready(consul, service_config("web", caller_app.port), {"billing": {}})
        await caller.wait_endpoints("billing", [app.endpoint])

        await app.stop()
        await wait_until(
            "the check goes critical",
            lambda: consul.checks()["service:billing-1"]["Status"] == "critical",
        )
        note = consul.checks()["service:billing-1"]["Output"]
        assert note.startswith(f"TCP connect 127.0.0.1:{app.port}: "), note
        assert "refused" in note.lower(), note
        await caller.wait_endpoints("billing", [])


class TestAgentRestart:
    async def test_agent_that_lost_its_state_gets_the_service_again(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """After the agent restarts without its state, the next check update gets 404
        and the sidecar registers again at once: `consul_registration_lost` is logged and
        the service and its check are back, passing."""
        app = await upstreams("billing")
        sc = await fleet.ready(consul, service_config("billing", app.port))

        consul.restart_agent()
        assert "billing-1" not in consul.services()
        lost = await sc.wait_event("consul_registration_lost")
        await wait_until(
            "registered again",
            lambda: consul.checks().get("service:billing-1", {}).get("Status") == "passing",
        )
        assert ("billing-1", "billing") == (
            lost["service_id"],
            consul.services()["billing-1"]["Service"],
        )
        # The sidecar logs the registration after Consul answered it: wait for the line.
        await wait_until("logged again", lambda: len(sc.events("consul_registered")) >= 2)
        assert 2 == len(sc.events("consul_registered"))


class TestDiscovery:
    async def test_new_instance_is_picked_up_within_a_second(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """An instance registered while a sidecar is watching its service shows up in
        that sidecar's endpoint set in under a second, and takes traffic."""
        ledger = await upstreams("ledger")
        caller_app = await upstreams("web")
        caller = await fleet.ready(consul, service_config("web", caller_app.port), {"ledger": {}})
        await caller.wait_endpoints("ledger", [])
        await watch_parked(consul, caller, "ledger")

        consul.register_instance("ledger", id="ledger-1", address="127.0.0.1", port=ledger.port)
        changed = time.monotonic()
        await caller.wait_endpoints("ledger", [ledger.endpoint], timeout=5.0)
        took = time.monotonic() - changed

        assert took < 1.0, f"took {took:.3f}s"
        status, body = await get_json(f"{caller.url}/v1/invoke/ledger/echo")
        assert (200, "ledger") == (status, body["instance"])

    async def test_index_going_backwards_resets_the_watch(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """When Consul's index goes backwards the sidecar logs it, starts over from 0, and
        still follows the changes that come after."""
        one, two = await upstreams("ledger-1"), await upstreams("ledger-2")
        caller_app = await upstreams("web")
        caller = await fleet.ready(consul, service_config("web", caller_app.port), {"ledger": {}})
        consul.register_instance("ledger", id="ledger-1", address="127.0.0.1", port=one.port)
        await caller.wait_endpoints("ledger", [one.endpoint])

        await watch_parked(consul, caller, "ledger")
        consul.set_index_backwards()
        consul.register_instance("ledger", id="ledger-2", address="127.0.0.1", port=two.port)
        went = await caller.wait_event("consul_index_went_backwards")
        await caller.wait_endpoints("ledger", [one.endpoint, two.endpoint])
        consul.deregister_instance("ledger-1")
        await caller.wait_endpoints("ledger", [two.endpoint])

        assert ("ledger", True) == (went["service"], went["now"] < went["was"])

    async def test_index_zero_is_clamped_to_one(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """An answer carrying X-Consul-Index 0 never makes the sidecar block on index 0:
        every later query sends index >= 1 (or none, starting over); changes still arrive."""
        one, two = await upstreams("ledger-1"), await upstreams("ledger-2")
        caller_app = await upstreams("web")
        caller = await fleet.ready(consul, service_config("web", caller_app.port), {"ledger": {}})
        consul.register_instance("ledger", id="ledger-1", address="127.0.0.1", port=one.port)
        await caller.wait_endpoints("ledger", [one.endpoint])

        await watch_parked(consul, caller, "ledger")
        consul.set_index_zero(True)
        seen = len(health_queries(consul, "ledger"))
        await wait_until(
            "three queries answered with index 0",
            lambda: len(health_queries(consul, "ledger")) >= seen + 3,
        )
        consul.set_index_zero(False)
        consul.register_instance("ledger", id="ledger-2", address="127.0.0.1", port=two.port)
        await caller.wait_endpoints("ledger", [one.endpoint, two.endpoint])

        indexes = [dict(r.query).get("index") for r in health_queries(consul, "ledger")[seen:]]
        assert [] == [i for i in indexes if i is not None and int(i) < 1], indexes
        assert any(i == "1" for i in indexes), indexes


class TestConsulOutage:
    async def test_last_known_endpoints_keep_serving_and_changes_follow_after(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """While Consul is down, calls keep reaching the last known instances and
        /v1/status shows the watch stale with its age; once Consul is back the watch
        follows the next change and is fresh again."""
        one, two = await upstreams("ledger-1"), await upstreams("ledger-2")
        caller_app = await upstreams("web")
        caller = await fleet.ready(consul, service_config("web", caller_app.port), {"ledger": {}})
        consul.register_instance("ledger", id="ledger-1", address="127.0.0.1", port=one.port)
        await caller.wait_endpoints("ledger", [one.endpoint])

        await consul.go_down()
        down = await caller.wait_status(lambda s: s["upstreams"]["ledger"]["watch"]["stale"])
        answers = []
        for _ in range(5):
            status, body = await get_json(f"{caller.url}/v1/invoke/ledger/echo")
            answers.append((status, body.get("instance")))
        later = await caller.wait_status(
            lambda s: s["upstreams"]["ledger"]["watch"]["stale_for_s"] > 0.2
        )

        await consul.come_up()
        consul.register_instance("ledger", id="ledger-2", address="127.0.0.1", port=two.port)
        await caller.wait_endpoints("ledger", [one.endpoint, two.endpoint])
        after = await caller.wait_status(lambda s: not s["upstreams"]["ledger"]["watch"]["stale"])

        assert [(200, "ledger-1")] * 5 == answers
        assert [one.endpoint] == endpoints_of(down, "ledger")
        watch = later["upstreams"]["ledger"]["watch"]
        assert (True, True, True) == (
            watch["stale"],
            watch["last_success_age_s"] >= watch["stale_for_s"] > 0.2,
            "127.0.0.1" in watch["last_error"],
        )
        assert (None, None) == (
            after["upstreams"]["ledger"]["watch"]["stale_for_s"],
            after["upstreams"]["ledger"]["watch"]["last_error"],
        )
        assert 1 == len(caller.events("consul_watch_recovered"))

    async def test_watch_is_fresh_again_soon_after_consul_is_back(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """Once Consul answers again the watch stops being `stale` within a few seconds
        (its backoff), even when the service did not change meanwhile."""
        one = await upstreams("ledger-1")
        caller_app = await upstreams("web")
        caller = await fleet.ready(consul, service_config("web", caller_app.port), {"ledger": {}})
        consul.register_instance("ledger", id="ledger-1", address="127.0.0.1", port=one.port)
        await caller.wait_endpoints("ledger", [one.endpoint])

        await consul.go_down()
        await caller.wait_status(lambda s: s["upstreams"]["ledger"]["watch"]["stale"])
        await consul.come_up()
        back = time.monotonic()
        after = await caller.wait_status(
            lambda s: not s["upstreams"]["ledger"]["watch"]["stale"], timeout=8.0
        )

        assert (False, [one.endpoint]) == (
            after["upstreams"]["ledger"]["watch"]["stale"],
            endpoints_of(after, "ledger"),
        )
        assert time.monotonic() - back < 5.0

    async def test_unreachable_at_start_serves_static_upstreams_and_registers_later(
        self, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """With Consul down at start the sidecar still starts and serves static
        upstreams, /ready explains that registration is pending and why; once Consul is
        up it registers (retrying with backoff) and turns ready."""
        port = free_port()
        app, static = await upstreams("billing"), await upstreams("static")
        sc = fleet.start(
            f"http://127.0.0.1:{port}",
            service_config("billing", app.port),
            {"static": {"endpoints": [static.endpoint]}},
        )
        failed = await sc.wait_event("consul_register_failed")
        status, body = await get_json(f"{sc.url}/v1/invoke/static/echo")
        ready_status, ready = await get_json(f"{sc.admin}/ready")

        async with running_consul(port) as double:
            await sc.wait_ready()
            registered = "billing-1" in double.services()

        assert (200, "static") == (status, body["instance"])
        assert 503 == ready_status
        (reason,) = ready["reasons"]
        assert reason.startswith("consul: 'billing' not registered yet: "), reason
        assert f"127.0.0.1:{port}" in reason, reason
        assert f"127.0.0.1:{port}" in failed["error"]
        assert registered
        assert "Traceback" not in sc.logs()


class TestShutdown:
    async def test_sigterm_deregisters_before_draining(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """On SIGTERM the service leaves Consul first; calls the app makes after that
        still succeed during the drain, and the log says consul_deregistered before
        draining."""
        app, ledger = await upstreams("billing"), await upstreams("ledger")
        sc = await fleet.ready(
            consul,
            service_config("billing", app.port),
            {"ledger": {"endpoints": [ledger.endpoint]}},
            shutdown={"drain": "1s", "grace": "5s"},
        )

        sc.signal(signal.SIGTERM)
        await wait_until("deregistered", lambda: "billing-1" not in consul.services(), 5.0)
        (deregister,) = [
            r for r in consul.requests if r.path == "/v1/agent/service/deregister/billing-1"
        ]
        asked_at = time.monotonic()  # after Consul saw the deregistration
        status, body = await get_json(f"{sc.url}/v1/invoke/ledger/echo")
        still_running = sc.proc is not None and sc.proc.poll() is None
        code = await sc.wait_exit()

        assert (200, "ledger", True) == (status, body["instance"], still_running)
        assert ("PUT", True) == (deregister.method, deregister.at < asked_at)
        events = [e["event"] for e in sc.log_events()]
        assert events.index("consul_deregistered") < events.index("draining")
        # The double stamps requests with this process's monotonic clock, the log with UTC.
        wall_offset = time.time() - time.monotonic()
        draining = sc.events("draining")[0]
        drain_began = datetime.fromisoformat(draining["timestamp"]).timestamp()
        assert deregister.at + wall_offset < drain_began + 0.005
        assert 0 == code


class TestTwoServices:
    async def test_two_services_call_each_other_through_consul(
        self, consul: ConsulDouble, fleet: Fleet
    ) -> None:
        """Alpha's app calls beta through alpha's sidecar, and beta's app calls alpha
        through beta's, each finding the other in Consul: one request goes
        alpha → beta → alpha."""
        alpha, beta = RelayApp("alpha"), RelayApp("beta")
        await alpha.start()
        await beta.start()
        try:
            alpha_sc = fleet.start(
                consul, service_config("alpha", alpha.port, health_path="/healthz"), {"beta": {}}
            )
            beta_sc = fleet.start(
                consul, service_config("beta", beta.port, health_path="/healthz"), {"alpha": {}}
            )
            alpha.sidecar_url, beta.sidecar_url = alpha_sc.url, beta_sc.url
            await alpha_sc.wait_ready()
            await beta_sc.wait_ready()
            await alpha_sc.wait_endpoints("beta", [f"127.0.0.1:{beta.port}"])
            await beta_sc.wait_endpoints("alpha", [f"127.0.0.1:{alpha.port}"])

            status, body = await get_json(
                f"http://127.0.0.1:{alpha.port}/relay/beta/relay/alpha/echo/round-trip"
            )
        finally:
            await alpha.stop()
            await beta.stop()

        assert (200, "alpha", 200, "beta", 200) == (
            status,
            body["via"],
            body["status"],
            body["answer"]["via"],
            body["answer"]["status"],
        )
        assert {"instance": "alpha", "path": "/echo/round-trip"} == body["answer"]["answer"]


class TestCatalogMode:
    async def test_catalog_registration_discovery_stale_heartbeat_and_deregistration(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """Catalog mode: each sidecar registers its node and service on
        /v1/catalog/register with a heartbeat check; another sidecar discovers them; an
        instance whose sidecar was SIGKILLed is skipped once its heartbeat is three
        intervals old; SIGTERM removes the node with /v1/catalog/deregister."""
        one, two = await upstreams("ledger-1"), await upstreams("ledger-2")
        first = await fleet.ready(
            consul,
            service_config("ledger", one.port, service_id="ledger-1"),
            mode="catalog",
            node="node-one",
        )
        second = await fleet.ready(
            consul,
            service_config("ledger", two.port, service_id="ledger-2"),
            mode="catalog",
            node="node-two",
        )
        old = await upstreams("ledger-old")
        consul.register_instance(
            "ledger",
            id="ledger-old",
            address="127.0.0.1",
            port=old.port,
            node="node-old",
            check_id="sidecar:ledger-old",
            output=f"{HEARTBEAT} {_utc(time.time() - 10)} every 0.2s",  # stale, not yet reaped
        )
        caller_app = await upstreams("web")
        caller = await fleet.ready(consul, service_config("web", caller_app.port), {"ledger": {}})
        await caller.wait_endpoints("ledger", [one.endpoint, two.endpoint])
        skipped_at_first = (await caller.status())["upstreams"]["ledger"]["watch"][
            "skipped_stale_heartbeats"
        ]

        registers = [r for r in consul.requests if r.path == "/v1/catalog/register"]
        instances = {i["Service"]["ID"]: i for i in consul.catalog_instances("ledger")}
        check = next(
            c for c in instances["ledger-1"]["Checks"] if c["CheckID"] == "sidecar:ledger-1"
        )
        assert ("node-one", "passing") == (instances["ledger-1"]["Node"]["Node"], check["Status"])
        assert f"{HEARTBEAT} " in check["Output"], check["Output"]
        assert check["Output"].endswith(" every 0.2s"), check["Output"]
        assert {"PUT"} == {r.method for r in registers}

        second.kill()  # SIGKILL: its catalog entry stays, passing, and its heartbeat ages
        await caller.wait_endpoints("ledger", [one.endpoint], timeout=5.0)
        assert "ledger-2" in {i["Service"]["ID"] for i in consul.catalog_instances("ledger")}
        status = await caller.status()
        assert (1, 2) == (
            skipped_at_first,
            status["upstreams"]["ledger"]["watch"]["skipped_stale_heartbeats"],
        )

        first.signal(signal.SIGTERM)
        assert 0 == await first.wait_exit()
        (deregister,) = [r for r in consul.requests if r.path == "/v1/catalog/deregister"]
        assert ("PUT", "node-one") == (deregister.method, body_field(deregister, "Node"))
        assert "node-one" not in consul.nodes()
        assert "ledger-1" not in {i["Service"]["ID"] for i in consul.catalog_instances("ledger")}
        await caller.wait_endpoints("ledger", [])


class TestAclToken:
    async def test_bad_token_is_reported_clearly_without_leaking_it(
        self, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """A token Consul does not know: `consul_register_failed` names Consul's 403 and
        hints at the token, /ready is 503 naming it; no traceback, and the token's value
        appears neither in the log nor in /v1/status."""
        app = await upstreams("billing")
        secret = "wrong-0f3c9a7e-token"
        async with running_consul(
            acl_tokens={"good-token": Policy(service_write=frozenset({"billing"}))},
            default_policy="deny",
        ) as double:
            sc = fleet.start(
                double, service_config("billing", app.port), env={"CONSUL_HTTP_TOKEN": secret}
            )
            failed = await sc.wait_event("consul_register_failed")
            ready_status, ready = await get_json(f"{sc.admin}/ready")
            status_text = str(await sc.status())
            seen_tokens = {r.headers.get("X-Consul-Token") for r in double.requests}

        assert "register: Consul answered 403: ACL not found" == failed["error"]
        assert "token" in failed["hint"].lower(), failed
        assert 503 == ready_status
        assert any("403" in r and "billing" in r for r in ready["reasons"]), ready
        assert "Traceback" not in sc.logs()
        assert secret not in sc.logs()
        assert secret not in status_text
        assert {secret} == seen_tokens

    async def test_good_token_registers_and_is_sent_as_a_header(
        self, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """A token with the right policy: the service is registered and every request
        the double saw carried it in `X-Consul-Token`."""
        app = await upstreams("billing")
        async with running_consul(
            acl_tokens={"good-token": Policy(service_write=frozenset({"billing"}))},
            default_policy="deny",
        ) as double:
            sc = await fleet.ready(
                double,
                service_config("billing", app.port),
                env={"CONSUL_HTTP_TOKEN": "good-token"},
            )
            registered = "billing-1" in double.services()
            seen_tokens = {r.headers.get("X-Consul-Token") for r in double.requests}

        assert registered
        assert {"good-token"} == seen_tokens
        assert "good-token" not in sc.logs()


class TestAllowAnyService:
    async def test_any_consul_service_is_routable_by_path_and_host(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """With `discovery.allow_any_service`, a Consul service that is no configured
        upstream is reachable by /v1/invoke/<name>/ and by Host, and gets a watch."""
        ledger = await upstreams("ledger")
        consul.register_instance("ledger", id="ledger-1", address="127.0.0.1", port=ledger.port)
        caller_app = await upstreams("web")
        caller = await fleet.ready(
            consul, service_config("web", caller_app.port), discovery={"allow_any_service": True}
        )

        by_path = await get_json(f"{caller.url}/v1/invoke/ledger/echo/a")
        by_host = await get_json(f"{caller.url}/echo/b", headers={"Host": "ledger"})

        assert (200, "ledger", "/echo/a") == (
            by_path[0],
            by_path[1].get("instance"),
            by_path[1].get("path_qs"),
        ), by_path
        assert (200, "ledger", "/echo/b") == (
            by_host[0],
            by_host[1].get("instance"),
            by_host[1].get("path_qs"),
        ), by_host
        assert ["ledger"] == (await caller.status())["consul"]["dynamic_services"]
        assert [] == [e for e in caller.log_events() if e.get("level") == "error"]

    async def test_unknown_name_gets_no_route_and_nothing_is_dialled(
        self, consul: ConsulDouble, fleet: Fleet, upstreams: UpstreamFactory
    ) -> None:
        """With `discovery.allow_any_service`, a name Consul does not know (a word, or a
        host:port that does listen) gets 404 NO_ROUTE: no watch, no connection."""
        caller_app = await upstreams("web")
        caller = await fleet.ready(
            consul, service_config("web", caller_app.port), discovery={"allow_any_service": True}
        )

        async with counting_listener() as (port, connections):
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{caller.url}/v1/invoke/nosuch/x") as resp:
                    unknown = (resp.status, resp.headers.get("x-sidecar-error"))
                async with session.get(
                    f"{caller.url}/x", headers={"Host": f"127.0.0.1:{port}"}
                ) as resp:
                    by_address = (resp.status, resp.headers.get("x-sidecar-error"))
            dialled = connections[0]

        assert (404, "NO_ROUTE") == unknown
        assert (404, "NO_ROUTE") == by_address
        assert 0 == dialled
        assert [] == health_queries(consul, "nosuch")
        assert [] == (await caller.status())["consul"]["dynamic_services"]
