"""Hop-by-hop headers stay on their hop (RFC 9110 §7.6.1, SPEC §4), in both directions and
by every routing form; proxy credentials stay at the proxy (RFC 9110 §11.7).

The audit list is the union of RFC 9110 §7.6.1 and the set Go's httputil.ReverseProxy
removes: Connection, Proxy-Connection, Keep-Alive, Proxy-Authenticate,
Proxy-Authorization, TE, Trailer, Transfer-Encoding, Upgrade, plus every field
`Connection` names except `Content-Length` and `Host`. `Transfer-Encoding` is framing
the sidecar writes again for each hop (a chunked body is re-chunked), so what is
checked here is that nothing the sender put in the others crosses the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import (
    free_port,
    raw_responses,
    raw_upstream,
    running_sidecar,
)

CREDENTIALS = "dXNlcjpzZWNyZXQ="  # base64("user:secret")

#: Every audited hop-by-hop field, with a value a client or server really sends, and
#: `X-Hop`, which `Connection` names. Each is sent both as a request and a response
#: header: a header the sidecar forwarded in one direction only would leak in the other.
HOP_BY_HOP_LINES = (
    b"Connection: keep-alive, X-Hop, Content-Length, Host\r\n"
    b"X-Hop: named in Connection\r\n"
    b"Keep-Alive: timeout=5, max=100\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Proxy-Authorization: Basic " + CREDENTIALS.encode() + b"\r\n"
    b'Proxy-Authenticate: Basic realm="upstream-proxy"\r\n'
    b"TE: trailers\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Upgrade: h2c\r\n"
    b"X-End-To-End: kept\r\n"
)
HOP_BY_HOP = {
    "connection",
    "x-hop",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
}

#: The four ways an app reaches `billing` (SPEC §4): request line and Host, and whether
#: it is sent to the upstream's dedicated listen port instead of the main one.
ROUTES: dict[str, tuple[bytes, bytes, bool]] = {
    "path": (b"/v1/invoke/billing/echo", b"app", False),
    "host": (b"/echo", b"billing", False),
    "absolute-form": (b"http://billing/echo", b"billing", False),
    "dedicated-port": (b"/echo", b"app", True),
}


@contextlib.asynccontextmanager
async def _billing(tmp: Path, endpoint: str) -> AsyncIterator[tuple[int, int]]:
    """A sidecar whose `billing` also has a dedicated listen port; yields (app port, that
    port)."""
    dedicated = free_port()
    upstream = {"endpoints": [endpoint], "listen": f"127.0.0.1:{dedicated}"}
    async with running_sidecar(tmp, {"billing": upstream}) as sc:
        yield sc.app_port, dedicated


def _names(head: bytes) -> list[tuple[str, str]]:
    """The (lower-cased name, value) pairs of a message head."""
    pairs = []
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            pairs.append((name.strip().lower().decode(), value.strip().decode()))
    return pairs


class TestRequestHeaders:
    @pytest.mark.parametrize("route", list(ROUTES))
    async def test_hop_by_hop_request_headers_do_not_reach_the_upstream(
        self, tmp_path: Path, upstreams: UpstreamFactory, route: str
    ) -> None:
        """A request carrying every audited hop-by-hop field: none of them, nor the field
        `Connection` names, reaches the upstream; the credentials appear nowhere in what
        it received; `Content-Length` and `Host`, though named in `Connection`, are kept,
        and so is the body and an end-to-end header."""
        billing = await upstreams("billing")
        target, host, dedicated = ROUTES[route]
        request = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (target, host)
            + HOP_BY_HOP_LINES
            + b"Content-Length: 3\r\n\r\nabc"
        )
        async with _billing(tmp_path, billing.endpoint) as (app_port, dedicated_port):
            [(head, body)] = await raw_responses(dedicated_port if dedicated else app_port, request)
        assert head.startswith(b"HTTP/1.1 200"), head
        echo = json.loads(body)
        received = {name.lower(): value for name, value in echo["headers"]}
        assert [] == sorted(HOP_BY_HOP & received.keys())
        assert "secret" not in body.decode()
        assert CREDENTIALS not in body.decode()
        assert ("kept", "3", "abc", True) == (
            received.get("x-end-to-end"),
            received.get("content-length"),
            echo["body"],
            "host" in received,
        )

    async def test_proxy_url_credentials_of_requests_stay_at_the_sidecar(
        self, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`requests` with the sidecar as its proxy and credentials in the proxy URL sends
        `Proxy-Authorization`; the upstream sees no such header and no trace of the
        secret."""
        billing = await upstreams("billing")
        async with _billing(tmp_path, billing.endpoint) as (app_port, _):
            proxy = f"http://user:secret@127.0.0.1:{app_port}"

            def get() -> tuple[int, str]:
                with requests.Session() as session:
                    session.trust_env = False  # only the proxy given here
                    resp = session.get("http://billing/echo", proxies={"http": proxy}, timeout=10)
                    return resp.status_code, resp.text

            status, text = await asyncio.to_thread(get)
        echo: dict[str, Any] = json.loads(text)
        received = {name.lower() for name, _ in echo["headers"]}
        assert (200, "/echo") == (status, echo["path_qs"])
        assert set() == received & {"proxy-authorization", "proxy-connection"}
        assert "secret" not in text
        assert CREDENTIALS not in text


class TestResponseHeaders:
    @pytest.mark.parametrize("route", list(ROUTES))
    async def test_hop_by_hop_response_headers_do_not_reach_the_app(
        self, tmp_path: Path, route: str
    ) -> None:
        """An upstream answer carrying every audited hop-by-hop field: none of them, nor
        the field its `Connection` names, reaches the app (a `Connection` the sidecar
        writes itself says only `close` or `keep-alive`); `Content-Length`, though named,
        is kept, and so is the body and an end-to-end header."""
        answer = b"HTTP/1.1 200 OK\r\n" + HOP_BY_HOP_LINES + b"Content-Length: 2\r\n\r\nok"

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # bodiless GETs
                writer.write(answer)
                await writer.drain()

        target, host, dedicated = ROUTES[route]
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host)
        async with (
            raw_upstream(serve) as endpoint,
            _billing(tmp_path, endpoint) as (app_port, dedicated_port),
        ):
            [(head, body)] = await raw_responses(dedicated_port if dedicated else app_port, request)
        assert head.startswith(b"HTTP/1.1 200"), head
        received = _names(head)
        leaked = sorted(
            (name, value)
            for name, value in received
            if name in HOP_BY_HOP
            and not (name == "connection" and value.lower() in {"close", "keep-alive"})
        )
        assert [] == leaked
        assert "secret" not in head.decode()
        assert CREDENTIALS not in head.decode()
        assert (b"ok", [("content-length", "2")], [("x-end-to-end", "kept")]) == (
            body,
            [(n, v) for n, v in received if n == "content-length"],
            [(n, v) for n, v in received if n == "x-end-to-end"],
        )
