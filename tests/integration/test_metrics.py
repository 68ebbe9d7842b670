"""`GET /metrics` of a running sidecar (SPEC §9) as Prometheus's own tools see it:
`promtool check metrics` finds nothing to lint, every family is documented in
docs/metrics.md, and a real Prometheus scraping the admin port answers PromQL about
the requests the test made.

The scrape with events comes from a sidecar with a static upstream, a relay and a
subscription on the real RabbitMQ; its exchange and queues are the test's own and
deleted afterwards.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from sidecar import __version__
from tests.integration.amqp_harness import (
    AmqpScope,
    broker_lock,
    events_config,
    publish,
    unique_name,
    wait_events,
)
from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    Sidecar,
    Upstream,
    metric_samples,
    poll_json,
    running_sidecar,
)
from tests.integration.prom_harness import Prometheus, promtool_check_metrics, scalar
from tests.metrics_doc import documented_families, scraped_families

#: The families SPEC §9 requires (sidecar_alerts_firing arrives with the alerts).
SPEC_FAMILIES = (
    "sidecar_upstream_requests_total",
    "sidecar_upstream_request_duration_seconds",
    "sidecar_upstream_endpoints",
    "sidecar_circuit_state",
    "sidecar_retries_total",
    "sidecar_events_published_total",
    "sidecar_events_spool_depth",
    "sidecar_events_delivered_total",
    "sidecar_consul_registered",
    "sidecar_build_info",
)


async def scrape(sidecar: Sidecar) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{sidecar.admin}/metrics") as resp:
        assert 200 == resp.status
        return await resp.text()


async def call(session: aiohttp.ClientSession, sidecar: Sidecar, path: str) -> int:
    async with session.get(f"{sidecar.url}/v1/invoke/billing/{path}") as resp:
        await resp.read()
        return resp.status


@contextlib.asynccontextmanager
async def sidecar_with_events(
    tmp_path: Path, app: Upstream, scope: AmqpScope
) -> AsyncIterator[Sidecar]:
    """A ready sidecar with upstream `billing` (the `app` server), a relay connected to the
    scope's exchange and subscription `orders` (topic `orders.*`) POSTing to the app's
    `/echo/orders`, consuming. Its queue and DLQ are deleted with the scope."""
    service = unique_name("itest-metrics")
    scope.queues += [f"{service}.orders", f"{service}.orders.dlq"]
    events = events_config(
        scope.exchange,
        tmp_path / "spool.db",
        subscriptions=[{"name": "orders", "topic": "orders.*", "path": "/echo/orders"}],
    )
    async with (
        running_sidecar(
            tmp_path,
            {"billing": {"endpoints": [app.endpoint]}},
            service={"name": service, "port": app.port},
            events=events,
        ) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        await wait_events(
            session,
            sidecar,
            lambda s: (
                s["broker"]["state"] == "connected" and s["subscriptions"]["orders"]["consuming"]
            ),
            what="the relay connected and the subscription consuming",
        )
        yield sidecar


def help_lines(exposition: str) -> dict[str, str]:
    return dict(re.findall(r"^# HELP (\S+) (.+)$", exposition, re.MULTILINE))


class TestExposition:
    async def test_a_full_scrape_passes_promtool_and_has_every_spec_family(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """After requests (one retried), a confirmed publish and its delivery, the scrape
        passes `promtool check metrics` with no complaint, and every SPEC §9 family is
        there with its HELP text."""
        app = await upstreams("billing")
        async with (
            broker_lock(exclusive=False),
            AmqpScope() as scope,
            sidecar_with_events(tmp_path, app, scope) as sidecar,
            aiohttp.ClientSession() as session,
        ):
            codes = [await call(session, sidecar, p) for p in ("echo/a", "echo/b", "status/503")]
            published = await publish(session, sidecar, "orders.created", b'{"n": 1}')
            await poll_json(
                session,
                f"{sidecar.admin}/v1/status",
                lambda _, s: s["events"]["subscriptions"]["orders"]["delivered"] == 1,
            )
            exposition = await scrape(sidecar)
        assert [200, 200, 503] == codes
        assert (202, "confirmed") == (published[0], published[1]["status"])
        assert (0, "") == await promtool_check_metrics(exposition)
        helps = help_lines(exposition)
        assert [] == [name for name in SPEC_FAMILIES if not helps.get(name)]

    async def test_the_scrape_has_the_series_the_traffic_made(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Each SPEC §9 family has the series the test's traffic makes: requests by code,
        retries, latency count, endpoints, circuit, spool depth, publish and delivery
        outcomes, registration and version."""
        app = await upstreams("billing")
        async with (
            broker_lock(exclusive=False),
            AmqpScope() as scope,
            sidecar_with_events(tmp_path, app, scope) as sidecar,
            aiohttp.ClientSession() as session,
        ):
            for path in ("echo/a", "echo/b", "status/503"):
                await call(session, sidecar, path)
            await publish(session, sidecar, "orders.created", b'{"n": 1}')
            await poll_json(
                session,
                f"{sidecar.admin}/v1/status",
                lambda _, s: s["events"]["subscriptions"]["orders"]["delivered"] == 1,
            )
            samples = await metric_samples(sidecar)
        billing = 'upstream="billing"'
        expected = {
            f'sidecar_upstream_requests_total{{code="200",{billing}}}': 2.0,
            f'sidecar_upstream_requests_total{{code="503",{billing}}}': 1.0,
            f"sidecar_retries_total{{{billing}}}": 2.0,  # retries.max 2 by default
            f"sidecar_upstream_request_duration_seconds_count{{{billing}}}": 3.0,
            f'sidecar_upstream_endpoints{{state="healthy",{billing}}}': 1.0,
            f'sidecar_upstream_endpoints{{state="ejected",{billing}}}': 0.0,
            f"sidecar_circuit_state{{{billing}}}": 0.0,
            'sidecar_events_published_total{outcome="confirmed",topic="orders.created"}': 1.0,
            "sidecar_events_spool_depth": 0.0,
            'sidecar_events_delivered_total{outcome="ack",subscription="orders"}': 1.0,
            "sidecar_consul_registered": 0.0,
            f'sidecar_build_info{{version="{__version__}"}}': 1.0,
        }
        assert expected == {series: samples.get(series) for series in expected}

    async def test_every_scraped_family_is_documented_as_it_is_exported(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """docs/metrics.md has a row for every family of a real scrape (scrape-time gauges
        included), with its type and, where the scrape has series, its label names."""
        app = await upstreams("billing")
        async with (
            broker_lock(exclusive=False),
            AmqpScope() as scope,
            sidecar_with_events(tmp_path, app, scope) as sidecar,
            aiohttp.ClientSession() as session,
        ):
            await call(session, sidecar, "echo/a")
            exposition = await scrape(sidecar)
        documented = documented_families()
        scraped = scraped_families(exposition)
        assert [] == sorted(set(scraped) - set(documented)), "scraped but not documented"
        wrong = {
            name: (documented[name], family)
            for name, family in scraped.items()
            if documented[name].type != family.type
            or (family.labels is not None and documented[name].labels != family.labels)
        }
        assert {} == wrong


class TestPrometheus:
    async def test_prometheus_scrapes_the_sidecar_and_answers_promql(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A real Prometheus scraping the admin port every second sees the target up and
        counts exactly the requests the test made, in the counter and the histogram."""
        app = await upstreams("billing")
        async with (
            running_sidecar(tmp_path, {"billing": {"endpoints": [app.endpoint]}}) as sidecar,
            aiohttp.ClientSession() as session,
        ):
            codes = [await call(session, sidecar, f"echo/{i}") for i in range(5)]
            target = f"127.0.0.1:{sidecar.admin_port}"
            async with Prometheus(tmp_path, {"sidecar": [target]}) as prom:
                up = await prom.wait_for('up{job="sidecar"}', lambda r: scalar(r) == 1.0)
                requests = await prom.wait_for(
                    'sum(sidecar_upstream_requests_total{upstream="billing"})',
                    lambda r: scalar(r) == 5.0,
                )
                observed = await prom.query(
                    'sum(sidecar_upstream_request_duration_seconds_count{upstream="billing"})'
                )
                version = await prom.query("sidecar_build_info")
        assert [200] * 5 == codes
        assert (1.0, 5.0, 5.0) == (scalar(up), scalar(requests), scalar(observed))
        labels = {"__name__": "sidecar_build_info", "instance": target, "job": "sidecar"}
        assert [{**labels, "version": __version__}] == [series["metric"] for series in version]
