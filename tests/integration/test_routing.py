"""Requests reach the right upstream intact, by every routing form of SPEC §4."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests

from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    billing_sidecar,
    free_port,
    raw_responses,
    raw_until_close,
    running_sidecar,
)


def _headers(echo: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in echo["headers"]}


class TestInvokePath:
    async def test_method_path_query_headers_and_body_arrive_intact(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """/v1/invoke/{upstream}/{path}?q forwards as /{path}?q with method, headers, body kept."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            aiohttp.ClientSession() as session,
            session.patch(
                f"{sc.url}/v1/invoke/billing/echo/a%2Fb/c?x=1&y=%20z",
                data=b"payload \x00\xff",
                headers={"X-Custom": "kept", "Content-Type": "application/octet-stream"},
            ) as resp,
        ):
            echo = json.loads(await resp.read())
        assert 200 == resp.status
        assert "PATCH" == echo["method"]
        assert "/echo/a%2Fb/c?x=1&y=%20z" == echo["path_qs"]
        assert "payload \x00\xff" == echo["body"]
        headers = _headers(echo)
        assert "kept" == headers["x-custom"]
        assert f"127.0.0.1:{sc.app_port}" == headers["host"]
        assert "127.0.0.1" == headers["x-forwarded-for"]

    async def test_request_without_host_gets_the_upstream_name(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """HTTP/1.0 and bare HTTP/1.1 calls without Host reach the upstream with
        `Host: billing` (an HTTP/1.1 server answers 400 to a request without one)."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answers = [
                await raw_responses(
                    sc.app_port, b"GET /v1/invoke/billing/echo HTTP/%s\r\n\r\n" % version
                )
                for version in (b"1.1", b"1.0")
            ]
        for [(head, body)] in answers:
            assert head.startswith(b"HTTP/1.1 200"), head
            assert "billing" == _headers(json.loads(body))["host"]

    async def test_invoke_without_path_forwards_root(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """/v1/invoke/billing?q forwards as /?q."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            [(head, _)] = await raw_responses(
                sc.app_port, b"GET /v1/invoke/billing?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            )
        # aiohttp has no route for "/", so its 404 proves the request reached it as "/?q=1".
        assert head.startswith(b"HTTP/1.1 404")
        assert b"x-sidecar-error" not in head.lower()
        assert 1 == billing.hits


class TestHeaderHygiene:
    async def test_hop_by_hop_headers_are_removed_and_xff_appended(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Connection, the fields it names, Keep-Alive, TE, Upgrade… never reach the upstream."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            [(_, body)] = await raw_responses(
                sc.app_port,
                b"GET /v1/invoke/billing/echo HTTP/1.1\r\nHost: app\r\n"
                b"Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\n"
                b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n"
                b"X-Forwarded-For: 10.9.8.7\r\nX-End-To-End: yes\r\n\r\n",
            )
        echo = json.loads(body)
        headers = _headers(echo)
        for hop in ("connection", "x-secret-hop", "keep-alive", "te", "proxy-connection"):
            assert hop not in headers, hop
        assert "yes" == headers["x-end-to-end"]
        assert "10.9.8.7, 127.0.0.1" == headers["x-forwarded-for"]
        assert "app" == headers["host"]


class TestHostAndProxyForms:
    async def test_host_header_names_the_upstream(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """A request whose Host is an upstream's name is forwarded as-is."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            aiohttp.ClientSession() as session,
            session.get(f"{sc.url}/echo/x?y=1", headers={"Host": "Billing:8080"}) as resp,
        ):
            echo = await resp.json()
        assert 200 == resp.status
        assert "/echo/x?y=1" == echo["path_qs"]
        assert "Billing:8080" == _headers(echo)["host"]

    async def test_unmodified_requests_and_httpx_clients_work_through_http_proxy(
        self, tmp_path: Path, upstreams: UpstreamFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With HTTP_PROXY pointing at the sidecar, plain clients reach http://billing/..."""
        billing = await upstreams("billing")
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            monkeypatch.setenv("HTTP_PROXY", sc.url)
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)

            def with_requests() -> tuple[int, Any]:
                resp = requests.post("http://billing/echo/r?q=1", data=b"from-requests", timeout=5)
                return resp.status_code, resp.json()

            def with_httpx() -> tuple[int, Any]:
                with httpx.Client(timeout=5) as client:
                    resp = client.get("http://billing/echo/h?q=2")
                    return resp.status_code, resp.json()

            r_status, r_echo = await asyncio.to_thread(with_requests)
            h_status, h_echo = await asyncio.to_thread(with_httpx)
        assert (200, "/echo/r?q=1", "from-requests") == (
            r_status,
            r_echo["path_qs"],
            r_echo["body"],
        )
        assert (200, "/echo/h?q=2") == (h_status, h_echo["path_qs"])
        assert "billing" == _headers(r_echo)["host"]

    async def test_dedicated_listen_port_forwards_everything_to_its_upstream(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Any request on an upstream's own `listen` port goes to that upstream."""
        billing = await upstreams("billing")
        port = free_port()
        upstream_cfg = {"endpoints": [billing.endpoint], "listen": f"127.0.0.1:{port}"}
        async with (
            running_sidecar(tmp_path, {"billing": upstream_cfg}),
            aiohttp.ClientSession() as session,
            session.delete(f"http://127.0.0.1:{port}/echo/dedicated?z") as resp,
        ):
            echo = await resp.json()
        assert (200, "DELETE", "/echo/dedicated?z") == (
            resp.status,
            echo["method"],
            echo["path_qs"],
        )


class TestNotAnOpenProxy:
    async def test_unknown_names_get_no_route_and_no_connection(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """Unknown upstream names and raw addresses get 404 NO_ROUTE; nothing is contacted."""
        billing = await upstreams("billing")
        async with (
            billing_sidecar(tmp_path, billing.endpoint) as sc,
            aiohttp.ClientSession() as session,
        ):
            answers = []
            for url, headers in (
                (f"{sc.url}/v1/invoke/payments/echo", {}),
                (f"{sc.url}/echo", {"Host": billing.endpoint}),
                (f"{sc.url}/echo", {"Host": "127.0.0.1"}),
            ):
                async with session.get(url, headers=headers) as resp:
                    answers.append(
                        (resp.status, resp.headers["x-sidecar-error"], await resp.json())
                    )
            [(head, _)] = await raw_responses(
                sc.app_port,
                f"GET http://{billing.endpoint}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            )
        assert [404, 404, 404] == [status for status, _, _ in answers]
        assert {"NO_ROUTE"} == {code for _, code, _ in answers}
        assert "NO_ROUTE" == answers[0][2]["error"]["code"]
        assert "payments" == answers[0][2]["error"]["upstream"]
        assert head.startswith(b"HTTP/1.1 404")
        assert 0 == billing.hits


class TestResponseFraming:
    async def test_head_204_and_chunked_responses_keep_the_connections_usable(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """HEAD and 204 carry no body and a chunked body is relayed chunked; the app's
        connection and the pooled upstream connection both carry the next request."""
        billing = await upstreams("billing")
        request = "{} /v1/invoke/billing/{} HTTP/1.1\r\nHost: x\r\n\r\n"
        async with billing_sidecar(tmp_path, billing.endpoint) as sc:
            answer = await raw_responses(
                sc.app_port,
                "".join(
                    request.format(method, path)
                    for method, path in (("HEAD", "echo"), ("GET", "status/204"), ("GET", "echo"))
                ).encode(),
                count=3,
                bodiless={0},
            )
            chunked = await raw_until_close(
                sc.app_port,
                b"GET /v1/invoke/billing/chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            http10 = await raw_until_close(
                sc.app_port, b"GET /v1/invoke/billing/chunked HTTP/1.0\r\nHost: x\r\n\r\n"
            )
        statuses = [head.split(b"\r\n")[0] for head, _ in answer]
        assert [b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 200 OK"] == statuses
        assert b"" == answer[0][1]
        assert "GET" == json.loads(answer[2][1])["method"]
        head, _, body = chunked.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        assert b"6\r\npart0\n\r\n6\r\npart1\n\r\n6\r\npart2\n\r\n0\r\n\r\n" == body
        head, _, body = http10.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()
        assert b"part0\npart1\npart2\n" == body
