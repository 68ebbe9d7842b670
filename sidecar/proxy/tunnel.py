"""A byte tunnel between the app and an upstream after a relayed `101 Switching Protocols`.

Once the upstream agreed to a WebSocket upgrade, neither side speaks HTTP: each
transport gets a `TunnelEnd` as its protocol (`set_protocol`), bytes read on one
side are written to the other, and write back-pressure on either side pauses
reading on the other, so a peer that stops reading holds at most a transport's
write buffer in the sidecar. The tunnel closes both sides when either closes,
when nothing crossed it for `app_connections.idle_timeout` (the proxy's sweeper
checks `last_active`), or at shutdown.
"""

from __future__ import annotations

import asyncio
import time

#: After a close, how long a side that does not read what is still buffered for it
#: keeps the tunnel's sockets open before they are aborted.
CLOSE_LINGER = 2.0


class TunnelEnd(asyncio.Protocol):
    """One side's transport in a tunnel: what it reads goes to the other side."""

    __slots__ = ("peer", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: TunnelEnd = self

    def data_received(self, data: bytes) -> None:
        self.tunnel.last_active = time.monotonic()
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.tunnel.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def __repr__(self) -> str:
        return f"<TunnelEnd {'closing' if self.transport.is_closing() else 'open'}>"


class Tunnel:
    """The app's and the upstream's transports joined; `done` resolves when it closes."""

    __slots__ = ("_registry", "app", "done", "last_active", "upstream", "upstream_name")

    def __init__(
        self,
        app: asyncio.Transport,
        upstream: asyncio.Transport,
        upstream_name: str,
        registry: set[Tunnel],
    ) -> None:
        self.app = TunnelEnd(self, app)
        self.upstream = TunnelEnd(self, upstream)
        self.app.peer = self.upstream
        self.upstream.peer = self.app
        self.upstream_name = upstream_name
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_active = time.monotonic()
        self._registry = registry

    def start(self, app_write_paused: bool, upstream_write_paused: bool) -> None:
        """Take both transports over and start reading; a side whose write buffer is
        already full (its `pause_writing` went to the HTTP protocol) starts with the
        other side paused."""
        self._registry.add(self)
        for end, peer_full in (
            (self.app, upstream_write_paused),
            (self.upstream, app_write_paused),
        ):
            transport = end.transport
            transport.set_protocol(end)
            if peer_full:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def close(self) -> None:
        """Close both sides after what is buffered for them is written; idempotent."""
        if self.done.done():
            return
        self._registry.discard(self)
        self.app.transport.close()
        self.upstream.transport.close()
        self.done.set_result(None)
        # A graceful close waits for a peer to read what is buffered for it; one that
        # never reads must not hold the sockets forever.
        asyncio.get_running_loop().call_later(CLOSE_LINGER, self.abort)

    def abort(self) -> None:
        """Drop both sides at once (shutdown grace over, or after a close's linger)."""
        self.app.transport.abort()
        self.upstream.transport.abort()
        if not self.done.done():
            self._registry.discard(self)
            self.done.set_result(None)

    def __repr__(self) -> str:
        state = "closed" if self.done.done() else "open"
        return f"<Tunnel {self.upstream_name} {state}>"
