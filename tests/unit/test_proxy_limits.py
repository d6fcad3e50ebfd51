"""Rate limits: which limits apply to a key (plan <- team <- key), and sliding-window arithmetic."""

from __future__ import annotations

import pytest

from schemas.config import Limits, parse_config
from schemas.control import KeyState, TeamState
from services.proxy.limiter import MemoryLimiter
from services.proxy.limits import Rule, resolve_policy, verdict, wait_s

CONFIG = parse_config({
    "providers": {"p": {"base_url": "http://x"}},
    "models": {"m": {"routes": [{"provider": "p"}]}, "n": {"aliases": ["n-alias"], "routes": [{"provider": "p"}]}},
    "plans": {"free": {"rpm": 10, "tpm": 1000, "models": ["n-alias"]}, "team": {"rpm": 100, "rpd": 5000}},
    "default_plan": "team",
})  # fmt: skip


def key(**kw) -> KeyState:
    return KeyState(key_id="k1", key_hash="h", prefix="tw-", team_id="t1", **kw)


def rules(policy) -> dict[tuple[str, str], int]:
    return {(r.scope, r.metric): r.limit for r in policy.rules}


def test_key_without_plan_inherits_team_plan_then_default():
    assert rules(resolve_policy(CONFIG, key(), None)) == {("key", "rpm"): 100, ("key", "rpd"): 5000,
                                                         ("team", "rpm"): 100, ("team", "rpd"): 5000}  # fmt: skip
    team = TeamState(team_id="t1", name="a", plan="free")
    assert rules(resolve_policy(CONFIG, key(), team))[("key", "rpm")] == 10


def test_team_limits_overlay_the_plan_and_key_limits_overlay_both():
    team = TeamState(team_id="t1", name="a", plan="free", limits=Limits(rpm=50, rpd=7))
    k = key(plan="team", limits=Limits(tpm=99))
    r = rules(resolve_policy(CONFIG, k, team))
    assert r[("key", "rpm")] == 50 and r[("key", "rpd")] == 7 and r[("key", "tpm")] == 99
    assert r[("team", "rpm")] == 50 and r[("team", "tpm")] == 1000  # the team's own window: its plan + overrides


def test_plan_model_allowlist_reaches_the_policy():
    assert resolve_policy(CONFIG, key(plan="free"), None).models == frozenset({"n-alias"})
    assert resolve_policy(CONFIG, key(), None).models is None


def test_unknown_plan_name_falls_back_to_the_default_plan():
    assert rules(resolve_policy(CONFIG, key(plan="gone"), None))[("key", "rpm")] == 100


async def test_memory_window_admits_up_to_the_limit_then_rejects_with_retry_after():
    lim = MemoryLimiter()
    rule = (Rule("key", "k", "rpm", 3),)
    t = 600.0  # start of a window
    for i in range(3):
        v, _ = await lim.admit(rule, [1], now=t + i)
        assert v.allowed and v.headers["x-ratelimit-remaining"] == str(2 - i)
    v, _ = await lim.admit(rule, [1], now=t + 3)
    assert not v.allowed and v.headers["x-ratelimit-remaining"] == "0"
    # the counter assumes the previous window's requests were spread evenly: 57 s to its end, then a third
    # of the next window until 3 * (1 - f) + 1 <= 3
    assert float(v.headers["retry-after"]) == 77 and v.headers["x-ratelimit-limit"] == "3"


async def test_sliding_window_weights_the_previous_window_by_its_overlap():
    lim = MemoryLimiter()
    rule = (Rule("key", "k", "rpm", 10),)
    for _ in range(10):
        assert (await lim.admit(rule, [1], now=600.0))[0].allowed
    # 30 s into the next window, half of the previous 10 still count: 5 more fit, the 6th does not
    results = [(await lim.admit(rule, [1], now=690.0))[0].allowed for _ in range(6)]
    assert results == [True] * 5 + [False]
    # two windows later nothing of it is left
    assert (await lim.admit(rule, [1], now=781.0))[0].allowed


async def test_rejection_by_one_rule_counts_nothing_anywhere():
    lim = MemoryLimiter()
    rules_ = (Rule("key", "k", "rpm", 100), Rule("team", "t", "rpm", 1))
    assert (await lim.admit(rules_, [1, 1], now=600.0))[0].allowed
    v, _ = await lim.admit(rules_, [1, 1], now=601.0)
    assert not v.allowed and v.rejected == rules_[1]
    assert v.headers["x-ratelimit-limit"] == "1"
    v, _ = await lim.admit((rules_[0],), [1], now=602.0)
    assert v.headers["x-ratelimit-remaining"] == "98"  # the rejected request did not use the key's budget


async def test_tpm_estimate_is_corrected_by_actual_usage():
    lim = MemoryLimiter()
    rule = (Rule("key", "k", "tpm", 1000),)
    v, ticket = await lim.admit(rule, [900], now=600.0)
    assert v.allowed and not (await lim.admit(rule, [200], now=600.5))[0].allowed
    lim.correct(ticket, [-800])  # it really used 100
    assert (await lim.admit(rule, [200], now=601.0))[0].allowed


def test_wait_covers_the_time_until_the_cost_fits():
    rule = Rule("key", "k", "rpm", 10)
    assert wait_s(rule, 1, curr=5, prev=10, frac=0.0) == pytest.approx(36.0)  # prev must decay to 4
    assert wait_s(rule, 1, curr=10, prev=0, frac=0.5) == pytest.approx(30.0 + 6.0)
    assert wait_s(rule, 11, curr=0, prev=0, frac=0.0) == 60.0  # never fits: a window


def test_headers_name_the_tightest_limit_and_openai_style_per_kind():
    rules_ = (Rule("key", "k", "rpm", 100), Rule("key", "k", "tpm", 1000))
    v = verdict(rules_, [1, 900], [(0, 0), (0, 0)], [0.5, 0.5], None)
    h = v.headers
    assert h["x-ratelimit-limit"] == "1000" and h["x-ratelimit-remaining"] == "100" and h["x-ratelimit-reset"] == "30"
    assert h["x-ratelimit-remaining-requests"] == "99" and h["x-ratelimit-remaining-tokens"] == "100"
