"""A small HTTP/1.1 client for one origin: kept-alive connections, TLS, whole answers.

The Consul client's transport. aiohttp's client did this before and cost about 8 MB of
the sidecar's resident memory (aiohttp, yarl, multidict and what they import) for
calls that need none of its features: every answer is small and read whole, there is
one origin, and the caller bounds each call with its own timeout (`asyncio.timeout`
around `request`; a cancelled request closes its connection, never pools it).

Connections are reused last-in first-out and dropped after `idle_timeout`. A request
on a reused connection that the server had closed (EOF before any byte of an answer)
is sent once more on a new one, as HTTP clients do for a kept-alive connection the
peer timed out. Parsing is httptools' (llhttp), as everywhere else in the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

import httptools

from sidecar import __version__
from sidecar.discovery.health import os_reason

#: Read size per `read` call.
_CHUNK = 64 * 1024


class HTTPClientError(Exception):
    """A request that got no complete answer; the message says why in an operator's words."""


class Headers(dict[str, str]):
    """Response headers by lower-cased name, looked up in any case; repeats joined by ", "."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)


class Response(NamedTuple):
    status: int
    headers: Headers
    body: bytes


class _Answer:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers = Headers()
        self.body: list[bytes] = []
        self.head_done = False
        self.done = False
        self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = dict.get(self.headers, key)
        dict.__setitem__(self.headers, key, text if previous is None else f"{previous}, {text}")

    def on_headers_complete(self) -> None:
        self.head_done = True
        # Read here: llhttp forgets it once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True

    def ends_at_close(self) -> bool:
        """Whether the body is delimited by the connection's end (no length, not chunked)."""
        return (
            self.head_done
            and "content-length" not in self.headers
            and "chunked" not in (self.headers.get("transfer-encoding") or "").lower()
        )


class _Stale(Exception):
    """A reused connection was closed before any byte of the answer arrived."""


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Pool:
    """Requests to the origin of `base_url` (`http://` or `https://` with `ssl_context`).

    `name` is how errors name the server ("Consul closed the connection ...").
    """

    def __init__(
        self,
        base_url: str,
        ssl_context: ssl.SSLContext | None,
        *,
        name: str,
        idle_timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.https else 80)
        self.authority = parts.netloc.rpartition("@")[2]  # keeps an IPv6 literal's brackets
        self.ssl = ssl_context if self.https else None
        if self.https and self.ssl is None:
            self.ssl = ssl.create_default_context()
        self.name = name
        self.idle_timeout = idle_timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._busy: set[asyncio.StreamWriter] = set()
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"Pool({self.name} at {self.authority}, idle={len(self._idle)}, "
            f"busy={len(self._busy)}, closed={self.closed})"
        )

    async def request(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request (`url`: this origin's, its path and query are used) and read
        its whole answer. HTTPClientError if none comes; OSError from the socket as is."""
        if self.closed:
            raise HTTPClientError(f"the {self.name} client is closed")
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        wire = self._head(method, target, body, headers or {}) + body
        for _ in range(2):
            (reader, writer), reused = await self._take()
            self._busy.add(writer)
            try:
                answer = await self._exchange(reader, writer, wire, reused)
            except _Stale:
                writer.close()
                continue
            except BaseException:
                writer.transport.abort()  # cancelled or failed mid-answer: never reused
                raise
            finally:
                self._busy.discard(writer)
            if self.closed or not answer.keep_alive:
                writer.close()
            else:
                self._idle.append((reader, writer, time.monotonic()))
            return Response(answer.status, answer.headers, b"".join(answer.body))
        raise HTTPClientError(f"{self.name} closed the connection without an answer")

    def _head(self, method: str, target: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.authority}",
            f"User-Agent: hms-sidecar/{__version__}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _take(self) -> tuple[_Connection, bool]:
        """A kept-alive connection (True) or a new one (False)."""
        now = time.monotonic()
        while self._idle:
            reader, writer, since = self._idle.pop()
            if now - since < self.idle_timeout and not writer.is_closing() and not reader.at_eof():
                return (reader, writer), True
            writer.close()
        try:
            connection = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        except ssl.SSLCertVerificationError as exc:
            raise HTTPClientError(f"TLS certificate rejected: {exc.verify_message}") from None
        except OSError as exc:
            reason = os_reason(exc)
            raise HTTPClientError(f"cannot connect to {self.authority}: {reason}") from None
        return connection, False

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        wire: bytes,
        reused: bool,
    ) -> _Answer:
        writer.write(wire)
        await writer.drain()
        answer = _Answer()
        received = False
        while not answer.done:
            data = await reader.read(_CHUNK)
            if not data:
                if answer.ends_at_close():
                    break
                if not received:
                    if reused:
                        raise _Stale
                    raise HTTPClientError(f"{self.name} closed the connection without an answer")
                raise HTTPClientError(f"{self.name} closed the connection mid-answer")
            received = True
            try:
                answer.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise HTTPClientError(f"{self.name} sent a malformed answer: {exc}") from None
        answer.keep_alive = answer.keep_alive and answer.done
        return answer

    async def close(self) -> None:
        """Close every connection; requests after this fail."""
        self.closed = True
        idle, self._idle = self._idle, []
        for _, writer, _ in idle:
            writer.close()
        for writer in list(self._busy):
            writer.transport.abort()
        for _, writer, _ in idle:
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
