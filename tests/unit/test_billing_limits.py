"""Limits and money have upper bounds everywhere they enter (API bodies, the config file, stored rows): a
value that cannot travel (orjson stops at 64 bits, JavaScript at 2^53) is refused where it arrives, naming
its field, instead of being stored and breaking the next start."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from pydantic import ValidationError

from schemas.config import MAX_COUNT, MAX_USD, ConfigError, Limits, parse_config
from schemas.control import TeamState, encode
from services.billing.ratelimit import TokenBuckets


def config_with_plan(**plan: object) -> dict:
    return {
        "providers": {"p": {"base_url": "http://x"}},
        "models": {"m": {"routes": [{"provider": "p"}], "prices": [{"input": 1}]}},
        "plans": {"free": plan},
        "default_plan": "free",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rpd", 2**64),
        ("rpm", MAX_COUNT + 1),
        ("tokens_per_month", 1e30),
        ("tpm", True),
        ("budget_usd_per_month", 1e30),
        ("budget_usd_per_month", "NaN"),
        ("budget_usd_per_month", "Infinity"),
        ("budget_usd_per_month", "0.1234567"),
        ("budget_usd_per_month", str(MAX_USD + 1)),
    ],
)
def test_out_of_range_limit_is_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        Limits.model_validate({field: value})
    assert err.value.errors()[0]["loc"] == (field,)
    with pytest.raises(ConfigError, match=rf"plans\.free\.{field}"):
        parse_config(config_with_plan(**{field: value}))


def test_plan_fee_is_bounded_like_a_budget():
    with pytest.raises(ConfigError, match=r"plans\.free\.fee_usd_per_month"):
        parse_config(config_with_plan(fee_usd_per_month="1e12"))


def test_the_largest_allowed_limits_still_encode_for_the_control_topic():
    top = Limits(rpm=MAX_COUNT, rpd=MAX_COUNT, tpm=MAX_COUNT, tokens_per_month=MAX_COUNT,
                 budget_usd_per_month=Decimal("999999999.999999"))  # fmt: skip
    raw = encode(TeamState(team_id="team_x", name="x", limits=top))
    assert orjson.loads(raw)["limits"]["rpd"] == MAX_COUNT
    assert Limits(budget_usd_per_month=Decimal("12.5")).budget_usd_per_month == Decimal("12.5")


def test_token_bucket_admits_the_burst_then_says_when_to_retry():
    buckets = TokenBuckets(rate_per_s=2.0, burst=3)
    assert [buckets.take("team:a", 100.0) for _ in range(3)] == [0, 0, 0]
    assert buckets.take("team:a", 100.0) == 1  # half a second to the next token: Retry-After rounds up
    assert buckets.take("team:b", 100.0) == 0  # another caller has its own bucket
    assert buckets.take("team:a", 100.5) == 0
    slow = TokenBuckets(rate_per_s=0.1, burst=1)
    assert slow.take("x", 0.0) == 0 and slow.take("x", 0.0) == 10
