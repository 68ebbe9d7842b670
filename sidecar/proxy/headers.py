"""Header hygiene for one proxied hop (RFC 9110 §7.6.1) and request-target routing.

Pure functions over raw `(name, value)` byte pairs, so they are cheap on the hot
path and easy to test exhaustively.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

#: Removed on every hop. `Trailer` goes too: the sidecar does not forward trailers.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
    }
)

#: The sidecar answers `Expect: 100-continue` itself, so it is not forwarded.
_REQUEST_ONLY_DROP: frozenset[bytes] = HOP_BY_HOP | {b"expect"}


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Lower-cased field names listed in every `Connection` header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _filtered(headers: Headers, drop: frozenset[bytes]) -> tuple[Headers, bytes | None]:
    """Drop `drop` and whatever `Connection` names; also return any X-Forwarded-For value."""
    out: Headers = []
    listed: frozenset[bytes] | None = None
    xff: bytes | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in drop:
            if lname == b"connection":
                listed = (listed or frozenset()) | frozenset(
                    t.strip().lower() for t in value.split(b",") if t.strip()
                )
            continue
        if lname == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        out.append((name, value))
    if listed:
        out = [(n, v) for n, v in out if n.lower() not in listed]
        if xff is not None and b"x-forwarded-for" in listed:
            xff = None
    return out, xff


def request_headers(headers: Headers, client_ip: bytes) -> Headers:
    """Headers to send upstream: hop-by-hop removed, `X-Forwarded-For` appended.

    Framing (`Content-Length` stays; `Transfer-Encoding` is re-added by the caller
    when the body is chunked) and everything end-to-end is kept in order.
    """
    out, xff = _filtered(headers, _REQUEST_ONLY_DROP)
    out.append((b"X-Forwarded-For", client_ip if xff is None else xff + b", " + client_ip))
    return out


def response_headers(headers: Headers) -> Headers:
    """Headers to send back to the app: hop-by-hop removed, the rest untouched."""
    out: Headers = []
    listed: set[bytes] = set()
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                listed.update(t.strip().lower() for t in value.split(b",") if t.strip())
            continue
        out.append((name, value))
    if listed:
        out = [(n, v) for n, v in out if n.lower() not in listed]
    return out


def serialize(headers: Headers) -> bytes:
    """`Name: value\\r\\n` lines for a message head."""
    return b"".join([b"%s: %s\r\n" % pair for pair in headers])


INVOKE_PREFIX = b"/v1/invoke/"


def route_target(target: bytes) -> tuple[bytes | None, bytes]:
    """Split a request-target into (upstream name or None, origin-form target to forward).

    `/v1/invoke/billing/a/b?q` → (b"billing", b"/a/b?q"); `http://billing:80/a?q` →
    (b"billing", b"/a?q"); any other origin-form target → (None, target), routed
    by the Host header. A name is returned lower-cased; an empty name is `b""`.
    """
    if target.startswith(INVOKE_PREFIX):
        rest = target[len(INVOKE_PREFIX) :]
        cut = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if i != -1 and i < cut:
                cut = i
        name, tail = rest[:cut], rest[cut:]
        if not tail.startswith(b"/"):
            tail = b"/" + tail
        return name.lower(), tail
    if target[:7].lower() == b"http://":
        rest = target[7:]
        cut = len(rest)
        for sep in (b"/", b"?", b"#"):
            i = rest.find(sep)
            if i != -1 and i < cut:
                cut = i
        authority, tail = rest[:cut], rest[cut:]
        if not tail.startswith(b"/"):
            tail = b"/" + tail
        return host_name(authority), tail
    return None, target


def host_name(authority: bytes) -> bytes:
    """The lower-cased host of a `Host` value or URI authority, without port or userinfo."""
    authority = authority.rpartition(b"@")[2].strip()
    if authority.startswith(b"["):
        return authority[: authority.find(b"]") + 1].lower()
    return authority.partition(b":")[0].lower()
