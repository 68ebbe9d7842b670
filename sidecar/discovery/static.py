"""A resolver over a fixed `endpoints:` list from the configuration."""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.discovery.base import Endpoint, Listener


class StaticResolver:
    """Answers with the configured list at once; it never changes."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._listeners: list[Listener] = []
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started

    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        if self._started:
            listener(self._endpoints)

    async def start(self) -> None:
        self._started = True
        for listener in self._listeners:
            listener(self._endpoints)

    async def stop(self) -> None:
        self._started = False

    def __repr__(self) -> str:
        return f"StaticResolver({', '.join(map(str, self._endpoints))}, ready={self._started})"
