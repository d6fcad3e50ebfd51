"""Token buckets for the billing API: pure arithmetic over a monotonic clock, one bucket per caller."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """`rate` tokens a second up to `burst`; a request takes one. `take` answers 0 (admitted) or how many
    whole seconds until a token is there (the Retry-After to send)."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self._buckets: dict[str, Bucket] = {}

    def take(self, who: str, now: float) -> int:
        b = self._buckets.get(who)
        if b is None:
            b = self._buckets[who] = Bucket(tokens=float(self.burst), at=now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - b.tokens) / self.rate))
