"""Rate limits as plain data and arithmetic: which limits apply to a key, and sliding-window verdicts.

The window is a sliding-window counter (two fixed windows, the previous one weighted by how much of it
still overlaps the sliding window): O(1) memory per limit, and within a few percent of an exact log.
The stores (in memory, Redis) live in limiter.py and only fetch and bump the counts this module judges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas.config import GatewayConfig, Limits
from schemas.control import KeyState, TeamState

WINDOWS_S = {"rpm": 60.0, "rpd": 86_400.0, "tpm": 60.0}
REQUEST_METRICS = ("rpm", "rpd")


@dataclass(frozen=True, slots=True)
class Rule:
    scope: str  # "key" | "team"
    scope_id: str
    metric: str  # "rpm" | "rpd" | "tpm"
    limit: int
    # derived once (read on every admission): the window length and the counter's name
    window_s: float = field(init=False, repr=False, compare=False)
    bucket: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "window_s", WINDOWS_S[self.metric])
        object.__setattr__(self, "bucket", f"{self.scope}:{self.scope_id}:{self.metric}")


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything admission needs about one key, resolved once per (key, team) state."""

    rules: tuple[Rule, ...]
    models: frozenset[str] | None  # names the key may call; None = all
    key_limits: Limits
    team_limits: Limits


def resolve_policy(config: GatewayConfig, key: KeyState, team: TeamState | None) -> Policy:
    """Key: plan[key.plan or team.plan or default] <- team.limits <- key.limits. Team: its plan <- team.limits.

    The team's own window holds every key of the team together; each key's window holds that key alone.
    """
    default = config.plans[config.default_plan]
    team_plan_name = team.plan if team and team.plan else config.default_plan
    key_plan = config.plans.get(key.plan or team_plan_name, default)
    team_plan = config.plans.get(team_plan_name, default)
    team_overrides = team.limits if team else None
    key_limits = Limits(**key_plan.model_dump(include=set(Limits.model_fields))).overlay(team_overrides)
    key_limits = key_limits.overlay(key.limits)
    team_limits = Limits(**team_plan.model_dump(include=set(Limits.model_fields))).overlay(team_overrides)
    rules: list[Rule] = []
    for scope, scope_id, limits in (("key", key.key_id, key_limits), ("team", key.team_id, team_limits)):
        for metric in WINDOWS_S:
            value = getattr(limits, metric)
            if value is not None:
                rules.append(Rule(scope, scope_id, metric, value))
    models = frozenset(key_plan.models) if key_plan.models is not None else None
    return Policy(tuple(rules), models, key_limits, team_limits)


def window_position(now: float, window_s: float) -> tuple[int, float]:
    """(index of the fixed window holding `now`, fraction of it elapsed)."""
    idx = math.floor(now / window_s)
    return idx, (now - idx * window_s) / window_s


def estimate(curr: float, prev: float, frac: float) -> float:
    return max(0.0, prev) * (1.0 - frac) + max(0.0, curr)


def exceeds(rule: Rule, cost: int, curr: float, prev: float, frac: float) -> bool:
    return cost > 0 and estimate(curr, prev, frac) + cost > rule.limit


def wait_s(rule: Rule, cost: int, curr: float, prev: float, frac: float) -> float:
    """Seconds until `cost` fits under the limit, if nothing else arrives meanwhile."""
    w, curr, prev = rule.window_s, max(0.0, curr), max(0.0, prev)
    if cost > rule.limit:
        return w  # never fits; a window is the honest "not soon"
    if curr + cost <= rule.limit and prev > 0:
        f = 1.0 - (rule.limit - curr - cost) / prev  # when the previous window's weight has decayed enough
        return max(0.0, (f - frac) * w)
    # wait for the next window, where today's `curr` becomes the decaying `prev`
    g = 1.0 - (rule.limit - cost) / curr if curr > 0 else 0.0
    return (1.0 - frac) * w + max(0.0, g) * w


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    rejected: Rule | None
    retry_after_s: float
    headers: dict[str, str]


def first_violation(rules: Sequence[Rule], costs: Sequence[int], counts: Sequence[tuple[float, float]],
                    fracs: Sequence[float]) -> int | None:  # fmt: skip
    for i, rule in enumerate(rules):
        if exceeds(rule, costs[i], counts[i][0], counts[i][1], fracs[i]):
            return i
    return None


def verdict(rules: Sequence[Rule], costs: Sequence[int], counts: Sequence[tuple[float, float]],
            fracs: Sequence[float], rejected: int | None) -> Verdict:  # fmt: skip
    """The answer and its headers. `counts` are before this request; when allowed it has been counted.

    `X-RateLimit-*` describe the tightest limit (the violated one on a 429); OpenAI's per-kind
    `x-ratelimit-*-requests` / `-tokens` headers are set too, as SDKs and dashboards read those.
    """
    headers: dict[str, str] = {}
    tightest: tuple[float, Rule, int, float] | None = None
    by_kind: dict[str, tuple[int, Rule, float]] = {}
    allowed = rejected is None
    floor = math.floor
    # runs on every admitted call: estimate() inlined (same arithmetic, same floats), one pass
    for i, rule in enumerate(rules):
        curr, prev = counts[i]
        frac = fracs[i]
        used = (prev if prev > 0.0 else 0.0) * (1.0 - frac) + (curr if curr > 0.0 else 0.0)
        if allowed:
            used += costs[i]
        remaining = floor(rule.limit - used)
        if remaining < 0:
            remaining = 0
        reset = (1.0 - frac) * rule.window_s
        share = remaining / rule.limit
        if tightest is None or share < tightest[0]:
            tightest = (share, rule, remaining, reset)
        metric = rule.metric
        if metric != "rpd":
            kind = "tokens" if metric == "tpm" else "requests"
            seen = by_kind.get(kind)
            if seen is None or remaining < seen[0]:
                by_kind[kind] = (remaining, rule, reset)
    if rejected is not None:
        rule = rules[rejected]
        curr, prev = counts[rejected]
        tightest = (0.0, rule, 0, (1.0 - fracs[rejected]) * rule.window_s)
    if tightest is not None:
        _, rule, remaining, reset = tightest
        headers["x-ratelimit-limit"] = str(rule.limit)
        headers["x-ratelimit-remaining"] = str(remaining)
        headers["x-ratelimit-reset"] = str(max(1, math.ceil(reset)))
    for kind, (remaining, rule, reset) in by_kind.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(rule.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
        headers[f"x-ratelimit-reset-{kind}"] = f"{max(0.0, reset):.3f}s"
    if rejected is None:
        return Verdict(True, None, 0.0, headers)
    rule = rules[rejected]
    curr, prev = counts[rejected]
    retry = wait_s(rule, costs[rejected], curr, prev, fracs[rejected])
    headers["retry-after"] = str(max(1, math.ceil(retry)))
    return Verdict(False, rule, retry, headers)
