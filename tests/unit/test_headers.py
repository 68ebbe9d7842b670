"""Header hygiene and request-target routing (pure functions of sidecar.proxy.headers)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.proxy import headers as headers_module
from sidecar.proxy.headers import (
    HOP_BY_HOP,
    PROTECTED,
    absolute_target,
    host_name,
    lowered,
    rechunked_encoding,
    request_head,
    request_headers,
    response_fields,
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


# -- request_head and response_fields: the one-pass forms of the compositions above ----------


def composed_request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    client_ip: bytes,
    *,
    host: bytes | None,
    replace_host: bool,
    traceparent: bytes | None,
    tracestate: str,
    chunked: bool,
    upgrade: bool,
) -> bytes:
    """The head `Exchange._request_head` composed before `request_head`: its specification."""
    fields = request_headers(
        headers, client_ip, host, replace_host, traceparent=traceparent, tracestate=tracestate
    )
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b""
    if upgrade:
        framing += b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    return b"%s %s HTTP/1.1\r\n%s%s\r\n" % (method, target, serialize(fields), framing)


def composed_response_fields(headers: list[tuple[bytes, bytes]], rechunk: bool) -> bytes:
    """The field lines `Exchange.on_response_head` composed before `response_fields`."""
    return serialize(response_headers(headers)) + (rechunked_encoding(headers) if rechunk else b"")


#: Every combination of request_head's options, Exchange's three call shapes among them.
REQUEST_OPTIONS: list[dict[str, Any]] = [
    {
        "host": host,
        "replace_host": replace_host,
        "traceparent": traceparent,
        "tracestate": tracestate,
        "chunked": chunked,
        "upgrade": upgrade,
    }
    for host, replace_host, traceparent, tracestate, chunked, upgrade in itertools.product(
        (None, b"billing:8080"),
        (False, True),
        (None, b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("", "vendor=opaque,other@x=1"),
        (False, True),
        (False, True),
    )
]

TRICKY_REQUESTS: dict[str, list[tuple[bytes, bytes]]] = {
    "empty": [],
    "typical": [(b"Host", b"billing"), (b"User-Agent", b"curl/8"), (b"Accept", b"*/*")],
    "two hosts": [(b"HOST", b"a"), (b"Accept", b"*/*"), (b"host", b"b")],
    "connection names a field": [(b"Connection", b"close, X-Hop"), (b"X-Hop", b"1")],
    "connection after the field it names": [(b"x-hop", b"1"), (b"CONNECTION", b"X-HOP")],
    "connection names protected fields": [
        (b"Host", b"h"),
        (b"Connection", b"Content-Length, HOST, x-hop"),
        (b"content-length", b"3"),
        (b"X-Hop", b"1"),
    ],
    "duplicate connection fields": [
        (b"Connection", b"x-a"),
        (b"X-A", b"1"),
        (b"X-B", b"2"),
        (b"connection", b"X-b"),
        (b"X-C", b"3"),
    ],
    "spaces, tabs and empty tokens": [
        (b"Connection", b"  X-Hop ,, ,\tkeep-alive , "),
        (b"x-hop", b"1"),
        (b"X-Hop2", b"2"),
    ],
    "empty connection value": [(b"Connection", b""), (b"Accept", b"*/*")],
    "connection close and a field called close": [
        (b"Connection", b"Close"),
        (b"CLOSE", b"x"),
        (b"Accept", b"*/*"),
    ],
    "a field called close alone": [(b"Close", b"x"), (b"Accept", b"*/*")],
    "keep-alive and upgrade": [
        (b"Connection", b"keep-alive, Upgrade"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    ],
    "connection names x-forwarded-for": [
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"Connection", b"x-forwarded-for"),
    ],
    "connection names the trace context": [
        (b"traceparent", b"00-app-01"),
        (b"TraceState", b"app=1"),
        (b"Connection", b"Traceparent, tracestate"),
    ],
    "connection names expect and te": [
        (b"Expect", b"100-continue"),
        (b"TE", b"trailers"),
        (b"Connection", b"te, EXPECT"),
    ],
    "forwarded-for, several and empty": [
        (b"X-Forwarded-For", b"a"),
        (b"x-forwarded-for", b""),
        (b"X-FORWARDED-FOR", b"b, c"),
    ],
    "app trace context": [(b"Traceparent", b"00-app-01"), (b"tracestate", b"app=1")],
    "expect": [(b"Expect", b"100-continue"), (b"Content-Length", b"3")],
    "every hop-by-hop field in odd case": [(n.title(), b"x") for n in sorted(HOP_BY_HOP)]
    + [(b"Accept", b"*/*")],
    "proxy credentials": [(b"Proxy-Authorization", b"Basic eDp5"), (b"Host", b"h")],
    "bytes beyond ascii": [(b"X-\xc4", b"\xe9t\xe9"), (b"Host", b"h\xff")],
    "a name with a trailing space": [(b"X-Hop ", b"1"), (b"Connection", b"x-hop")],
}

TRICKY_RESPONSES: dict[str, list[tuple[bytes, bytes]]] = {
    "empty": [],
    "typical": [
        (b"Server", b"gunicorn"),
        (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"42"),
    ],
    "keep-alive": [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5")],
    "close": [(b"Connection", b"close"), (b"Content-Type", b"text/plain")],
    "close and a field called close": [(b"close", b"x"), (b"Connection", b"CLOSE")],
    "connection names fields": [
        (b"Connection", b"X-Internal, content-length"),
        (b"X-Internal", b"secret"),
        (b"Content-Length", b"5"),
    ],
    "connection names transfer-encoding": [
        (b"Transfer-Encoding", b"gzip"),
        (b"Connection", b"transfer-encoding, x-a"),
    ],
    "chunked": [(b"Transfer-Encoding", b"chunked")],
    "chunked in odd case with spaces": [(b"transfer-encoding", b"  Chunked  ")],
    "gzip, chunked": [(b"TRANSFER-ENCODING", b"gzip, chunked")],
    "chunked, gzip": [(b"Transfer-Encoding", b"chunked, gzip")],
    "two transfer-encodings": [
        (b"Transfer-Encoding", b"gzip"),
        (b"Transfer-Encoding", b"chunked"),
    ],
    "empty transfer-encoding": [(b"Transfer-Encoding", b"")],
    "proxy credentials": [(b"Proxy-Authenticate", b'Basic realm="x"'), (b"Vary", b"*")],
}

#: Names the random header lists draw from: every name the rules single out, look-alikes,
#: and ordinary ones.
NAME_POOL = [
    *sorted(HOP_BY_HOP),
    b"expect",
    b"host",
    b"content-length",
    b"x-forwarded-for",
    b"traceparent",
    b"tracestate",
    b"close",
    b"x-hop",
    b"x-hop ",
    b"accept",
    b"user-agent",
    b"content-type",
    b"",
]
TOKEN_POOL = [*NAME_POOL, b"close", b"keep-alive", b"x-a", b"x-b"]
VALUE_POOL = [b"", b"x", b" 1 ", b"a, b", b"\t", b"gzip", b"chunked", b"gzip, chunked", b"\xe9"]


def mixed_case(rng: random.Random, name: bytes) -> bytes:
    return bytes(c ^ 0x20 if 97 <= c <= 122 and rng.random() < 0.5 else c for c in name)


def connection_value(rng: random.Random) -> bytes:
    """A Connection value: random tokens in any case, padded, with empty ones between."""
    tokens = [mixed_case(rng, rng.choice(TOKEN_POOL)) for _ in range(rng.randint(0, 4))]
    padded = [rng.choice((b"", b" ", b"\t")) + t + rng.choice((b"", b" ")) for t in tokens]
    return rng.choice((b",", b", ", b" ,", b",,")).join(padded)


def random_headers(rng: random.Random) -> list[tuple[bytes, bytes]]:
    headers = []
    for _ in range(rng.randint(0, 8)):
        name = rng.choice(NAME_POOL)
        value = connection_value(rng) if name == b"connection" else rng.choice(VALUE_POOL)
        headers.append((mixed_case(rng, name), value))
    return headers


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[object]:
    """Record each call of sidecar.proxy.headers' function `name` (still run)."""
    real = getattr(headers_module, name)
    calls: list[object] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(headers_module, name, recording)
    return calls


class TestRequestHead:
    @pytest.mark.parametrize("headers", TRICKY_REQUESTS.values(), ids=TRICKY_REQUESTS.keys())
    def test_tricky_cases_match_the_composition(self, headers: list[tuple[bytes, bytes]]) -> None:
        """For each tricky field list and every option, request_head writes exactly the
        head that request_headers, serialize and the framing lines compose."""
        for options in REQUEST_OPTIONS:
            expected = composed_request_head(b"GET", b"/a?b", headers, b"10.1.2.3", **options)
            assert expected == request_head(b"GET", b"/a?b", headers, b"10.1.2.3", **options)

    def test_random_field_lists_match_the_composition(self) -> None:
        """Thousands of random field lists (hop-by-hop names in any case, Connection
        listing any of them, padded and empty tokens), each with random options, give the
        composed head byte for byte."""
        rng = random.Random(20240611)
        for _ in range(4000):
            headers = random_headers(rng)
            options = rng.choice(REQUEST_OPTIONS)
            method = rng.choice((b"GET", b"POST", b"OPTIONS"))
            expected = composed_request_head(method, b"/x", headers, b"::1", **options)
            assert expected == request_head(method, b"/x", headers, b"::1", **options), headers

    def test_usual_connection_tokens_stay_on_the_single_pass(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`Connection: keep-alive`, `upgrade` or `close` (the tokens clients send) do not
        fall back to the composition; a token naming a field that may be kept does."""
        calls = spy(monkeypatch, "request_headers")
        for tokens in (b"keep-alive", b"Upgrade", b"close", b" Keep-Alive ,, close ,"):
            headers = [(b"Host", b"h"), (b"Connection", tokens), (b"Accept", b"*/*")]
            request_head(b"GET", b"/", headers, b"ip", **REQUEST_OPTIONS[0])
        assert 0 == len(calls)
        request_head(b"GET", b"/", [(b"Connection", b"x-hop")], b"ip", **REQUEST_OPTIONS[0])
        assert 1 == len(calls)


class TestResponseFields:
    @pytest.mark.parametrize("rechunk", [False, True])
    @pytest.mark.parametrize("headers", TRICKY_RESPONSES.values(), ids=TRICKY_RESPONSES.keys())
    def test_tricky_cases_match_the_composition(
        self, headers: list[tuple[bytes, bytes]], rechunk: bool
    ) -> None:
        """response_fields writes exactly serialize(response_headers(...)) followed, when
        re-chunking, by rechunked_encoding(...)."""
        assert composed_response_fields(headers, rechunk) == response_fields(headers, rechunk)

    def test_random_field_lists_match_the_composition(self) -> None:
        """Thousands of random field lists give the composed lines byte for byte, both
        with and without re-chunking."""
        rng = random.Random(20240612)
        for _ in range(4000):
            headers = random_headers(rng)
            for rechunk in (False, True):
                expected = composed_response_fields(headers, rechunk)
                assert expected == response_fields(headers, rechunk), headers

    def test_usual_connection_tokens_stay_on_the_single_pass(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An upstream's `Connection: keep-alive` or `close` does not fall back to the
        composition; a token naming a field that may be kept does."""
        calls = spy(monkeypatch, "response_headers")
        for tokens in (b"keep-alive", b"close"):
            response_fields([(b"Connection", tokens), (b"Content-Length", b"0")], True)
        assert 0 == len(calls)
        response_fields([(b"Connection", b"x-internal")], False)
        assert 1 == len(calls)


class TestLowered:
    def test_every_spelling_looked_up_is_its_lower_case(self) -> None:
        """The names and tokens looked up instead of lower-cased map to `lower()`'s result,
        in their usual spellings: as they are, capitalized by word, in capitals."""
        table = headers_module._LOWER
        assert all(spelling.lower() == name for spelling, name in table.items())
        for name in (b"connection", b"keep-alive", b"host", b"content-length", b"close"):
            title = b"-".join(word.capitalize() for word in name.split(b"-"))
            for spelling in (name, title, name.upper()):
                assert lowered(spelling) is table[spelling]  # looked up, not made anew

    @given(st.binary(max_size=24), st.sampled_from([bytes.lower, bytes.upper, bytes.title]))
    def test_any_bytes_come_out_as_lower_makes_them(self, data: bytes, case: Any) -> None:
        spelled = case(data)
        assert spelled.lower() == lowered(spelled)

    @pytest.mark.parametrize("length", [1, 19, 20, 63, 64, 65, 200, 5000])
    def test_names_of_any_length_are_copied_by_the_single_pass(self, length: int) -> None:
        """A field name's length is tested against the special names' lengths as a bit
        of an integer: a long name (past the integer's width) is copied like any other,
        and one as long as a special name is still compared."""
        for name in (b"x" * length, b"X-" + b"a" * max(length - 2, 0)):
            headers = [(b"Host", b"h"), (name, b"v"), (b"Connection", b"keep-alive")]
            options = REQUEST_OPTIONS[0]
            expected = composed_request_head(b"GET", b"/", headers, b"ip", **options)
            assert expected == request_head(b"GET", b"/", headers, b"ip", **options)
            assert composed_response_fields(headers, True) == response_fields(headers, True)
