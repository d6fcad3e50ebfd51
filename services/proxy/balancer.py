"""Which route to try first, per the model's routing strategy (schemas/config.py Routing).

Routes are grouped by priority tier (lower first); the strategy orders each tier, and the rest of the order
is the fallback chain:
  weighted  a weighted sample without replacement, weights biased towards the faster routes (latency EWMA);
  cheapest  by the expected cost of the request (services/proxy/route_prices.py); a route with no price in
            force goes last;
  fastest   by latency EWMA (differences under LATENCY_FLOOR_S are ties); an unmeasured route goes first,
            so it gets measured (explored) once.
Under cheapest and fastest, routes that rank equal share load by weight (a weighted sample among them).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LATENCY_FLOOR_S = 0.001  # below a millisecond, latency differences are noise, not a reason to shift load


@dataclass(frozen=True, slots=True)
class Candidate:
    index: int
    priority: int
    weight: float
    ewma_s: float | None  # None: not measured yet
    cost: float | None = None  # `cheapest`: the request's expected cost on this route; None: no price


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


def _tiers(candidates: Sequence[Candidate]) -> list[list[Candidate]]:
    tiers: dict[int, list[Candidate]] = {}
    for c in candidates:
        tiers.setdefault(c.priority, []).append(c)
    return [tiers[p] for p in sorted(tiers)]


def _sample(group: Sequence[Candidate], weights: Sequence[float], rng: random.Random | Any) -> list[int]:
    if len(group) == 1:
        return [group[0].index]
    # Efraimidis-Spirakis: sorting by u ** (1 / w) is a weighted sample without replacement in one pass.
    keyed = [(rng.random() ** (1.0 / w), c.index) for c, w in zip(group, weights, strict=True)]
    keyed.sort(reverse=True)
    return [i for _, i in keyed]


def order(candidates: Sequence[Candidate], latency_bias: float, rng: random.Random | None = None) -> list[int]:
    """Indexes of `candidates` in the order to try them (`weighted`)."""
    rng = rng or random
    result: list[int] = []
    for tier in _tiers(candidates):
        if len(tier) == 1:
            result.append(tier[0].index)
            continue
        result.extend(_sample(tier, effective_weights(tier, latency_bias), rng))
    return result


def ranked(candidates: Sequence[Candidate], key: Callable[[Candidate], float | None], unknown_first: bool,
           rng: random.Random | None = None) -> list[int]:  # fmt: skip
    """Indexes in the order to try them: per tier, by `key` (lower first), equal keys sampled by weight,
    candidates whose key is None before (`unknown_first`) or after the ranked ones."""
    rng = rng or random
    result: list[int] = []
    for tier in _tiers(candidates):
        groups: dict[float | None, list[Candidate]] = {}
        for c in tier:
            groups.setdefault(key(c), []).append(c)
        known = sorted(k for k in groups if k is not None)
        keys: list[float | None] = [*known, None] if not unknown_first else [None, *known]
        for k in keys:
            if k in groups:
                group = groups[k]
                result.extend(_sample(group, [c.weight for c in group], rng))
    return result


def _latency(c: Candidate) -> float | None:
    return None if c.ewma_s is None else max(c.ewma_s, LATENCY_FLOOR_S)


def _cost(c: Candidate) -> float | None:
    return c.cost


def cheapest(candidates: Sequence[Candidate], rng: random.Random | None = None) -> list[int]:
    return ranked(candidates, _cost, unknown_first=False, rng=rng)


def fastest(candidates: Sequence[Candidate], rng: random.Random | None = None) -> list[int]:
    return ranked(candidates, _latency, unknown_first=True, rng=rng)


def ewma(previous: float | None, sample: float, alpha: float) -> float:
    return sample if previous is None else previous + alpha * (sample - previous)
