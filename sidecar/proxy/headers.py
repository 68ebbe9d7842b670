"""Header hygiene for one proxied hop (RFC 9110 §7.6.1) and request-target routing.

Pure functions over raw `(name, value)` byte pairs, so they are cheap on the hot
path and easy to test exhaustively.
"""

from __future__ import annotations

from typing import Final

Headers = list[tuple[bytes, bytes]]

#: Removed on every hop, both ways: RFC 9110 §7.6.1's list plus the proxy credentials
#: (§11.7: `Proxy-Authorization` is for the proxy it was sent to, `Proxy-Authenticate`
#: for the client of the proxy that sent it) - the set Go's httputil.ReverseProxy
#: removes. `TE` and `Trailer` go too: the sidecar does not forward trailers. A
#: WebSocket handshake's `Connection: Upgrade` and `Upgrade: websocket` are written
#: again by the proxy, which alone knows the request is tunnelled.
HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: The sidecar answers `Expect: 100-continue` itself, so it is not forwarded.
_REQUEST_ONLY_DROP: Final[frozenset[bytes]] = HOP_BY_HOP | {b"expect"}

#: Never removed because `Connection` names them: without `Content-Length` the next
#: hop would read the body as the next message (request smuggling, or an app waiting
#: for a close that never comes), and without `Host` it could not route.
PROTECTED: Final[frozenset[bytes]] = frozenset({b"content-length", b"host"})


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def _strip(headers: Headers, drop: frozenset[bytes]) -> Headers:
    """`headers` without the names in `drop` and without the fields `Connection` lists."""
    out: Headers = []
    listed: set[bytes] = set()
    for name, value in headers:
        lname = name.lower()
        if lname in drop:
            if lname == b"connection":
                listed |= _tokens(value)
            continue
        out.append((name, value))
    listed -= PROTECTED
    if listed:
        out = [(n, v) for n, v in out if n.lower() not in listed]
    return out


_TRACE_CONTEXT: Final = frozenset((b"traceparent", b"tracestate"))


def request_headers(
    headers: Headers,
    client_ip: bytes,
    host: bytes | None = None,
    replace_host: bool = False,
    *,
    traceparent: bytes | None = None,
    tracestate: str = "",
) -> Headers:
    """Headers to send upstream: hop-by-hop removed, `X-Forwarded-For` appended.

    Framing (`Content-Length` stays; `Transfer-Encoding` is re-added by the caller
    when the body is chunked) and everything end-to-end is kept in order; the
    X-Forwarded-For fields become one, last. When the app sent no `Host` (HTTP/1.0,
    or a bare `/v1/invoke/...` call), `host` is added first: HTTP/1.1 requires one,
    and upstreams answer 400 without it. With `replace_host` (an absolute-form
    target, RFC 9112 §3.2.2) the app's `Host` is dropped and `host` takes its place.
    With `traceparent` (tracing on), the app's trace context fields are replaced by
    that one and `tracestate` (empty: none).
    """
    out: Headers = []
    xff = b""
    has_host = False
    for name, value in _strip(headers, _REQUEST_ONLY_DROP):
        lname = name.lower()
        if traceparent is not None and lname in _TRACE_CONTEXT:
            continue  # replaced below
        if lname == b"x-forwarded-for":
            xff += value + b", "
            continue
        if lname == b"host":
            if replace_host:
                continue
            has_host = True
        out.append((name, value))
    if host is not None and not has_host:
        out.insert(0, (b"Host", host))
    out.append((b"X-Forwarded-For", xff + client_ip))
    if traceparent is not None:
        out.append((b"traceparent", traceparent))
        if tracestate:
            out.append((b"tracestate", tracestate.encode("latin-1")))
    return out


def response_headers(headers: Headers) -> Headers:
    """Headers to send back to the app: hop-by-hop removed, the rest untouched."""
    return _strip(headers, HOP_BY_HOP)


def rechunked_encoding(headers: Headers) -> bytes:
    """The `Transfer-Encoding` line for a response re-chunked toward the app.

    Only a final `chunked` is undone on the way in; any other coding (gzip, ...) is
    still on the relayed bytes, so it is named again, with chunked last.
    """
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            return _rechunked_line(value)
    return _rechunked_line(None)


def serialize(headers: Headers) -> bytes:
    """`Name: value\\r\\n` lines for a message head."""
    return b"".join([b"%s: %s\r\n" % pair for pair in headers])


# -- The hot path: one pass from the parsed fields to the wire ------------------------------
#
# `request_head` and `response_fields` give exactly the bytes of the compositions above
# (`request_headers` / `response_headers` + `rechunked_encoding`, then `serialize`), which
# stay as the readable specification the tests hold them to. They lower-case a name
# only when its length is that of a name they treat specially, and write `Name:
# value\r\n` pieces straight into one list, joined once: no intermediate pair lists,
# no set per message.
#
# `Connection` is the one field that makes a field's fate depend on another, maybe later,
# one. Its usual tokens (`keep-alive`, `upgrade`) name fields dropped anyway and those
# messages stay on the single pass; a token naming a field that might be kept sends the
# message down the old composition instead. `close` would be such a token, and a common
# one, yet no real field is called that: it counts as harmless, and a field that is
# called `close` falls back on its own. That check sits on the branch special names
# already take, so the ordinary field pays nothing for it.

#: `Connection` tokens that change nothing in a request: fields already dropped, fields
#: that are never removed, and `close` (see above).
_REQUEST_HARMLESS: Final[frozenset[bytes]] = _REQUEST_ONLY_DROP | PROTECTED | {b"close"}
_RESPONSE_HARMLESS: Final[frozenset[bytes]] = HOP_BY_HOP | PROTECTED | {b"close"}

#: Every request field name the single pass treats specially; any other is copied as it
#: is, after a check of its length (below) or one set lookup.
_REQUEST_SPECIAL: Final[frozenset[bytes]] = (
    _REQUEST_ONLY_DROP | _TRACE_CONTEXT | {b"close", b"host", b"x-forwarded-for"}
)
_RESPONSE_SPECIAL: Final[frozenset[bytes]] = HOP_BY_HOP | {b"close"}
#: Their lengths, as bits (`1 << length`): a field whose name has none of them is copied
#: without lower-casing its name or looking it up (most fields: `Date`, `Server`,
#: `Content-Type`, ...). A shift and a mask, compiled, where a set of lengths boxed the
#: length and looked it up (docs/performance.md, "An eleventh machine").
_REQUEST_LENGTH_BITS: Final[int] = sum({1 << len(n) for n in _REQUEST_SPECIAL})
_RESPONSE_LENGTH_BITS: Final[int] = sum({1 << len(n) for n in _RESPONSE_SPECIAL})


def _spellings(name: bytes) -> tuple[bytes, ...]:
    """`name` (lower case) as it is usually written: as it is, each word capitalized
    (`Keep-Alive`), in capitals (`TE`)."""
    return (name, b"-".join(word.capitalize() for word in name.split(b"-")), name.upper())


#: The usual spellings of the names the single pass treats specially, of the
#: `Connection` tokens it takes as they are, and of the request fields the server reads
#: (`DownstreamProtocol.on_headers_complete`), each mapped to its lower case: one lookup
#: instead of `lower()`, a method call that makes a new object whose hash the set lookups
#: after it compute again. Any other spelling is lower-cased as before.
_LOWER: Final[dict[bytes, bytes]] = {
    spelling: name
    for name in (
        _REQUEST_SPECIAL
        | _RESPONSE_SPECIAL
        | _REQUEST_HARMLESS
        | _RESPONSE_HARMLESS
        | {b"idempotency-key"}
    )
    for spelling in _spellings(name)
}


def lowered(value: bytes) -> bytes:
    """`value.lower()`, looked up when it is one of `_LOWER`'s spellings."""
    lower = _LOWER.get(value)
    return value.lower() if lower is None else lower


_CHUNKED_FRAMING: Final = b"Transfer-Encoding: chunked\r\n"
#: Written again by the proxy for a tunnelled WebSocket handshake (the app's copies are
#: hop-by-hop and dropped).
UPGRADE_WEBSOCKET: Final = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"


def request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    client_ip: bytes,
    *,
    host: bytes | None,
    replace_host: bool,
    traceparent: bytes | None,
    tracestate: str,
    chunked: bool,
    upgrade: bool,
) -> bytes:
    """The upstream request head, in one pass: the bytes of

        b"%s %s HTTP/1.1\\r\\n%s%s\\r\\n" % (method, target, serialize(request_headers(
            headers, client_ip, host, replace_host, traceparent=..., tracestate=...)), framing)

    where framing is `Transfer-Encoding: chunked` when `chunked`, then `Connection:
    Upgrade` and `Upgrade: websocket` when `upgrade`. See `request_headers` for the rules.
    """
    replace_trace = traceparent is not None
    # parts[4] is the slot for a Host line, filled at the end if the app sent none.
    parts = [method, b" ", target, b" HTTP/1.1\r\n", b""]
    xff = b""
    has_host = False
    for name, value in headers:
        special = (_REQUEST_LENGTH_BITS >> len(name)) & 1
        if special and (lname := lowered(name)) in _REQUEST_SPECIAL:
            if lname in _REQUEST_ONLY_DROP:
                # A lone token (`keep-alive`) is looked up as it is, without _tokens' set.
                if lname == b"connection" and not (
                    lowered(value) in _REQUEST_HARMLESS or _tokens(value) <= _REQUEST_HARMLESS
                ):
                    break  # it may name a field already written: fall back, below
                continue
            if lname == b"host":
                if replace_host:
                    continue
                has_host = True
            elif lname == b"x-forwarded-for":
                xff += value + b", "
                continue
            elif lname == b"close":
                break  # `Connection: close` would remove it: fall back, below
            elif replace_trace:
                continue  # traceparent or tracestate, replaced below
        # Four appends beat one extend by a tuple (which builds the tuple first),
        # `b"%s: %s\r\n" %`, concatenation and a bytearray: compiled, nginx's eight
        # response fields took 616 ns this way and 742 ns by a tuple; plain 3.11, 804
        # and 953 ns (docs/performance.md).
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    else:  # no break: the single pass stands
        if host is not None and not has_host:
            parts[4] = b"Host: " + host + b"\r\n"
        parts += (b"X-Forwarded-For: ", xff, client_ip, b"\r\n")
        if traceparent is not None:
            parts += (b"traceparent: ", traceparent, b"\r\n")
            if tracestate:
                parts += (b"tracestate: ", tracestate.encode("latin-1"), b"\r\n")
        if chunked:
            parts.append(_CHUNKED_FRAMING)
        if upgrade:
            parts.append(UPGRADE_WEBSOCKET)
        parts.append(b"\r\n")
        return b"".join(parts)
    # Connection may remove a kept field: the composition this function stands for.
    fields = request_headers(
        headers, client_ip, host, replace_host, traceparent=traceparent, tracestate=tracestate
    )
    framing = _CHUNKED_FRAMING if chunked else b""
    if upgrade:
        framing += UPGRADE_WEBSOCKET
    return b"%s %s HTTP/1.1\r\n%s%s\r\n" % (method, target, serialize(fields), framing)


def response_fields(headers: Headers, rechunk: bool) -> bytes:
    """The response's field lines for the app, in one pass: the bytes of
    `serialize(response_headers(headers))`, then `rechunked_encoding(headers)` when
    `rechunk` (the body is re-chunked toward an HTTP/1.1 app).

    The caller adds the status line, its own `Connection` field and the final CRLF.
    """
    parts: list[bytes] = []
    codings: bytes | None = None  # the first Transfer-Encoding, as rechunked_encoding reads
    for name, value in headers:
        special = (_RESPONSE_LENGTH_BITS >> len(name)) & 1
        if special and (lname := lowered(name)) in _RESPONSE_SPECIAL:
            if lname == b"transfer-encoding":
                if codings is None:
                    codings = value
            elif lname == b"connection":
                if not (
                    lowered(value) in _RESPONSE_HARMLESS or _tokens(value) <= _RESPONSE_HARMLESS
                ):
                    break  # as in request_head: fall back, below
            elif lname == b"close":
                break
            continue
        parts.append(name)  # as in request_head
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    else:  # no break: the single pass stands
        if rechunk:
            parts.append(_rechunked_line(codings))
        return b"".join(parts)
    fields = serialize(response_headers(headers))
    return fields + rechunked_encoding(headers) if rechunk else fields


def _rechunked_line(codings: bytes | None) -> bytes:
    """`rechunked_encoding` given the first `Transfer-Encoding` value (None: there is none)."""
    if codings is None:
        return _CHUNKED_FRAMING
    codings = codings.strip()
    if codings.rpartition(b",")[2].strip().lower() == b"chunked":
        if codings.lower() == b"chunked":
            return _CHUNKED_FRAMING
        return b"Transfer-Encoding: %s\r\n" % codings
    return b"Transfer-Encoding: %s, chunked\r\n" % codings


INVOKE_PREFIX: Final = b"/v1/invoke/"


def _split(rest: bytes, separators: bytes) -> tuple[bytes, bytes]:
    """Cut `rest` at the first of `separators`; the tail always starts with `/`."""
    cut = len(rest)
    for sep in separators:
        i = rest.find(sep)
        if i != -1 and i < cut:
            cut = i
    head, tail = rest[:cut], rest[cut:]
    return head, tail if tail.startswith(b"/") else b"/" + tail


def scheme_length(target: bytes) -> int:
    """The length of an absolute-form target's `http://` or `ws://` prefix, else 0.

    HTTP_PROXY clients send `http://billing/x`; a WebSocket client in proxy mode
    (aiohttp's) sends its handshake as `ws://billing/x`.
    """
    start = target[:7].lower()
    if start == b"http://":
        return 7
    if start[:5] == b"ws://":
        return 5
    return 0


def route_target(target: bytes) -> tuple[bytes | None, bytes]:
    """Split a request-target into (upstream name or None, origin-form target to forward).

    `/v1/invoke/billing/a/b?q` → (b"billing", b"/a/b?q"); `http://billing:80/a?q` or
    `ws://billing:80/a?q` → (b"billing", b"/a?q"); any other origin-form target →
    (None, target), routed by the Host header. A name is returned lower-cased; an
    empty name is `b""`.
    """
    if target.startswith(INVOKE_PREFIX):
        name, tail = _split(target[len(INVOKE_PREFIX) :], b"/?")
        return name.lower(), tail
    skip = scheme_length(target)
    if skip:
        authority, tail = _split(target[skip:], b"/?#")
        return host_name(authority), tail
    return None, target


def absolute_target(target: bytes) -> tuple[bytes, bytes]:
    """The authority (userinfo dropped) and the origin-form of an absolute-form target.

    `http://user@billing:8080/a?q` → (b"billing:8080", b"/a?q"). The origin-form is
    `b""` when the target has neither path nor query (`http://billing`): RFC 9112
    §3.2.4 makes that `*` for OPTIONS and `/` for everything else.
    """
    skip = scheme_length(target)
    authority, tail = _split(target[skip:], b"/?#")
    if tail == b"/" and len(target) == skip + len(authority):
        tail = b""
    return authority.rpartition(b"@")[2], tail


def websocket_upgrade(headers: Headers) -> bool:
    """Whether a request that asks to upgrade (Connection: upgrade + Upgrade) asks for
    WebSocket, the one protocol the sidecar tunnels."""
    for name, value in headers:
        if name.lower() == b"upgrade" and b"websocket" in _tokens(value):
            return True
    return False


def host_name(authority: bytes) -> bytes:
    """The lower-cased host of a `Host` value or URI authority, without port or userinfo."""
    authority = authority.rpartition(b"@")[2].strip()
    if authority.startswith(b"["):
        return authority[: authority.find(b"]") + 1].lower()
    return authority.partition(b":")[0].lower()
