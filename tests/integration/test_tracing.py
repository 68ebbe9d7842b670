"""Traces as a collector receives them: real sidecar processes export over OTLP to the
collector double (which decodes the real protobuf), through HTTP calls, two sidecars,
retries, sidecar-made errors, and RabbitMQ (a publish, a delivery, a spooled event).

Every event test holds the broker lock shared, declares an exchange of its own and
deletes what it declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.doubles.otlp import OtlpCollector, Span
from tests.integration.amqp_harness import (
    AmqpScope,
    events_status,
    publish,
    tcp_proxy,
    wait_events,
)
from tests.integration.events_harness import EventApp
from tests.integration.harness import (
    Sidecar,
    Upstream,
    eventually,
    eventually_equal,
    free_port,
    metric_samples,
    running_sidecar,
    serve,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{CALLER}-01"


def parse(header: str) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00"
    return trace_id, span_id, flags


def tracing(collector: OtlpCollector, **more: Any) -> dict[str, Any]:
    """`telemetry` for a sidecar exporting to the collector, fast batches."""
    return {
        "log_format": "json",
        "log_level": "info",
        "tracing": {
            "otlp_endpoint": collector.http_endpoint,
            "schedule_delay": "50ms",
            **more,
        },
    }


def sidecar(tmp: Path, name: str, **config: Any) -> AbstractAsyncContextManager[Sidecar]:
    """A running sidecar for the service `name`, its config and log in `tmp/name`."""
    run_dir = tmp / name
    run_dir.mkdir()
    service = {"name": name, "port": 8080} | config.pop("service", {})
    return running_sidecar(run_dir, config.pop("upstreams", {}), service=service, **config)


@pytest.fixture
async def collector() -> AsyncIterator[OtlpCollector]:
    async with OtlpCollector() as double:
        yield double


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await Upstream("stock").start()
    yield server
    await server.stop()


def one(spans: list[Span], **match: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"{match}: {[str(s) for s in spans]}"
    return found[0]


class TestHttpTraces:
    async def test_a_call_through_two_sidecars_is_one_trace(
        self, tmp_path: Path, collector: OtlpCollector, upstream: Upstream
    ) -> None:
        """App A → sidecar A → service B, whose app calls on through sidecar B → C: one
        trace, each span the child of the one before, the caller's trace continued."""
        b_sidecar_port: list[int] = []

        async def service_b(request: web.Request) -> web.Response:
            # An app that carries the context on, as any instrumented app does.
            headers = {k: request.headers[k] for k in ("traceparent", "tracestate")}
            url = f"http://127.0.0.1:{b_sidecar_port[0]}/v1/invoke/stock/echo/b"
            async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
                return web.json_response(await r.json(), status=r.status)

        app = web.Application()
        app.router.add_get("/work", service_b)
        runner, b_port = await serve(app)
        try:
            async with (
                sidecar(
                    tmp_path,
                    "svc-b",
                    upstreams={"stock": {"endpoints": [upstream.endpoint]}},
                    telemetry=tracing(collector),
                ) as b,
                sidecar(
                    tmp_path,
                    "svc-a",
                    upstreams={"orders": {"endpoints": [f"127.0.0.1:{b_port}"]}},
                    telemetry=tracing(collector),
                ) as a,
            ):
                b_sidecar_port.append(b.app_port)
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(
                        f"{a.url}/v1/invoke/orders/work?x=1",
                        headers={"traceparent": SAMPLED, "tracestate": "vendor=7"},
                    ) as resp,
                ):
                    assert resp.status == 200
                    echoed = dict((await resp.json())["headers"])
                spans = await collector.wait_for(lambda s: s.trace_id == TRACE, count=4)
        finally:
            await runner.cleanup()
        by_service: dict[str, list[Span]] = {}
        for span in spans:
            by_service.setdefault(span.resource["service.name"], []).append(span)
        server_a = one(by_service["svc-a"], kind="SERVER")
        client_a = one(by_service["svc-a"], kind="CLIENT")
        server_b = one(by_service["svc-b"], kind="SERVER")
        client_b = one(by_service["svc-b"], kind="CLIENT")
        assert server_a.parent_span_id == CALLER
        assert server_a.name == "GET /v1/invoke/orders/*"
        assert server_a.attributes["http.route"] == "/v1/invoke/orders/*"
        assert server_a.attributes["url.path"] == "/v1/invoke/orders/work"
        assert server_a.attributes["http.response.status_code"] == 200
        assert server_a.trace_state == "vendor=7"
        assert client_a.parent_span_id == server_a.span_id
        assert server_b.parent_span_id == client_a.span_id
        assert client_b.parent_span_id == server_b.span_id
        assert client_a.attributes["server.address"] == "127.0.0.1"
        assert client_a.attributes["server.port"] == b_port
        assert client_a.attributes["url.path"] == "/work"
        assert client_a.attributes["http.request.method"] == "GET"
        assert client_a.attributes["http.response.status_code"] == 200
        assert client_a.kind == "CLIENT"
        # What the last upstream received: the context of sidecar B's attempt, and the
        # caller's tracestate carried along.
        assert parse(echoed["traceparent"]) == (TRACE, client_b.span_id, "01")
        assert echoed["tracestate"] == "vendor=7"
        assert server_a.resource["service.instance.id"].startswith("svc-a")

    async def test_retries_are_sibling_client_spans(
        self, tmp_path: Path, collector: OtlpCollector
    ) -> None:
        """A 503 then a 200: two CLIENT spans under the SERVER span, the second with
        its resend count; the failed one is an error with the status as error.type."""
        seen: list[str] = []

        async def flaky(request: web.Request) -> web.Response:
            seen.append(request.headers["traceparent"])
            return web.Response(status=503 if len(seen) == 1 else 200, text="x")

        app = web.Application()
        app.router.add_get("/x", flaky)
        runner, port = await serve(app)
        try:
            upstreams = {"inv": {"endpoints": [f"127.0.0.1:{port}"], "retries": {"max": 2}}}
            async with sidecar(
                tmp_path, "retrier", upstreams=upstreams, telemetry=tracing(collector)
            ) as process:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{process.url}/v1/invoke/inv/x") as resp,
                ):
                    assert resp.status == 200
                spans = await collector.wait_for(count=3)
        finally:
            await runner.cleanup()
        server = one(spans, kind="SERVER")
        first, second = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.start_ns)
        assert first.parent_span_id == second.parent_span_id == server.span_id
        assert first.attributes["http.response.status_code"] == 503
        assert first.attributes["error.type"] == "503"
        assert first.status_code == "ERROR"
        assert "http.request.resend_count" not in first.attributes
        assert second.attributes["http.request.resend_count"] == 1
        assert second.attributes["http.response.status_code"] == 200
        assert second.status_code == "UNSET"
        # Each attempt told the upstream its own span.
        assert [parse(h)[1] for h in seen] == [first.span_id, second.span_id]
        assert server.attributes["http.response.status_code"] == 200

    async def test_sidecar_answers_are_recorded_on_the_server_span(
        self, tmp_path: Path, collector: OtlpCollector
    ) -> None:
        """A failed connect, an open circuit and an unknown upstream: the SERVER span
        says which with error.type = the sidecar's error code (status ERROR for 5xx
        only); a log line written during a traced request carries its ids."""
        dead = f"127.0.0.1:{free_port()}"
        upstreams = {
            "gone": {
                "endpoints": [dead],
                "retries": {"max": 0},
                "circuit_breaker": {"failure_threshold": 1, "open_for": "1m"},
            }
        }
        async with (
            sidecar(tmp_path, "errs", upstreams=upstreams, telemetry=tracing(collector)) as p,
            aiohttp.ClientSession() as session,
        ):
            statuses = []
            for path in ("/v1/invoke/gone/a", "/v1/invoke/gone/b", "/v1/invoke/nowhere/c"):
                async with session.get(p.url + path) as resp:
                    statuses.append(resp.status)
            assert statuses == [502, 503, 404]
            spans = await collector.wait_for(count=4)
            logs = p.log_events()
        servers = sorted((s for s in spans if s.kind == "SERVER"), key=lambda s: s.start_ns)
        connect, circuit, route = servers
        assert connect.attributes["error.type"] == "UPSTREAM_CONNECT_FAILED"
        assert connect.status_code == "ERROR"
        (attempt,) = collector.children(connect)
        assert attempt.attributes["error.type"] == "UPSTREAM_CONNECT_FAILED"
        assert "http.response.status_code" not in attempt.attributes
        assert circuit.attributes["error.type"] == "CIRCUIT_OPEN"
        assert circuit.attributes["http.response.status_code"] == 503
        assert collector.children(circuit) == []  # no attempt was made
        assert route.attributes["error.type"] == "NO_ROUTE"
        assert route.status_code == "UNSET"  # a 4xx is the client's, not a server error
        opened = [e for e in logs if e.get("event") == "circuit_state_changed"]
        assert opened, logs
        assert opened[0]["trace_id"] == connect.trace_id
        assert opened[0]["span_id"] == connect.span_id

    async def test_unsampled_requests_carry_the_context_and_export_nothing(
        self, tmp_path: Path, collector: OtlpCollector, upstream: Upstream
    ) -> None:
        """Ratio 0 (parent-based): a request without a context gets a fresh, unsampled
        one; an unsampled caller's header goes on unchanged; a sampled caller is
        followed. Only the last exports spans."""
        upstreams = {"stock": {"endpoints": [upstream.endpoint]}}
        telemetry = tracing(collector, sampler_ratio=0.0)
        async with (
            sidecar(tmp_path, "ratio0", upstreams=upstreams, telemetry=telemetry) as p,
            aiohttp.ClientSession() as session,
        ):

            async def forwarded(headers: dict[str, str]) -> dict[str, str]:
                async with session.get(f"{p.url}/v1/invoke/stock/echo", headers=headers) as r:
                    return dict((await r.json())["headers"])

            fresh = await forwarded({})
            unsampled = f"00-{TRACE}-{CALLER}-00"
            carried = await forwarded({"traceparent": unsampled, "tracestate": "a=1"})
            followed = await forwarded({"traceparent": SAMPLED})
            invalid = await forwarded({"traceparent": "00-xyz", "tracestate": "drop=1"})
            async with session.get(
                f"{p.url}/v1/invoke/stock/echo",
                headers=CIMultiDict([("traceparent", SAMPLED), ("traceparent", SAMPLED)]),
            ) as r:
                twice = dict((await r.json())["headers"])
            spans = await collector.wait_for(count=2)

            async def exported() -> float:
                return (await metric_samples(p))['sidecar_trace_spans_total{outcome="exported"}']

            await eventually_equal("spans exported", 2.0, exported)
            samples = await metric_samples(p)
        trace_id, _, flags = parse(fresh["traceparent"])
        assert flags == "00"
        assert trace_id != TRACE
        assert carried["traceparent"] == unsampled
        assert carried["tracestate"] == "a=1"
        assert parse(followed["traceparent"])[0] == TRACE
        assert parse(followed["traceparent"])[2] == "01"
        assert parse(invalid["traceparent"])[2] == "00"
        assert "tracestate" not in invalid
        # Two traceparent fields: invalid (W3C), so a new, unsampled trace at ratio 0.
        assert parse(twice["traceparent"])[0] != TRACE
        assert parse(twice["traceparent"])[2] == "00"
        assert {s.trace_id for s in spans} == {TRACE}
        assert len(collector.spans) == 2
        assert samples['sidecar_trace_spans_total{outcome="dropped"}'] == 0

    async def test_a_websocket_handshake_is_traced_like_any_request(
        self, tmp_path: Path, collector: OtlpCollector
    ) -> None:
        """The handshake's SERVER and CLIENT spans end with the 101."""
        from tests.integration.ws_upstream import WsUpstream  # noqa: PLC0415

        service = await WsUpstream().start()
        try:
            upstreams = {"chat": {"endpoints": [f"127.0.0.1:{service.port}"]}}
            async with (
                sidecar(tmp_path, "ws", upstreams=upstreams, telemetry=tracing(collector)) as p,
                aiohttp.ClientSession() as session,
                session.ws_connect(f"{p.url}/v1/invoke/chat/ws") as ws,
            ):
                await ws.send_str("hi")
                assert (await ws.receive()).data == "hi"
                await ws.close()
                spans = await collector.wait_for(count=2)
        finally:
            await service.stop()
        server = one(spans, kind="SERVER")
        client = one(spans, kind="CLIENT")
        assert server.attributes["http.response.status_code"] == 101
        assert client.attributes["http.response.status_code"] == 101
        assert client.parent_span_id == server.span_id


class TestExport:
    async def test_grpc_export(self, tmp_path: Path, upstream: Upstream) -> None:
        """protocol: grpc sends the same spans to an OTLP/gRPC receiver."""
        async with OtlpCollector(http=False, grpc=True) as grpc_collector:
            telemetry = {
                "tracing": {
                    "otlp_endpoint": grpc_collector.grpc_endpoint,
                    "protocol": "grpc",
                    "schedule_delay": "50ms",
                }
            }
            upstreams = {"stock": {"endpoints": [upstream.endpoint]}}
            async with (
                sidecar(tmp_path, "grpc", upstreams=upstreams, telemetry=telemetry) as p,
                aiohttp.ClientSession() as session,
                session.get(f"{p.url}/v1/invoke/stock/echo", headers={"traceparent": SAMPLED}),
            ):
                spans = await grpc_collector.wait_for(count=2)
        assert {s.kind for s in spans} == {"SERVER", "CLIENT"}
        assert {s.trace_id for s in spans} == {TRACE}
        assert grpc_collector.requests[0].transport == "grpc"

    async def test_spans_still_queued_at_sigterm_are_flushed_before_exit(
        self, tmp_path: Path, collector: OtlpCollector, upstream: Upstream
    ) -> None:
        """A long batch delay holds the spans; SIGTERM exports them, then exits 0."""
        upstreams = {"stock": {"endpoints": [upstream.endpoint]}}
        telemetry = tracing(collector, schedule_delay="1h")
        async with sidecar(tmp_path, "flush", upstreams=upstreams, telemetry=telemetry) as p:
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    async with session.get(f"{p.url}/v1/invoke/stock/echo") as resp:
                        assert resp.status == 200
            assert collector.spans == []
            p.signal(signal.SIGTERM)
            assert await p.wait_exit() == 0
        assert len(collector.spans) == 6

    async def test_requests_aborted_when_the_grace_runs_out_still_export_their_spans(
        self, tmp_path: Path, collector: OtlpCollector, upstream: Upstream
    ) -> None:
        """A request still waiting for its upstream when the grace ends is aborted; its
        SERVER and CLIENT spans end then, and the final flush exports them."""
        upstreams = {"stock": {"endpoints": [upstream.endpoint]}}
        shutdown = {"drain": "0s", "grace": "1s"}
        async with (
            sidecar(
                tmp_path,
                "aborted",
                upstreams=upstreams,
                telemetry=tracing(collector, schedule_delay="1h"),
                shutdown=shutdown,
            ) as p,
            aiohttp.ClientSession() as session,
        ):

            async def call() -> None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{p.url}/v1/invoke/stock/slow?delay=30") as resp:
                        await resp.read()

            calling = asyncio.ensure_future(call())
            await eventually("the request reached the upstream", lambda: upstream.hits == 1)
            p.signal(signal.SIGTERM)
            assert await p.wait_exit() == 0
            await calling
            events = [e.get("event") for e in p.log_events()]
        assert "shutdown_grace_exceeded" in events
        assert "spans_not_flushed" not in events
        server = one(collector.spans, kind="SERVER")
        (attempt,) = collector.children(server)
        assert attempt.attributes["url.path"] == "/slow"

    async def test_a_response_cut_after_its_head_fails_the_server_span_too(
        self, tmp_path: Path, collector: OtlpCollector, upstream: Upstream
    ) -> None:
        """The upstream promises 1000 bytes and sends 10: the app got a 200 head and a
        cut body, so the SERVER span is an error (`response_cut`) like its attempt."""
        upstreams = {"stock": {"endpoints": [upstream.endpoint]}}
        async with (
            sidecar(tmp_path, "cut", upstreams=upstreams, telemetry=tracing(collector)) as p,
            aiohttp.ClientSession() as session,
        ):
            async with session.get(f"{p.url}/v1/invoke/stock/truncate") as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            spans = await collector.wait_for(count=2)
        server = one(spans, kind="SERVER")
        (attempt,) = collector.children(server)
        assert attempt.attributes["error.type"] == "response_cut"
        assert server.attributes["http.response.status_code"] == 200
        assert server.attributes["error.type"] == "response_cut"
        assert (server.status_code, attempt.status_code) == ("ERROR", "ERROR")

    async def test_a_stuck_collector_costs_dropped_spans_not_memory(
        self, tmp_path: Path, collector: OtlpCollector, upstream: Upstream
    ) -> None:
        """The export queue is bounded: with the collector not answering, spans past
        max_queue_size are dropped and counted, and requests are served as usual."""
        collector.pause()
        upstreams = {"stock": {"endpoints": [upstream.endpoint]}}
        telemetry = tracing(
            collector, max_queue_size=4, max_export_batch_size=2, export_timeout="2s"
        )
        async with sidecar(tmp_path, "stuck", upstreams=upstreams, telemetry=telemetry) as p:
            async with aiohttp.ClientSession() as session:
                for _ in range(20):
                    async with session.get(f"{p.url}/v1/invoke/stock/echo") as resp:
                        assert resp.status == 200
                samples = await metric_samples(p)
            collector.resume()
        assert samples['sidecar_trace_spans_total{outcome="dropped"}'] >= 40 - 4 - 2
        assert samples["sidecar_trace_export_queue_spans"] <= 4 + 2  # queued + being sent


class TestEventTraces:
    async def test_a_publish_and_its_delivery_are_one_trace(
        self, tmp_path: Path, collector: OtlpCollector, scope: AmqpScope
    ) -> None:
        """SERVER (the publish call) → PRODUCER → CONSUMER (child of, and linked to, the
        producer) → CLIENT (the POST to the app), which the app receives as traceparent."""
        app = await EventApp().start()
        name = f"svc{free_port()}"
        try:
            events = {
                "amqp_url": "amqp://guest:guest@127.0.0.1:5672/",
                "exchange": scope.exchange,
                "spool": {"path": str(tmp_path / "spool.db")},
                "subscriptions": [{"name": "orders", "topic": "orders.*", "path": "/in"}],
            }
            scope.queues += [f"{name}.orders", f"{name}.orders.dlq"]
            async with (
                sidecar(
                    tmp_path,
                    name,
                    events=events,
                    telemetry=tracing(collector),
                    service={"name": name, "port": app.port},
                ) as p,
                aiohttp.ClientSession() as session,
            ):
                # The relay connected, and the subscription's queue declared and bound
                # (else the publish comes back unroutable and is spooled).
                await wait_events(
                    session,
                    p,
                    lambda s: (
                        s["broker"]["state"] == "connected"
                        and s["subscriptions"]["orders"]["consuming"]
                    ),
                    20,
                )
                status, answer = await publish(
                    session,
                    p,
                    "orders.created",
                    b'{"n": 1}',
                    {"traceparent": SAMPLED, "content-type": "application/json"},
                )
                assert (status, answer["status"]) == (202, "confirmed")
                spans = await collector.wait_for(count=4, timeout=20)
                await eventually("the app got the event", lambda: bool(app.received))
        finally:
            await app.stop()
        server = one(spans, kind="SERVER")
        producer = one(spans, kind="PRODUCER")
        consumer = one(spans, kind="CONSUMER")
        client = one(spans, kind="CLIENT")
        assert {s.trace_id for s in spans} == {TRACE}
        assert server.parent_span_id == CALLER
        assert server.name == "POST /v1/publish/{topic}"
        assert producer.parent_span_id == server.span_id
        assert producer.name == f"publish {scope.exchange}:orders.created"
        assert producer.attributes["messaging.system"] == "rabbitmq"
        assert producer.attributes["messaging.operation.type"] == "send"
        assert producer.attributes["messaging.destination.name"] == (
            f"{scope.exchange}:orders.created"
        )
        assert producer.attributes["messaging.rabbitmq.destination.routing_key"] == (
            "orders.created"
        )
        assert producer.attributes["messaging.message.id"] == answer["id"]
        assert producer.attributes["sidecar.event.outcome"] == "confirmed"
        assert consumer.parent_span_id == producer.span_id
        assert [(link.trace_id, link.span_id) for link in consumer.links] == [
            (TRACE, producer.span_id)
        ]
        assert consumer.attributes["messaging.operation.type"] == "process"
        assert consumer.attributes["messaging.destination.name"] == (
            f"{scope.exchange}:orders.created:{name}.orders"
        )
        assert client.parent_span_id == consumer.span_id
        assert client.attributes["http.response.status_code"] == 204
        assert parse(app.received[0].headers["traceparent"]) == (TRACE, client.span_id, "01")

    async def test_a_spooled_event_joins_its_trace_when_it_is_relayed(
        self, tmp_path: Path, collector: OtlpCollector, scope: AmqpScope
    ) -> None:
        """Published while the broker is unreachable: spooled with its producer context,
        so the message the relay sends later still carries that trace."""
        queue = await scope.bind("late.#")
        async with tcp_proxy(accepting=False) as proxy:
            events = {
                "amqp_url": proxy.url,
                "exchange": scope.exchange,
                "spool": {"path": str(tmp_path / "spool.db")},
            }
            async with (
                sidecar(tmp_path, "spooler", events=events, telemetry=tracing(collector)) as p,
                aiohttp.ClientSession() as session,
            ):
                status, answer = await publish(
                    session, p, "late.event", b"{}", {"traceparent": SAMPLED}
                )
                assert (status, answer["status"]) == (202, "spooled")
                producer = (await collector.wait_for(lambda s: s.kind == "PRODUCER"))[0]
                assert producer.attributes["sidecar.event.outcome"] == "spooled"
                proxy.accepting = True
                await wait_events(session, p, lambda s: s["spool"]["depth"] == 0, 30)
                assert (await events_status(session, p))["spool"]["depth"] == 0
        (message,) = await scope.read(queue, 1)
        assert parse(str(message.headers["traceparent"])) == (TRACE, producer.span_id, "01")
        assert json.loads(message.body) == {}
