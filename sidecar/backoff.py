"""The one back-off rule for reconnecting and retrying: doubling, capped, jittered.

Used by Consul registration and watches, the event relay's connection and drain,
and subscription retries and reconnects. (Retries of proxied requests follow
Envoy's own rule in `proxy/resilience.py`.)
"""

from __future__ import annotations

import random


def backoff_delay(failed: int, initial: float, cap: float, rng: random.Random) -> float:
    """The wait after `failed` failed attempts (1 = the first): `initial` doubling up to
    `cap`, then a random half of it taken off, so retries of many clients spread out."""
    base = min(cap, initial * 2.0 ** min(max(failed - 1, 0), 62))
    return base * (0.5 + 0.5 * rng.random())
