"""The discovery seam: an `Endpoint` and the `Resolver` protocol every source implements.

The proxy only ever talks to a `Resolver`; static lists and Consul watches plug in
behind it without the proxy knowing which one it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of an upstream service, addressed by host and port."""

    host: str
    port: int
    meta: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def address(self) -> str:
        """`host:port`, with IPv6 literals bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.address


Listener = Callable[[Sequence[Endpoint]], None]


class Resolver(Protocol):
    """A live source of endpoints for one upstream.

    `start` begins watching; `ready` turns true once the first answer arrived (an
    empty answer counts); every change, and the first answer, is pushed to each
    listener with the full current list. `stop` ends the watch.
    """

    @property
    def ready(self) -> bool: ...

    def endpoints(self) -> Sequence[Endpoint]: ...

    def subscribe(self, listener: Listener) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
