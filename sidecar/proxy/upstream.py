"""One upstream's live state: its resolver, balancer, breaker, retry budget and metrics.

Built from an `UpstreamConfig`; the proxy reads everything it needs for a
request from here with attribute lookups only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client.metrics import Counter

from sidecar.config import UpstreamConfig
from sidecar.discovery.base import Endpoint, Resolver
from sidecar.proxy.balancer import Balancer, EndpointStats
from sidecar.proxy.forward import EndpointPool
from sidecar.proxy.resilience import Breaker, RetryBudget
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.metrics import Metrics

log = get_logger("sidecar.proxy")


class Upstream:
    """Everything the proxy needs to send one request to one named upstream."""

    __slots__ = (
        "balancer",
        "breaker",
        "budget",
        "config",
        "fallback_headers",
        "host",
        "inflight",
        "max_inflight",
        "name",
        "resolver",
        "retries",
        "retry_policy",
        "retry_statuses",
        "served",
        "timeout",
        "traffic",
        "try_timeout",
    )

    def __init__(self, config: UpstreamConfig, resolver: Resolver, metrics: Metrics) -> None:
        self.name = config.name
        self.host = config.name.encode()  # Host for requests that came without one
        self.config = config
        self.resolver = resolver
        self.inflight = 0
        self.served = 0  # finished requests; tells an idle on-demand upstream apart
        # What every request reads of the (frozen) config, as slots of this native
        # class: each read of the config dataclass is a generic attribute lookup.
        self.max_inflight = config.max_concurrent_requests
        self.timeout = config.timeout
        self.try_timeout = min(config.per_try_timeout, config.timeout)
        self.retry_policy = config.retries
        outlier = config.outlier
        self.balancer = Balancer(
            config.name,
            policy=config.balancer,
            consecutive_failures=outlier.consecutive_failures,
            base_ejection=outlier.base_ejection,
            max_ejection=outlier.max_ejection,
            max_ejection_percent=outlier.max_ejection_percent,
            on_remove=_close_pool,
        )
        cb = config.circuit_breaker
        self.breaker = Breaker(
            config.name,
            failure_threshold=cb.failure_threshold,
            open_for=cb.open_for,
            half_open_probes=cb.half_open_probes,
            on_state_change=self._on_breaker_change,
        )
        self.budget = RetryBudget(
            config.retries.budget_ratio, min_per_second=config.retries.min_retries_per_second
        )
        self.retry_statuses = config.retries.on_statuses
        self.retries: Counter = metrics.retries.labels(config.name)
        self.traffic = metrics.traffic(config.name)
        fallback = config.fallback
        self.fallback_headers = (
            b""
            if fallback is None
            else b"x-sidecar-fallback: CIRCUIT_OPEN\r\ncontent-type: %s\r\n%s"
            % (
                fallback.content_type.encode(),
                b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in fallback.headers),
            )
        )
        resolver.subscribe(self.on_endpoints)

    def on_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Take a new endpoint list from discovery; pools of kept endpoints survive."""
        self.balancer.update(endpoints)
        for stats in self.balancer.endpoints:
            if stats.pool is None:
                stats.pool = EndpointPool(stats.endpoint)
        log.info(
            "endpoints_changed",
            upstream=self.name,
            endpoints=[str(e) for e in endpoints],
        )

    def close_pools(self) -> None:
        """Close every idle upstream connection (shutdown)."""
        for stats in self.balancer.endpoints:
            _close_pool(stats)

    def retire(self) -> None:
        """Stop using this upstream (an idle on-demand one): close its pools as they idle."""
        self.balancer.update(())

    def count(self, status: int) -> None:
        """Count one finished request by the status the app received."""
        self.served += 1
        codes = self.traffic.codes  # exported at scrape time (metrics.UpstreamRequests)
        codes[status] = codes.get(status, 0) + 1

    def _on_breaker_change(self, old: str, new: str) -> None:
        level = log.warning if new == "open" else log.info
        level("circuit_state_changed", upstream=self.name, old=old, new=new)

    def status(self) -> dict[str, Any]:
        """The JSON shape of this upstream in /v1/status."""
        healthy, ejected = self.balancer.counts()
        return {
            "service": self.config.service,
            "discovery": "static" if self.config.endpoints else "consul",
            **_discovery_status(self.resolver),
            "ready": self.resolver.ready,
            "circuit": self.breaker.state,
            "in_flight": self.inflight,
            "endpoints": self.balancer.snapshot(),
            "healthy": healthy,
            "ejected": ejected,
        }

    def __repr__(self) -> str:
        return f"<Upstream {self.name} circuit={self.breaker.state} in_flight={self.inflight}>"


def _discovery_status(resolver: Resolver) -> dict[str, Any]:
    status = getattr(resolver, "status", None)
    return {"watch": status()} if callable(status) else {}


def _close_pool(stats: EndpointStats) -> None:
    pool = stats.pool
    if isinstance(pool, EndpointPool):
        pool.close()
