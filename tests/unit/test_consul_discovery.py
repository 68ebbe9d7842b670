"""Registration and discovery against the Consul double, in-process: Consul's blocking-
query rules (index reset and clamp, rate limit, changed sets only), outages, catalog
heartbeats, re-registration after an agent restart, sibling reaping, on-demand watches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import MappingProxyType
from typing import Any

import pytest

from sidecar.config import Config, ConsulConfig, HealthConfig, ServiceConfig
from sidecar.discovery.base import Endpoint
from sidecar.discovery.consul import ConsulResolver, DynamicServices
from sidecar.discovery.consul_client import ConsulClient
from sidecar.discovery.heartbeat import heartbeat_line
from sidecar.discovery.registration import Registrar
from tests.doubles.consul import ConsulDouble


@pytest.fixture
async def double() -> AsyncIterator[ConsulDouble]:
    consul = await ConsulDouble().start()
    try:
        yield consul
    finally:
        await consul.stop()


@pytest.fixture
async def client(double: ConsulDouble) -> AsyncIterator[ConsulClient]:
    consul = ConsulClient(ConsulConfig(address=double.address))
    try:
        yield consul
    finally:
        await consul.close()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `check()` holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Pushes:
    """Records every endpoint list a resolver pushes."""

    def __init__(self) -> None:
        self.lists: list[list[str]] = []

    def __call__(self, endpoints: Sequence[Endpoint]) -> None:
        self.lists.append(sorted(map(str, endpoints)))

    @property
    def last(self) -> list[str]:
        return self.lists[-1] if self.lists else []


_started: list[ConsulResolver] = []


@pytest.fixture(autouse=True)
async def stop_resolvers() -> AsyncIterator[None]:
    """Every watch a test starts is stopped, whether the test passed or not."""
    yield
    while _started:
        await _started.pop().stop()


async def watching(
    client: ConsulClient, service: str = "billing", **kwargs: Any
) -> tuple[ConsulResolver, Pushes]:
    resolver = ConsulResolver(client, service, **kwargs)
    _started.append(resolver)
    pushes = Pushes()
    resolver.subscribe(pushes)
    await resolver.start()
    await until(lambda: resolver.ready)
    return resolver, pushes


def health_queries(double: ConsulDouble, service: str = "billing") -> list[dict[str, str]]:
    return [dict(r.query) for r in double.requests if r.path == f"/v1/health/service/{service}"]


class TestBlockingQueries:
    async def test_first_answer_then_only_changes_are_pushed(
        self, double: ConsulDouble, client: ConsulClient
    ) -> None:
        """A spurious wake-up (higher index, same instances) pushes nothing."""
        double.register_instance("billing", id="b1", address="10.0.0.1", port=80)
        resolver, pushes = await watching(client)
        assert [["10.0.0.1:80"]] == pushes.lists
        asked = len(health_queries(double))
        double.spurious_wakeup("billing")
        await until(lambda: len(health_queries(double)) >= asked + 2)
        double.register_instance("billing", id="b2", address="10.0.0.2", port=80)
        await until(lambda: len(pushes.lists) == 2)
        assert [["10.0.0.1:80"], ["10.0.0.1:80", "10.0.0.2:80"]] == pushes.lists
        await resolver.stop()

    async def test_queries_carry_the_index_passing_and_wait(
        self, double: ConsulDouble, client: ConsulClient
    ) -> None:
        """The first query has no index; the next one blocks on the index Consul gave."""
        resolver, _ = await watching(client)
        await until(lambda: len(health_queries(double)) >= 2)
        first, second = health_queries(double)[:2]
        assert "index" not in first
        assert ("1", str(resolver.index)) == (second["passing"], second["index"])
        assert second["wait"].endswith("ms")
        await resolver.stop()

    async def test_a_backwards_index_resets_to_zero_and_still_follows(
        self, double: ConsulDouble, client: ConsulClient
    ) -> None:
        """Index lower than before: the next query starts over without an index."""
        double.register_instance("billing", id="b1", address="10.0.0.1", port=80)
        resolver, pushes = await watching(client)
        await until(lambda: len(health_queries(double)) >= 2)
        double.set_index_backwards(to=3)
        await until(lambda: any("index" not in q for q in health_queries(double)[1:]))
        double.register_instance("billing", id="b2", address="10.0.0.2", port=80)
        await until(lambda: ["10.0.0.1:80", "10.0.0.2:80"] == pushes.last)
        await resolver.stop()

    async def test_an_index_of_zero_is_never_sent_back_as_zero(
        self, double: ConsulDouble, client: ConsulClient
    ) -> None:
        """A server answering X-Consul-Index 0: the watch blocks on 1, not a busy loop."""
        double.set_index_zero()
        resolver, _ = await watching(client, min_interval=0.01)
        await until(lambda: len(health_queries(double)) >= 2)
        await asyncio.sleep(0.3)  # a busy loop would make dozens of queries by now
        assert [None, "1"] == [q.get("index") for q in health_queries(double)]
        await resolver.stop()

    async def test_a_flapping_service_cannot_cause_a_query_storm(
        self, double: ConsulDouble, client: ConsulClient
    ) -> None:
        """Changes every few ms: queries stay at most one per min_interval."""
        double.register_instance("billing", id="b1", address="10.0.0.1", port=80)
        resolver, _ = await watching(client, min_interval=0.1)
        began, before = time.monotonic(), len(health_queries(double))
        for i in range(100):
            double.set_instance_status("b1", "critical" if i % 2 else "passing")
            await asyncio.sleep(0.005)
        took = time.monotonic() - began
        made = len(health_queries(double)) - before
        assert made <= took / 0.1 + 2
        await resolver.stop()


class TestOutage:
    async def test_last_endpoints_kept_and_marked_stale_then_recovered(
        self, double: ConsulDouble, client: ConsulClient
    ) -> None:
        """Consul down: endpoints stay, status says stale with an age; back: not stale."""
        double.register_instance("billing", id="b1", address="10.0.0.1", port=80)
        resolver, pushes = await watching(client, backoff_cap=0.2)
        await double.go_down()
        await until(lambda: resolver.stale)
        assert ["10.0.0.1:80"] == sorted(map(str, resolver.endpoints()))
        status = resolver.status()
        assert status["stale"] is True
        assert status["stale_for_s"] >= 0
        assert "cannot connect" in status["last_error"]
        await double.come_up()
        await until(lambda: not resolver.stale, timeout=10)
        double.register_instance("billing", id="b2", address="10.0.0.2", port=80)
        await until(lambda: ["10.0.0.1:80", "10.0.0.2:80"] == pushes.last)
        await resolver.stop()


class TestCatalogHeartbeats:
    async def test_stale_heartbeats_are_skipped_and_go_stale_without_a_change(
        self, double: ConsulDouble, client: ConsulClient
    ) -> None:
        """An old heartbeat is skipped; a fresh one is kept until 3 intervals pass."""
        old = heartbeat_line(time.time() - 100, 10)
        fresh = heartbeat_line(time.time(), 0.2)
        double.register_instance(
            "billing",
            id="dead",
            address="10.0.0.1",
            port=80,
            check_id="sidecar:dead",
            output=f"ok\n{old}",
        )
        double.register_instance(
            "billing",
            id="live",
            address="10.0.0.2",
            port=80,
            check_id="sidecar:live",
            output=f"ok\n{fresh}",
        )
        resolver, pushes = await watching(client)
        assert ["10.0.0.2:80"] == pushes.lists[0]
        await until(lambda: [] == pushes.last, timeout=3)
        assert 2 == resolver.status()["skipped_stale_heartbeats"]
        await resolver.stop()


def _config(double: ConsulDouble, mode: str, port: int, **health: Any) -> Config:
    return Config(
        service=ServiceConfig(
            name="permits",
            id="permits-1",
            address="127.0.0.1",
            port=port,
            tags=("v1",),
            meta=MappingProxyType({"version": "1.4"}),
            health=HealthConfig(**{"interval": 0.1, "timeout": 0.5, **health}),
        ),
        consul=ConsulConfig(address=double.address, mode=mode, node="pod-a"),
    )


@pytest.fixture
async def app_port() -> AsyncIterator[int]:
    """A TCP listener standing in for the app (probed by TCP connect)."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def registrar(config: Config, client: ConsulClient) -> tuple[Registrar, list[str]]:
    reasons: list[str] = []
    return Registrar(config, client, on_registered=lambda: None, explain=reasons.append), reasons


class TestAgentRegistration:
    async def test_registers_with_a_ttl_check_and_reports_the_probe(
        self, double: ConsulDouble, client: ConsulClient, app_port: int
    ) -> None:
        """Service with tags and meta; TTL = 2*interval+timeout; passing with the note."""
        reg, _ = registrar(_config(double, "agent", app_port), client)
        reg.start()
        await until(lambda: "permits-1" in double.services())
        service = double.services()["permits-1"]
        assert (["v1"], {"version": "1.4"}, app_port) == (
            service["Tags"],
            service["Meta"],
            service["Port"],
        )
        check = double.checks()["service:permits-1"]
        assert 0.7 == pytest.approx(check["TTL"])
        assert 60.0 == check["DeregisterAfter"]
        assert "passing" == check["Status"]
        assert check["Output"].startswith(f"TCP connect 127.0.0.1:{app_port}: connected in")
        await reg.deregister()
        assert {} == double.services()

    async def test_an_agent_that_forgot_the_service_gets_it_again(
        self, double: ConsulDouble, client: ConsulClient, app_port: int
    ) -> None:
        """A 404 on the check update means re-register at once."""
        reg, _ = registrar(_config(double, "agent", app_port), client)
        reg.start()
        await until(lambda: "permits-1" in double.services())
        double.restart_agent()
        await until(lambda: "permits-1" in double.services())
        await until(lambda: "passing" == double.checks()["service:permits-1"]["Status"])
        await reg.deregister()

    async def test_unreachable_consul_is_explained_and_retried(
        self, double: ConsulDouble, client: ConsulClient, app_port: int
    ) -> None:
        """While Consul is down the reason names the error; once up, it registers."""
        await double.go_down()
        reg, reasons = registrar(_config(double, "agent", app_port), client)
        reg.start()
        await until(lambda: bool(reasons))
        assert reasons[-1].startswith("consul: 'permits' not registered yet: register: cannot")
        await double.come_up()
        await until(lambda: "permits-1" in double.services(), timeout=10)
        await reg.deregister()


class TestCatalogRegistration:
    async def test_node_service_and_heartbeat_then_deregister(
        self, double: ConsulDouble, client: ConsulClient, app_port: int
    ) -> None:
        """A node per sidecar with the service and a check carrying a heartbeat."""
        reg, _ = registrar(_config(double, "catalog", app_port), client)
        reg.start()
        await until(lambda: "pod-a" in double.nodes())
        (entry,) = double.catalog_instances("permits")
        (check,) = [c for c in entry["Checks"] if c["CheckID"] == "sidecar:permits-1"]
        assert "passing" == check["Status"]
        assert "hms-sidecar heartbeat " in check["Output"]
        assert {"external-source": "hms-sidecar"} == double.nodes()["pod-a"]["Meta"]
        first = check["Output"]
        await until(
            lambda: (
                first
                != next(
                    c["Output"]
                    for c in double.catalog_instances("permits")[0]["Checks"]
                    if c["CheckID"] == "sidecar:permits-1"
                )
            )
        )
        await reg.deregister()
        assert "pod-a" not in double.nodes()

    async def test_siblings_with_dead_heartbeats_are_reaped(
        self, double: ConsulDouble, client: ConsulClient, app_port: int
    ) -> None:
        """Another sidecar's instance silent for deregister_critical_after is removed."""
        old = heartbeat_line(time.time() - 5, 0.1)
        double.register_instance(
            "permits",
            id="permits-dead",
            address="10.0.0.9",
            port=80,
            node="pod-dead",
            check_id="sidecar:permits-dead",
            output=f"ok\n{old}",
        )
        double.register_instance("permits", id="permits-other", address="10.0.0.8", port=80)
        config = _config(double, "catalog", app_port, deregister_critical_after=1.0)
        reg, _ = registrar(config, client)
        reg.start()
        await until(lambda: 1 == reg.reaped)
        ids = sorted(e["Service"]["ID"] for e in double.catalog_instances("permits"))
        assert ["permits-1", "permits-other"] == ids
        await reg.deregister()


class TestDynamicServices:
    async def test_known_unknown_and_the_bound(
        self, double: ConsulDouble, client: ConsulClient
    ) -> None:
        """A service Consul knows gets a watch; an unknown name None; the bound holds."""
        double.register_instance("billing", id="b1", address="10.0.0.1", port=80)
        double.register_instance("ledger", id="l1", address="10.0.0.2", port=80)
        made: dict[str, ConsulResolver] = {}

        class Made:
            served = 0
            inflight = 0

        def make(name: str, resolver: ConsulResolver) -> Made:
            made[name] = resolver
            return Made()

        dynamic = DynamicServices(client, make, lambda *_: None, max_services=1, idle_after=60)
        assert None is await dynamic.lookup("nosuch")
        assert isinstance(await dynamic.lookup("billing"), Made)
        assert made["billing"].ready
        assert None is await dynamic.lookup("ledger")  # the bound: one watch
        await dynamic.stop()

    async def test_an_idle_watch_stops_and_its_upstream_is_retired(
        self, double: ConsulDouble, client: ConsulClient
    ) -> None:
        """No request for idle_after: the watch ends and the upstream leaves routing."""
        double.register_instance("billing", id="b1", address="10.0.0.1", port=80)
        retired: list[str] = []

        class Made:
            served = 0
            inflight = 0

        dynamic = DynamicServices(
            client,
            lambda name, resolver: Made(),
            lambda name, upstream: retired.append(name),
            max_services=4,
            idle_after=0.2,
        )
        await dynamic.lookup("billing")
        await until(lambda: ["billing"] == retired)
        assert {} == dynamic.watches
        await dynamic.stop()
