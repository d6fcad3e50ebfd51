"""Which route to try first: weighted choice among available routes, biased towards the faster ones.

Routes are grouped by priority tier (lower first); inside a tier the order is a weighted sample without
replacement, so the first pick spreads load by weight and the rest of the order is the fallback chain.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

LATENCY_FLOOR_S = 0.001  # below a millisecond, latency differences are noise, not a reason to shift load


@dataclass(frozen=True, slots=True)
class Candidate:
    index: int
    priority: int
    weight: float
    ewma_s: float | None  # None: not measured yet


def effective_weights(tier: Sequence[Candidate], latency_bias: float) -> list[float]:
    """weight * (fastest / own latency) ** bias; an unmeasured route counts as the fastest, so it gets explored."""
    measured = [max(c.ewma_s, LATENCY_FLOOR_S) for c in tier if c.ewma_s is not None]
    if not measured or latency_bias == 0:
        return [c.weight for c in tier]
    best = min(measured)
    out = []
    for c in tier:
        if c.ewma_s is None:
            out.append(c.weight)
        else:
            out.append(c.weight * (best / max(c.ewma_s, LATENCY_FLOOR_S)) ** latency_bias)
    return out


def order(candidates: Sequence[Candidate], latency_bias: float, rng: random.Random | None = None) -> list[int]:
    """Indexes of `candidates` in the order to try them."""
    rng = rng or random
    tiers: dict[int, list[Candidate]] = {}
    for c in candidates:
        tiers.setdefault(c.priority, []).append(c)
    result: list[int] = []
    for priority in sorted(tiers):
        tier = tiers[priority]
        if len(tier) == 1:
            result.append(tier[0].index)
            continue
        weights = effective_weights(tier, latency_bias)
        # Efraimidis-Spirakis: sorting by u ** (1 / w) is a weighted sample without replacement in one pass.
        keyed = [(rng.random() ** (1.0 / w), c.index) for c, w in zip(tier, weights, strict=True)]
        keyed.sort(reverse=True)
        result.extend(i for _, i in keyed)
    return result


def ewma(previous: float | None, sample: float, alpha: float) -> float:
    return sample if previous is None else previous + alpha * (sample - previous)
