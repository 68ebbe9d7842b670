"""Each sidecar error code of SPEC §4, retries, ejection and the circuit breaker, end to end."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    billing_sidecar,
    free_port,
    poll_json,
    raw_responses,
    raw_until_close,
    running_sidecar,
)

FAST_FAIL = {"retries": {"max": 0}}


async def _get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any, Any]:
    async with session.request(kw.pop("method", "GET"), url, **kw) as resp:
        body = await resp.read()
        return resp.status, resp.headers, body


async def _error_code(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, str]:
    status, headers, _ = await _get(session, url, **kw)
    return status, headers.get("x-sidecar-error", "")


class TestErrorContract:
    async def test_upstream_5xx_passes_through_untouched(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An upstream's own 500 reaches the app as it was sent, without x-sidecar-error."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            aiohttp.ClientSession() as session,
        ):
            status, headers, body = await _get(
                session, f"{sc.url}/v1/invoke/billing/status/500", method="POST"
            )
        assert 500 == status
        assert "x-sidecar-error" not in headers
        assert b'{"instance": "billing", "status": 500}' == body

    async def test_connect_failure_is_502_with_json_body(self, tmp_path: Path) -> None:
        """Nothing listening at the only endpoint: 502 UPSTREAM_CONNECT_FAILED in SPEC's shape."""
        dead = f"127.0.0.1:{free_port()}"
        async with (
            running_sidecar(tmp_path, {"billing": {"endpoints": [dead], **FAST_FAIL}}) as sc,
            aiohttp.ClientSession() as session,
            session.get(f"{sc.url}/v1/invoke/billing/x") as resp,
        ):
            body = await resp.json()
        assert (502, "UPSTREAM_CONNECT_FAILED") == (resp.status, resp.headers["x-sidecar-error"])
        assert "application/json" == resp.content_type
        assert {"code", "message", "upstream"} == set(body["error"])
        assert ("UPSTREAM_CONNECT_FAILED", "billing") == (
            body["error"]["code"],
            body["error"]["upstream"],
        )

    async def test_slow_upstream_is_504(self, tmp_path: Path, upstreams: UpstreamFactory) -> None:
        """No response within the timeout: 504 UPSTREAM_TIMEOUT, before the upstream answers."""
        billing = await upstreams("billing")
        cfg = {"endpoints": [billing.endpoint], "timeout": "300ms", **FAST_FAIL}
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            started = time.monotonic()
            status, code = await _error_code(session, f"{sc.url}/v1/invoke/billing/slow?delay=3")
            took = time.monotonic() - started
        assert (504, "UPSTREAM_TIMEOUT") == (status, code)
        assert took < 2.0

    async def test_over_max_concurrent_requests_is_503_overloaded(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """With max_concurrent_requests in flight, the next request is refused at once."""
        billing = await upstreams("billing")
        cfg = {"endpoints": [billing.endpoint], "max_concurrent_requests": 1}
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            slow = asyncio.ensure_future(_get(session, f"{sc.url}/v1/invoke/billing/slow?delay=1"))
            while billing.hits == 0:
                await asyncio.sleep(0.01)
            refused = await _error_code(session, f"{sc.url}/v1/invoke/billing/echo")
            first = await slow
        assert (503, "OVERLOADED") == refused
        assert 200 == first[0]

    async def test_malformed_request_is_400_bad_request(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Bytes that are not HTTP get 400 BAD_REQUEST, counted; the connection is closed."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            aiohttp.ClientSession() as session,
        ):
            answer = await raw_until_close(
                sc.app_port, b"GET /v1/invoke/billing/echo HTTP/1.1\r\nBad Header Line\r\n\r\n"
            )
            _, _, metrics = await _get(session, f"{sc.admin}/metrics")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400")
        assert b"x-sidecar-error: BAD_REQUEST" in head
        assert b'"BAD_REQUEST"' in body
        assert 0 == billing.hits
        assert b'sidecar_proxy_errors_total{error="BAD_REQUEST",upstream=""} 1.0' in metrics

    async def test_no_healthy_endpoints_is_503(self, tmp_path: Path) -> None:
        """Once every endpoint is ejected, requests fail fast with NO_HEALTHY_ENDPOINTS."""
        dead = f"127.0.0.1:{free_port()}"
        cfg = {
            "endpoints": [dead],
            "outlier": {"consecutive_failures": 1, "max_ejection_percent": 100},
            "circuit_breaker": {"failure_threshold": 100},
            **FAST_FAIL,
        }
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            first = await _error_code(session, f"{sc.url}/v1/invoke/billing/x")
            second = await _error_code(session, f"{sc.url}/v1/invoke/billing/x")
        assert (502, "UPSTREAM_CONNECT_FAILED") == first
        assert (503, "NO_HEALTHY_ENDPOINTS") == second


class TestRetries:
    async def test_idempotent_request_retries_on_another_endpoint(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """With one dead endpoint, every GET still succeeds: the retry goes to the live one."""
        billing = await upstreams("billing")
        dead = f"127.0.0.1:{free_port()}"
        cfg = {"endpoints": [dead, billing.endpoint], "outlier": {"consecutive_failures": 1000}}
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            statuses = [
                (await _get(session, f"{sc.url}/v1/invoke/billing/echo"))[0] for _ in range(20)
            ]
            metrics = (await _get(session, f"{sc.admin}/metrics"))[2].decode()
        assert [200] * 20 == statuses
        assert 20 == billing.hits
        retried = next(
            line for line in metrics.splitlines() if line.startswith("sidecar_retries_total")
        )
        assert float(retried.split()[-1]) >= 1

    async def test_post_is_not_retried_unless_it_has_an_idempotency_key(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A 503 to a POST passes through after one attempt; with Idempotency-Key it is retried."""
        billing = await upstreams("billing")
        cfg = {"endpoints": [billing.endpoint], "retries": {"max": 2, "on": [503]}}
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            url = f"{sc.url}/v1/invoke/billing/status/503"
            plain = await _error_code(session, url, method="POST", data=b"x")
            plain_hits = billing.hits
            keyed = await _error_code(
                session, url, method="POST", data=b"x", headers={"Idempotency-Key": "k1"}
            )
        assert (503, "") == plain
        assert 1 == plain_hits
        assert (503, "") == keyed
        assert 1 + 3 == billing.hits

    async def test_no_retry_once_response_bytes_reached_the_app(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An upstream dying mid-body cuts the app's response short; the request is not retried."""
        billing = await upstreams("billing")
        cfg = {
            "endpoints": [billing.endpoint],
            "retries": {"max": 2, "on": ["connect-failure", "reset", "5xx"]},
        }
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            async with session.get(f"{sc.url}/v1/invoke/billing/truncate") as resp:
                status = resp.status
                try:
                    await resp.read()
                    cut = False
                except aiohttp.ClientPayloadError:
                    cut = True
            after = (await _get(session, f"{sc.url}/v1/invoke/billing/echo"))[0]
        assert (200, True) == (status, cut)
        assert 1 + 1 == billing.hits
        assert 200 == after

    async def test_retry_budget_caps_retries(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """With budget 0 and no floor, a retryable failure is not retried at all."""
        billing = await upstreams("billing")
        cfg = {
            "endpoints": [billing.endpoint],
            "retries": {"max": 2, "on": [503], "budget_ratio": 0, "min_retries_per_second": 0},
            # Every call fails: neither the breaker nor ejection may stop one reaching it.
            "circuit_breaker": {"failure_threshold": 100},
            "outlier": {"consecutive_failures": 100},
        }
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            for _ in range(5):
                await _get(session, f"{sc.url}/v1/invoke/billing/status/503")
        assert 5 == billing.hits


class TestEjectionAndBreaker:
    async def test_failing_endpoint_is_ejected_and_traffic_moves(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An endpoint answering 5xx is ejected after consecutive failures; the other takes all."""
        good = await upstreams("good")
        bad = await upstreams("bad")
        bad.failing = True
        cfg = {
            "endpoints": [good.endpoint, bad.endpoint],
            # least_request ties are broken at random, so both endpoints see traffic at first.
            "balancer": "least_request",
            "outlier": {"consecutive_failures": 2, "base_ejection": "30s"},
            "circuit_breaker": {"failure_threshold": 100},
            **FAST_FAIL,
        }
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            for _ in range(40):
                await _get(session, f"{sc.url}/v1/invoke/billing/flaky")
            bad_hits = bad.hits
            for _ in range(20):
                await _get(session, f"{sc.url}/v1/invoke/billing/flaky")
            async with session.get(f"{sc.admin}/v1/status") as resp:
                status = await resp.json()
        assert 2 == bad_hits
        assert 2 == bad.hits
        endpoints = {
            e["address"]: e["ejected"] for e in status["upstreams"]["billing"]["endpoints"]
        }
        assert {good.endpoint: False, bad.endpoint: True} == endpoints
        (ejected,) = [e for e in sc.log_events() if e.get("event") == "endpoint_ejected"]
        assert ("billing", bad.endpoint, 1, 2) == (
            ejected["upstream"],
            ejected["endpoint"],
            ejected["ejections"],
            ejected["consecutive_failures"],
        )
        assert 29.0 < ejected["ejected_for_s"] <= 30.0

    async def test_breaker_opens_fails_fast_and_recovers(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """After failure_threshold failures: 503 CIRCUIT_OPEN without touching the upstream,
        then after open_for one probe closes the circuit again."""
        billing = await upstreams("billing")
        billing.failing = True
        cfg = {
            "endpoints": [billing.endpoint],
            # Long enough that the 4th call and the scrape surely land while open.
            "circuit_breaker": {"failure_threshold": 3, "open_for": "2s"},
            "outlier": {"consecutive_failures": 1000},
            **FAST_FAIL,
        }
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            url = f"{sc.url}/v1/invoke/billing/flaky"
            failures = [(await _get(session, url))[0] for _ in range(3)]
            status, headers, body = await _get(session, url)
            hits_while_open = billing.hits
            metrics_open = (await _get(session, f"{sc.admin}/metrics"))[2].decode()
            billing.failing = False
            await poll_json(  # until open_for has passed
                session,
                f"{sc.admin}/v1/status",
                lambda _, status: status["upstreams"]["billing"]["circuit"] == "half-open",
            )
            recovered = (await _get(session, url))[0]
            after = (await _get(session, url))[0]
            async with session.get(f"{sc.admin}/v1/status") as resp:
                circuit = (await resp.json())["upstreams"]["billing"]["circuit"]
        assert [500, 500, 500] == failures
        assert (503, "CIRCUIT_OPEN") == (status, headers["x-sidecar-error"])
        assert int(headers["Retry-After"]) >= 1
        assert b'"CIRCUIT_OPEN"' in body
        assert 3 == hits_while_open
        assert 'sidecar_circuit_state{upstream="billing"} 2.0' in metrics_open
        assert (200, 200, "closed") == (recovered, after, circuit)

    async def test_fallback_is_served_while_open(self, tmp_path: Path) -> None:
        """A configured fallback answers instead of CIRCUIT_OPEN while the circuit is open."""
        dead = f"127.0.0.1:{free_port()}"
        cfg = {
            "endpoints": [dead],
            "circuit_breaker": {"failure_threshold": 1, "open_for": "1m"},
            "fallback": {"status": 200, "json": {"invoices": [], "degraded": True}},
            **FAST_FAIL,
        }
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            first = await _error_code(session, f"{sc.url}/v1/invoke/billing/x")
            async with session.get(f"{sc.url}/v1/invoke/billing/x") as resp:
                fallback = (resp.status, await resp.json(), resp.headers.get("x-sidecar-error"))
        assert (502, "UPSTREAM_CONNECT_FAILED") == first
        assert (200, {"invoices": [], "degraded": True}, None) == fallback

    async def test_admin_reset_closes_the_circuit(self, tmp_path: Path) -> None:
        """POST /v1/breakers/{upstream}/reset from loopback closes an open circuit."""
        dead = f"127.0.0.1:{free_port()}"
        cfg = {
            "endpoints": [dead],
            "circuit_breaker": {"failure_threshold": 1, "open_for": "1m"},
            **FAST_FAIL,
        }
        async with (
            running_sidecar(tmp_path, {"billing": cfg}) as sc,
            aiohttp.ClientSession() as session,
        ):
            await _get(session, f"{sc.url}/v1/invoke/billing/x")
            open_code = await _error_code(session, f"{sc.url}/v1/invoke/billing/x")
            async with session.post(f"{sc.admin}/v1/breakers/billing/reset") as resp:
                reset = (resp.status, await resp.json())
            async with session.post(f"{sc.admin}/v1/breakers/nope/reset") as resp:
                unknown = resp.status
            after = await _error_code(session, f"{sc.url}/v1/invoke/billing/x")
        assert (503, "CIRCUIT_OPEN") == open_code
        assert (200, {"upstream": "billing", "before": "open", "circuit": "closed"}) == reset
        assert 404 == unknown
        assert (502, "UPSTREAM_CONNECT_FAILED") == after


class TestUnsupportedRequests:
    async def test_connect_is_refused_with_400(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """CONNECT tunnels get 400 BAD_REQUEST and the connection closes; nothing is contacted."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answer = await raw_until_close(
                sc.app_port,
                f"CONNECT {billing.endpoint} HTTP/1.1\r\nHost: {billing.endpoint}\r\n\r\n".encode(),
            )
        assert answer.startswith(b"HTTP/1.1 400"), answer
        assert b"x-sidecar-error: BAD_REQUEST" in answer
        assert 0 == billing.hits

    async def test_unrelayable_framing_and_versions_are_refused_with_400(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Transfer codings other than plain chunked (re-chunking would drop them), and
        HTTP versions other than 1.0 and 1.1, get 400 naming the reason; nothing is sent."""
        billing = await upstreams("billing")
        cases = {
            b"POST /v1/invoke/billing/echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n": "Transfer-Encoding 'gzip, chunked' is not supported",
            b"POST /v1/invoke/billing/echo HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n"
            b"abc": "Transfer-Encoding 'identity' is not supported",
            b"GET /v1/invoke/billing/echo\r\n\r\n": "HTTP/0.9 is not supported",
            b"GET /v1/invoke/billing/echo HTTP/2.0\r\n\r\n": "HTTP/2.0 is not supported",
            # Kept alive by llhttp (the Connection field), yet still 2.0; the version is
            # named before a refused field.
            b"GET /v1/invoke/billing/echo HTTP/2.0\r\nConnection: keep-alive\r\n\r\n": (
                "HTTP/2.0 is not supported"
            ),
            b"POST /v1/invoke/billing/echo HTTP/2.0\r\nTransfer-Encoding: identity\r\n\r\n"
            b"abc": "HTTP/2.0 is not supported",
            b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n": (
                "a request must have one Host field"
            ),
        }
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answers = [await raw_until_close(sc.app_port, request) for request in cases]
        for answer, reason in zip(answers, cases.values(), strict=True):
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), answer
            assert reason in json.loads(body)["error"]["message"]
        assert 0 == billing.hits

    async def test_upgrade_request_with_a_body_is_served_as_plain_http(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An h2c upgrade on a POST (curl --http2 -d ...), Content-Length or chunked, is
        forwarded as plain HTTP/1.1 with its body and without the upgrade, and the
        connection carries the next request."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answers = await raw_responses(
                sc.app_port,
                b"POST /v1/invoke/billing/echo/1 HTTP/1.1\r\nHost: billing\r\n"
                b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 3\r\n\r\nabc"
                b"POST /v1/invoke/billing/echo/2 HTTP/1.1\r\nHost: billing\r\n"
                b"Connection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nde\r\n1\r\nf\r\n0\r\n\r\n"
                b"GET /v1/invoke/billing/echo/3 HTTP/1.1\r\nHost: billing\r\n\r\n",
                count=3,
            )
            # llhttp reads Proxy-Connection as Connection: an upgrade all the same, here
            # on a new app connection and the pooled upstream one the others left.
            answers += await raw_responses(
                sc.app_port,
                b"POST /v1/invoke/billing/echo/4 HTTP/1.1\r\nHost: billing\r\n"
                b"Proxy-Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 5\r\n\r\nhello",
                count=1,
            )
        assert [True] * 4 == [head.startswith(b"HTTP/1.1 200") for head, _ in answers]
        echoes = [json.loads(body) for _, body in answers]
        assert ["/echo/1", "/echo/2", "/echo/3", "/echo/4"] == [e["path_qs"] for e in echoes]
        assert ["abc", "def", "", "hello"] == [e["body"] for e in echoes]
        for echo in echoes[:2]:
            assert not {k.lower() for k, _ in echo["headers"]} & {"upgrade", "connection"}

    async def test_upgrade_requests_are_served_as_plain_http(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """An Upgrade other than websocket (h2c) is ignored as RFC 9110 allows: the request
        is forwarded without Upgrade/Connection, answered over HTTP/1.1, and the connection
        carries the next request."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answers = await raw_responses(
                sc.app_port,
                b"GET /v1/invoke/billing/echo/1 HTTP/1.1\r\nHost: billing\r\n"
                b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                b"GET /v1/invoke/billing/echo/2 HTTP/1.1\r\nHost: billing\r\n\r\n",
                count=2,
            )
        assert [True, True] == [head.startswith(b"HTTP/1.1 200") for head, _ in answers]
        echoes = [json.loads(body) for _, body in answers]
        assert ["/echo/1", "/echo/2"] == [e["path_qs"] for e in echoes]
        first_headers = {k.lower() for k, _ in echoes[0]["headers"]}
        assert not first_headers & {"upgrade", "http2-settings", "connection"}
