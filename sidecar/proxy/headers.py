"""Header hygiene for one proxied hop (RFC 9110 §7.6.1) and request-target routing.

Pure functions over raw `(name, value)` byte pairs, so they are cheap on the hot
path and easy to test exhaustively.
"""

from __future__ import annotations

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
    if listed:
        out = [(n, v) for n, v in out if n.lower() not in listed]
    return out


def request_headers(headers: Headers, client_ip: bytes) -> Headers:
    """Headers to send upstream: hop-by-hop removed, `X-Forwarded-For` appended.

    Framing (`Content-Length` stays; `Transfer-Encoding` is re-added by the caller
    when the body is chunked) and everything end-to-end is kept in order; the
    X-Forwarded-For fields become one, last.
    """
    out: Headers = []
    xff = b""
    for name, value in _strip(headers, _REQUEST_ONLY_DROP):
        if name.lower() == b"x-forwarded-for":
            xff += value + b", "
        else:
            out.append((name, value))
    out.append((b"X-Forwarded-For", xff + client_ip))
    return out


def response_headers(headers: Headers) -> Headers:
    """Headers to send back to the app: hop-by-hop removed, the rest untouched."""
    return _strip(headers, HOP_BY_HOP)


def serialize(headers: Headers) -> bytes:
    """`Name: value\\r\\n` lines for a message head."""
    return b"".join([b"%s: %s\r\n" % pair for pair in headers])


INVOKE_PREFIX = b"/v1/invoke/"


def _split(rest: bytes, separators: bytes) -> tuple[bytes, bytes]:
    """Cut `rest` at the first of `separators`; the tail always starts with `/`."""
    cut = len(rest)
    for sep in separators:
        i = rest.find(sep)
        if i != -1 and i < cut:
            cut = i
    head, tail = rest[:cut], rest[cut:]
    return head, tail if tail.startswith(b"/") else b"/" + tail


def route_target(target: bytes) -> tuple[bytes | None, bytes]:
    """Split a request-target into (upstream name or None, origin-form target to forward).

    `/v1/invoke/billing/a/b?q` → (b"billing", b"/a/b?q"); `http://billing:80/a?q` →
    (b"billing", b"/a?q"); any other origin-form target → (None, target), routed
    by the Host header. A name is returned lower-cased; an empty name is `b""`.
    """
    if target.startswith(INVOKE_PREFIX):
        name, tail = _split(target[len(INVOKE_PREFIX) :], b"/?")
        return name.lower(), tail
    if target[:7].lower() == b"http://":
        authority, tail = _split(target[7:], b"/?#")
        return host_name(authority), tail
    return None, target


def host_name(authority: bytes) -> bytes:
    """The lower-cased host of a `Host` value or URI authority, without port or userinfo."""
    authority = authority.rpartition(b"@")[2].strip()
    if authority.startswith(b"["):
        return authority[: authority.find(b"]") + 1].lower()
    return authority.partition(b":")[0].lower()
