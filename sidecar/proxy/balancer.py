"""Endpoint choice for one upstream: power of two choices, peak-EWMA, outlier ejection.

One `Balancer` per upstream holds an `EndpointStats` per live endpoint. For every
proxied request the proxy calls `pick()`, then `begin()` before sending and `end()`
once the attempt finished. All three are synchronous, build no containers and log
nothing: they sit on the hot path. The list of eligible endpoints is cached and
rebuilt only when an ejection, a return or an update changes it.

Choice (Linkerd / tower): draw two eligible endpoints at random and take the
cheaper. Cost is `outstanding` ("least_request") or `ewma * (outstanding + 1)`
("peak_ewma"), where `ewma` is a peak-EWMA of response times: a sample above the
estimate replaces it, a lower one is blended in with weight `1 - exp(-elapsed/10 s)`.

Outlier ejection (Envoy): `consecutive_failures` failures in a row eject an endpoint
for `base_ejection * n` seconds (capped at `max_ejection`), unless that would put
more than `max_ejection_percent` of the endpoints out of rotation. The multiplier n
grows by one per ejection and, as Envoy's does, drops by one for every
`base_ejection` the endpoint then spends in rotation, so an endpoint that failed
once long ago is not punished like one that keeps failing. Ejected endpoints come
back lazily: `pick()` notices the earliest expiry passed; there are no timers.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Final

from sidecar.discovery.base import Endpoint

__all__ = ["DECAY", "DEFAULT_RTT", "POLICIES", "Balancer", "EndpointStats"]

DEFAULT_RTT: Final = 0.030  # seconds; linkerd2-proxy's starting estimate
DECAY: Final = 10.0  # seconds; linkerd2-proxy's peak-EWMA decay
POLICIES: Final = frozenset(("peak_ewma", "least_request"))

_INF: Final = math.inf
_exp: Final = math.exp
_MAX_EXP: Final = 700.0  # math.exp overflows just above 709


class EndpointStats:
    """Live accounting for one endpoint of one upstream.

    `pool` is an opaque slot for the proxy (its connection pool to this endpoint);
    the balancer never reads it. `ejected_until` is a clock time, 0.0 when the
    endpoint is in rotation.
    """

    __slots__ = (
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "endpoint",
        "ewma",
        "live",
        "multiplier",
        "outstanding",
        "pool",
        "returned",
        "stamp",
    )

    def __init__(self, endpoint: Endpoint, now: float) -> None:
        self.endpoint = endpoint
        self.outstanding = 0
        self.ewma = DEFAULT_RTT
        self.stamp = now  # when `ewma` last took a sample
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0  # how many times it was ejected, ever
        self.multiplier = 0  # of base_ejection for the next ejection, minus one
        self.returned = now  # when it last came (back) into rotation
        self.pool: object | None = None
        self.live = True  # False once `Balancer.update()` dropped the endpoint

    def is_ejected(self, now: float) -> bool:
        """Out of rotation at clock time `now`."""
        return self.ejected_until > now

    @property
    def address(self) -> str:
        return self.endpoint.address

    def __repr__(self) -> str:
        state = "ejected" if self.ejected_until else ("live" if self.live else "removed")
        return (
            f"EndpointStats({self.endpoint.address}, {state}, outstanding={self.outstanding}, "
            f"ewma={self.ewma * 1000:.1f}ms, failures={self.consecutive_failures}, "
            f"ejections={self.ejections})"
        )


class Balancer:
    """Picks an endpoint of one upstream per request and keeps per-endpoint health."""

    __slots__ = (
        "_base_ejection",
        "_by_endpoint",
        "_clock",
        "_ejected",
        "_eligible",
        "_max_ejection",
        "_max_ejection_percent",
        "_next_expiry",
        "_on_remove",
        "_peak",
        "_random",
        "_stats",
        "_threshold",
        "name",
        "policy",
    )

    def __init__(
        self,
        name: str,
        *,
        policy: str = "peak_ewma",
        consecutive_failures: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
        max_ejection_percent: int = 50,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_remove: Callable[[EndpointStats], None] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, not {policy!r}")
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be within 0..100")
        self.name = name
        self.policy = policy
        self._peak = policy == "peak_ewma"
        self._threshold = consecutive_failures
        self._base_ejection = base_ejection
        self._max_ejection = max_ejection
        self._max_ejection_percent = max_ejection_percent
        self._clock = clock
        self._random = (rng or random.Random()).random
        self._on_remove = on_remove
        self._stats: list[EndpointStats] = []
        self._by_endpoint: dict[Endpoint, EndpointStats] = {}
        self._eligible: list[EndpointStats] = []  # live and not ejected; rebuilt on change
        self._ejected = 0  # live endpoints with ejected_until != 0
        self._next_expiry = _INF  # earliest ejected_until among them

    # -- hot path -------------------------------------------------------------------

    def pick(self, avoid: EndpointStats | None = None) -> EndpointStats | None:
        """The cheaper of two random eligible endpoints; None when none is eligible.

        `avoid` (the endpoint a retry just failed on) is never chosen while another
        endpoint is eligible.
        """
        if self._ejected:
            now = self._clock()
            if now >= self._next_expiry:
                self._return_expired(now)
        eligible = self._eligible
        n = len(eligible)
        if n < 2:
            return eligible[0] if n else None
        # int(random() * n) is uniform in range(n) and much cheaper than randrange;
        # the fractional part left over is again uniform in [0, 1) and independent of
        # i (losing only log2(n) of 53 bits), so one draw yields both choices.
        x = self._random() * n
        i = int(x)
        j = int((x - i) * (n - 1))
        if j >= i:
            j += 1
        a = eligible[i]
        b = eligible[j]
        if avoid is not None and (a is avoid or b is avoid):
            if n == 2:
                return b if a is avoid else a
            # Replace `avoid` by a third endpoint, uniform over the other n - 2.
            k = int(self._random() * (n - 2))
            lo, hi = (i, j) if i < j else (j, i)
            if k >= lo:
                k += 1
            if k >= hi:
                k += 1
            if a is avoid:
                a = eligible[k]
            else:
                b = eligible[k]
        if not self._peak:
            return b if b.outstanding < a.outstanding else a
        # Cost = ewma * (outstanding + 1), with each estimate aged toward zero by the
        # time since its last sample (as tower's PeakEwma::load does), so a starved
        # slow endpoint is eventually tried again. Unlike tower, the aged value is not
        # written back, so frequent picks do not drag estimates down. Both costs share
        # the factor exp(-now / DECAY); comparing them needs one exp and no clock.
        age = (b.stamp - a.stamp) / DECAY
        if -_MAX_EXP < age < _MAX_EXP:
            return (
                b if b.ewma * (b.outstanding + 1) * _exp(age) < a.ewma * (a.outstanding + 1) else a
            )
        return b if age < 0.0 else a  # one estimate is hours staler: it has aged to ~0

    def begin(self, stats: EndpointStats) -> float:
        """A request to `stats` starts; returns the start time to hand to `end()`."""
        stats.outstanding += 1
        return self._clock()

    def now(self) -> float:
        """The balancer's clock, for callers that time a response head (see `end`)."""
        return self._clock()

    def end(
        self, stats: EndpointStats, start: float, ok: bool, first_byte: float | None = None
    ) -> None:
        """The request begun at `start` finished; `ok` False counts toward ejection.

        The latency sample is `first_byte - start` when the response head arrived at
        `first_byte` (from `now()`): how long the app streams the body is not the
        endpoint's latency.
        """
        if stats.outstanding > 0:
            stats.outstanding -= 1
        now = self._clock()
        rtt = (now if first_byte is None else first_byte) - start
        ewma = stats.ewma
        if rtt > ewma:
            stats.ewma = rtt
        else:
            w = _exp((stats.stamp - now) / DECAY)
            stats.ewma = ewma * w + rtt * (1.0 - w)
        stats.stamp = now
        if ok:
            stats.consecutive_failures = 0
            return
        if now >= self._next_expiry:
            self._return_expired(now)  # this failure counts after any due return
        stats.consecutive_failures += 1
        if (
            stats.consecutive_failures >= self._threshold
            and stats.live
            and not stats.ejected_until  # late failures of requests sent before ejection
        ):
            self._maybe_eject(stats, now)

    def abandon(self, stats: EndpointStats) -> None:
        """The request ended with no verdict (the app went away): only `outstanding` drops."""
        if stats.outstanding > 0:
            stats.outstanding -= 1

    # -- membership -----------------------------------------------------------------

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the endpoint set; endpoints that stay keep their stats and pool.

        Endpoints are the same when host and port are. Dropped ones are handed to
        `on_remove` (the proxy closes their pools); a late `end()` on them is harmless.
        """
        old = self._by_endpoint
        by_endpoint: dict[Endpoint, EndpointStats] = {}
        stats_list: list[EndpointStats] = []
        now = self._clock()
        for endpoint in endpoints:
            if endpoint in by_endpoint:
                continue
            stats = old.pop(endpoint, None)
            if stats is None:
                stats = EndpointStats(endpoint, now)
            else:
                stats.endpoint = endpoint  # metadata may have changed
            by_endpoint[endpoint] = stats
            stats_list.append(stats)
        self._by_endpoint = by_endpoint
        self._stats = stats_list
        for removed in old.values():
            removed.live = False
        # Fewer endpoints may mean fewer may be ejected: return the soonest-due first.
        ejected = sorted((s for s in stats_list if s.ejected_until), key=_ejected_until)
        for stats in ejected[: max(0, len(ejected) - self._max_ejected())]:
            stats.ejected_until = 0.0
            stats.consecutive_failures = 0
            stats.returned = now
        self._rebuild()
        if self._on_remove is not None:
            for removed in old.values():
                self._on_remove(removed)

    # -- inspection -----------------------------------------------------------------

    @property
    def endpoints(self) -> Sequence[EndpointStats]:
        """Stats of every live endpoint, ejected or not (do not mutate)."""
        return self._stats

    def counts(self) -> tuple[int, int]:
        """(healthy, ejected) endpoints now, for `sidecar_upstream_endpoints{state}`."""
        now = self._clock()
        if now >= self._next_expiry:
            self._return_expired(now)
        return len(self._eligible), self._ejected

    def snapshot(self) -> list[dict[str, object]]:
        """Per-endpoint state for /v1/status."""
        now = self._clock()
        if now >= self._next_expiry:
            self._return_expired(now)
        return [
            {
                "address": s.endpoint.address,
                "outstanding": s.outstanding,
                "ewma_ms": round(s.ewma * 1000.0, 3),
                "consecutive_failures": s.consecutive_failures,
                "ejected": bool(s.ejected_until),
                "ejected_for_s": round(max(0.0, s.ejected_until - now), 3)
                if s.ejected_until
                else 0.0,
                "ejections": s.ejections,
                "ejection_multiplier": s.multiplier,
            }
            for s in self._stats
        ]

    def __repr__(self) -> str:
        healthy, ejected = self.counts()
        return (
            f"Balancer({self.name!r}, policy={self.policy}, healthy={healthy}, ejected={ejected})"
        )

    # -- internals ------------------------------------------------------------------

    def _max_ejected(self) -> int:
        return len(self._stats) * self._max_ejection_percent // 100

    def _maybe_eject(self, stats: EndpointStats, now: float) -> None:
        if self._ejected + 1 > self._max_ejected():
            return  # too many out already: stay in rotation
        if stats.multiplier:
            healthy_periods = int((now - stats.returned) // self._base_ejection)
            stats.multiplier = max(0, stats.multiplier - healthy_periods)
        stats.multiplier += 1
        stats.ejections += 1
        stats.ejected_until = now + min(self._base_ejection * stats.multiplier, self._max_ejection)
        self._rebuild()

    def _return_expired(self, now: float) -> None:
        """Bring every endpoint whose ejection time passed back into rotation."""
        for stats in self._stats:
            if stats.ejected_until and stats.ejected_until <= now:
                stats.ejected_until = 0.0
                stats.consecutive_failures = 0
                stats.returned = now
        self._rebuild()

    def _rebuild(self) -> None:
        eligible: list[EndpointStats] = []
        next_expiry = _INF
        for stats in self._stats:
            until = stats.ejected_until
            if until:
                next_expiry = min(next_expiry, until)
            else:
                eligible.append(stats)
        self._eligible = eligible
        self._ejected = len(self._stats) - len(eligible)
        self._next_expiry = next_expiry


def _ejected_until(stats: EndpointStats) -> float:
    return stats.ejected_until
