"""Header hygiene and request-target routing (pure functions of sidecar.proxy.headers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.proxy.headers import (
    HOP_BY_HOP,
    PROTECTED,
    absolute_target,
    host_name,
    rechunked_encoding,
    request_headers,
    response_headers,
    route_target,
    serialize,
    websocket_upgrade,
)

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(
    str.encode
)
value = st.binary(min_size=0, max_size=20).filter(lambda v: b"\r" not in v and b"\n" not in v)
name_case = st.sampled_from([bytes.lower, bytes.upper, bytes.title])
header = st.tuples(token, value)
hop = st.sampled_from(sorted(HOP_BY_HOP))
segment = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~%", min_size=0, max_size=10
).map(str.encode)
upstream_name = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?\Z").map(str.encode)


class TestRequestHeaders:
    def test_connection_and_the_fields_it_names_are_removed(self) -> None:
        """`Connection: close, X-Hop` removes Connection and X-Hop; the rest stays in order."""
        headers = [
            (b"Host", b"billing"),
            (b"Connection", b"close, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Accept", b"*/*"),
        ]
        expected = [(b"Host", b"billing"), (b"Accept", b"*/*"), (b"X-Forwarded-For", b"1.2.3.4")]
        assert expected == request_headers(headers, b"1.2.3.4")

    def test_connection_cannot_remove_framing_or_host(self) -> None:
        """`Connection: content-length, host` must not strip them: the upstream would read
        the body as a second request (smuggling) or could not route."""
        headers = [
            (b"Host", b"billing"),
            (b"Connection", b"Content-Length, host, x-hop"),
            (b"Content-Length", b"41"),
            (b"X-Hop", b"1"),
        ]
        assert [
            (b"Host", b"billing"),
            (b"Content-Length", b"41"),
            (b"X-Forwarded-For", b"ip"),
        ] == request_headers(headers, b"ip")
        assert [(b"Content-Length", b"5")] == response_headers(
            [(b"Connection", b"content-length"), (b"Content-Length", b"5")]
        )

    def test_host_is_added_only_when_missing(self) -> None:
        """HTTP/1.1 needs Host: the upstream's name goes first when the app sent none."""
        assert [(b"Host", b"billing"), (b"Accept", b"*/*"), (b"X-Forwarded-For", b"ip")] == (
            request_headers([(b"Accept", b"*/*")], b"ip", b"billing")
        )
        assert [(b"host", b"x:8080"), (b"X-Forwarded-For", b"ip")] == request_headers(
            [(b"host", b"x:8080")], b"ip", b"billing"
        )

    def test_expect_is_not_forwarded(self) -> None:
        """The sidecar answers Expect: 100-continue itself."""
        headers = [(b"Expect", b"100-continue"), (b"Content-Length", b"3")]
        assert [(b"Content-Length", b"3"), (b"X-Forwarded-For", b"ip")] == request_headers(
            headers, b"ip"
        )

    def test_existing_forwarded_for_values_are_joined_and_appended_to(self) -> None:
        """Several X-Forwarded-For fields become one list ending with the client address."""
        headers = [(b"X-Forwarded-For", b"a"), (b"x-forwarded-for", b"b")]
        assert [(b"X-Forwarded-For", b"a, b, c")] == request_headers(headers, b"c")

    @given(
        st.lists(header, max_size=8),
        st.lists(st.tuples(hop, value), max_size=4),
        st.lists(token, max_size=3),
        name_case,
    )
    def test_no_hop_by_hop_field_survives(
        self,
        end_to_end: list[tuple[bytes, bytes]],
        hops: list[tuple[bytes, bytes]],
        listed: list[bytes],
        case: object,
    ) -> None:
        """Whatever the mix and case, no hop-by-hop or Connection-listed field is forwarded
        (but Content-Length and Host, which framing and routing need), and every other
        field is kept in order."""
        assert callable(case)
        headers = [(case(n), v) for n, v in hops] + end_to_end
        if listed:
            headers.append((b"Connection", b", ".join(listed)))
        out = request_headers(headers, b"127.0.0.1")
        names = [n.lower() for n, _ in out]
        dropped = {t.lower() for t in listed} - PROTECTED
        removed = HOP_BY_HOP | {b"expect", b"x-forwarded-for"} | dropped
        assert not (set(names[:-1]) & (HOP_BY_HOP | dropped))
        assert b"x-forwarded-for" == names[-1]
        kept = [(n, v) for n, v in end_to_end if n.lower() not in removed]
        assert kept == out[:-1]


class TestHopByHopSet:
    def test_the_set_is_go_reverse_proxys_and_rfc_9110s(self) -> None:
        """The removed set is Go httputil.ReverseProxy's hop headers (RFC 9110 §7.6.1's list
        plus the proxy credentials of §11.7), nothing less."""
        go_hop_headers = {
            b"connection",
            b"proxy-connection",
            b"keep-alive",
            b"proxy-authenticate",
            b"proxy-authorization",
            b"te",
            b"trailer",
            b"transfer-encoding",
            b"upgrade",
        }
        assert go_hop_headers == set(HOP_BY_HOP)

    @pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
    def test_each_member_is_removed_both_ways(self, name: bytes) -> None:
        """Each hop-by-hop field, in any case, is removed from requests and responses."""
        for spelled in (name, name.upper(), name.title()):
            headers = [(spelled, b"x"), (b"Accept", b"*/*")]
            assert [(b"Accept", b"*/*"), (b"X-Forwarded-For", b"ip")] == request_headers(
                headers, b"ip"
            )
            assert [(b"Accept", b"*/*")] == response_headers(headers)

    def test_proxy_credentials_stay_at_the_proxy(self) -> None:
        """An HTTP_PROXY client's Proxy-Authorization never reaches the upstream, and an
        upstream's Proxy-Authenticate never reaches the app."""
        request = [(b"Host", b"billing"), (b"Proxy-Authorization", b"Basic dXNlcjpzZWNyZXQ=")]
        assert [(b"Host", b"billing"), (b"X-Forwarded-For", b"ip")] == request_headers(
            request, b"ip"
        )
        assert [] == response_headers([(b"Proxy-Authenticate", b'Basic realm="x"')])


class TestAbsoluteForm:
    @pytest.mark.parametrize(
        ("target", "expected"),
        [
            (b"http://billing/a?q=1", (b"billing", b"/a?q=1")),
            (b"http://billing:8080/a", (b"billing:8080", b"/a")),
            (b"http://user:pw@billing:8080/a", (b"billing:8080", b"/a")),
            (b"http://billing?q", (b"billing", b"/?q")),
            (b"http://billing/", (b"billing", b"/")),
            (b"http://billing", (b"billing", b"")),
            (b"http://[::1]:81", (b"[::1]:81", b"")),
            (b"ws://billing/ws?x", (b"billing", b"/ws?x")),
            (b"WS://billing", (b"billing", b"")),
        ],
    )
    def test_authority_and_origin_form(self, target: bytes, expected: tuple[bytes, bytes]) -> None:
        """The authority without userinfo becomes the Host; an empty path and query is b""
        (OPTIONS then sends `*`, RFC 9112 §3.2.4)."""
        assert expected == absolute_target(target)

    def test_replace_host_drops_the_apps_host(self) -> None:
        """With an absolute-form target the authority replaces whatever Host the app sent
        (RFC 9112 §3.2.2), and goes first."""
        headers = [(b"Accept", b"*/*"), (b"Host", b"elsewhere"), (b"HOST", b"twice")]
        assert [
            (b"Host", b"billing:8080"),
            (b"Accept", b"*/*"),
            (b"X-Forwarded-For", b"ip"),
        ] == request_headers(headers, b"ip", b"billing:8080", replace_host=True)


class TestWebsocketUpgrade:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (b"websocket", True),
            (b"WebSocket", True),
            (b"h2c, websocket", True),
            (b"h2c", False),
            (b"websockets", False),
        ],
    )
    def test_only_the_websocket_token_is_tunnelled(self, value: bytes, expected: bool) -> None:
        """`Upgrade` must list the websocket token (any case) for the request to be
        tunnelled; h2c and look-alikes are served as plain HTTP."""
        assert expected == websocket_upgrade([(b"Upgrade", value)])

    def test_no_upgrade_header_is_no_websocket(self) -> None:
        """Connection: upgrade alone asks for nothing."""
        assert not websocket_upgrade([(b"Connection", b"upgrade")])


class TestRechunkedEncoding:
    @pytest.mark.parametrize(
        ("upstream", "line"),
        [
            (None, b"Transfer-Encoding: chunked\r\n"),
            (b"chunked", b"Transfer-Encoding: chunked\r\n"),
            (b"gzip, chunked", b"Transfer-Encoding: gzip, chunked\r\n"),
            # chunked not last: the body was read until the close, codings and all.
            (b"chunked, gzip", b"Transfer-Encoding: chunked, gzip, chunked\r\n"),
            (b"gzip", b"Transfer-Encoding: gzip, chunked\r\n"),
        ],
    )
    def test_codings_still_on_the_body_are_named(self, upstream: bytes | None, line: bytes) -> None:
        headers = [(b"Content-Type", b"text/plain")]
        if upstream is not None:
            headers.append((b"Transfer-Encoding", upstream))
        assert line == rechunked_encoding(headers)


class TestResponseHeaders:
    def test_upstream_hop_by_hop_fields_are_removed(self) -> None:
        """Transfer-Encoding, Connection and the fields it names never reach the app."""
        headers = [
            (b"Content-Type", b"text/plain"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"keep-alive, X-Internal"),
            (b"X-Internal", b"secret"),
            (b"Set-Cookie", b"a=1"),
        ]
        expected = [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1")]
        assert expected == response_headers(headers)

    @given(st.lists(header, max_size=8))
    def test_end_to_end_fields_pass_untouched(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Without hop-by-hop fields the response headers are returned exactly."""
        clean = [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP]
        assert clean == response_headers(clean)

    def test_serialize_writes_header_lines(self) -> None:
        """Each pair becomes `Name: value` and CRLF."""
        assert b"A: 1\r\nB: \r\n" == serialize([(b"A", b"1"), (b"B", b"")])


class TestRouteTarget:
    def test_invoke_path_names_upstream_and_rewrites_path(self) -> None:
        """/v1/invoke/Billing/a/b?q=1 → (billing, /a/b?q=1)."""
        assert (b"billing", b"/a/b?q=1") == route_target(b"/v1/invoke/Billing/a/b?q=1")

    def test_invoke_without_path_goes_to_root(self) -> None:
        """/v1/invoke/billing and /v1/invoke/billing?x both forward to the root path."""
        assert (b"billing", b"/") == route_target(b"/v1/invoke/billing")
        assert (b"billing", b"/?x") == route_target(b"/v1/invoke/billing?x")

    def test_absolute_form_names_upstream_by_host(self) -> None:
        """http://billing:8080/a?q → (billing, /a?q); no path → /."""
        assert (b"billing", b"/a?q") == route_target(b"http://billing:8080/a?q")
        assert (b"billing", b"/") == route_target(b"HTTP://BILLING")

    def test_ws_absolute_form_names_upstream_by_host(self) -> None:
        """A WebSocket client in proxy mode (aiohttp) sends `ws://billing/ws`: routed like
        http://; other schemes are not absolute-form routes."""
        assert (b"billing", b"/ws") == route_target(b"ws://billing/ws")
        assert (None, b"wss://billing/ws") == route_target(b"wss://billing/ws")

    def test_origin_form_is_left_to_host_routing(self) -> None:
        """An ordinary path names no upstream."""
        assert (None, b"/invoices/1") == route_target(b"/invoices/1")

    @given(upstream_name, st.lists(segment, max_size=4), st.none() | segment)
    def test_invoke_round_trip(
        self, name: bytes, segments: list[bytes], query: bytes | None
    ) -> None:
        """For any name, path and query, the invoke form yields that name and the path+query."""
        path = b"/" + b"/".join(segments)
        tail = path + (b"?" + query if query is not None else b"")
        assert (name, tail) == route_target(b"/v1/invoke/" + name + tail)

    @given(upstream_name, st.none() | st.integers(1, 65535), st.lists(segment, max_size=3))
    def test_absolute_form_round_trip(
        self, name: bytes, port: int | None, segments: list[bytes]
    ) -> None:
        """http://name[:port]/path routes to name with the path kept."""
        authority = name + (b":%d" % port if port else b"")
        path = b"/" + b"/".join(segments)
        assert (name, path) == route_target(b"http://" + authority + path)


class TestHostName:
    def test_port_case_and_userinfo_are_dropped(self) -> None:
        """`User@Billing:80` → billing; IPv6 literals keep their brackets."""
        assert b"billing" == host_name(b"User@Billing:80")
        assert b"[::1]" == host_name(b"[::1]:4001")
        assert b"billing" == host_name(b" billing ")
