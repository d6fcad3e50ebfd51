"""`GET /v1/usage` over rows in a real ClickHouse engine: FINAL dedup, exact Decimal cost, grouping,
and who may read which team."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.support.billing import ADMIN, FINANCE

MARCH = {"from": "2026-03-01", "to": "2026-03-31"}
COLUMNS = (
    "event_id", "occurred_at", "request_id", "team_id", "key_id", "endpoint", "requested_model", "served_model",
    "provider", "status", "http_status", "prompt_tokens", "completion_tokens", "cached_tokens", "priced",
    "price_version", "cost_total", "ingested_at", "row_version", "cost_input",
)  # fmt: skip


def event(
    team_id: str,
    when: datetime,
    *,
    key_id: str = "key_a",
    served: str = "gpt-4.1",
    requested: str = "gpt-4.1",
    prompt: int = 100,
    completion: int = 10,
    cached: int = 0,
    cost: str = "0.001",
    priced: bool = True,
    event_id: uuid.UUID | None = None,
    row_version: int = 1,
) -> list[Any]:
    return [
        event_id or uuid.uuid4(), when, f"req-{uuid.uuid4().hex[:6]}", team_id, key_id, "chat.completions",
        requested, served, "openai", "ok", 200, prompt, completion, cached, priced, "v", Decimal(cost),
        datetime.now(UTC), row_version, Decimal(cost),  # all of it input: cost_total is the sum of the cost_ columns
    ]  # fmt: skip


def at(day: int, hour: int = 12, minute: int = 0, second: int = 0, ms: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, second, ms * 1000, tzinfo=UTC)


async def new_team(billing: httpx.AsyncClient, name: str) -> tuple[str, str]:
    """(team_id, key secret)."""
    team = (await billing.post("/v1/admin/teams", json={"name": name}, headers=ADMIN)).json()
    key = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
    return team["team_id"], key["key"]


async def usage(billing: httpx.AsyncClient, headers: dict[str, str], **params: str) -> httpx.Response:
    return await billing.get("/v1/usage", params=params, headers=headers)


async def test_duplicate_event_ids_count_once_and_cost_sums_exactly(billing, store, unique):
    team, _ = await new_team(billing, f"t-{unique}")
    dup = uuid.uuid4()
    await store.insert_rows(
        "usage_events",
        [
            event(team, at(1), cost="0.1", event_id=dup),
            event(team, at(2), cost="0.2"),
            event(team, at(3), cost="0.000000000000000001", prompt=7, completion=3, cached=2),
        ],
        COLUMNS,
    )
    # The same event again, as a redelivery would write it (a later row_version, so not byte-identical).
    await store.insert_rows("usage_events", [event(team, at(1), cost="0.1", event_id=dup, row_version=2)], COLUMNS)
    raw = await store.query("SELECT count() FROM {db}.usage_events")
    assert raw[0][0] == 4  # both copies are stored: only FINAL makes them one

    r = await usage(billing, ADMIN, team=team, **MARCH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["team_id"] == team and body["group_by"] is None and body["groups"] == []
    assert body["from"] == "2026-03-01T00:00:00Z" and body["to"] == "2026-04-01T00:00:00Z"
    assert body["totals"] == {
        "requests": 3,
        "prompt_tokens": 207,
        "completion_tokens": 23,
        "cached_tokens": 2,
        "total_tokens": 230,
        "cost_usd": "0.300000000000000001",
        "unpriced_requests": 0,
        # Added with the ledger: what cost_usd prices (every row here is a priced ok call) and cache hits.
        "adjustments_usd": "0",
        "billed_requests": 3,
        "billed_input_tokens": 205,
        "billed_cached_input_tokens": 2,
        "billed_output_tokens": 23,
        "cache_hits": 0,
        "cache_hit_prompt_tokens": 0,
        "cache_hit_completion_tokens": 0,
        # Added with the cost header (issue 16): these rows carry no quote from a proxy.
        "quoted_requests": 0,
        "quoted_usd": "0",
        "quote_differences": 0,
        # Added with the price dimensions: the other quantities and cost_usd by dimension.
        "cache_write_tokens": 0,
        "cache_write_1h_tokens": 0,
        "web_search_requests": 0,
        "billed_cache_write_tokens": 0,
        "billed_cache_write_1h_tokens": 0,
        "billed_fee_requests": 3,
        "billed_web_search_requests": 0,
        "cost_input_usd": "0.300000000000000001",
        "cost_cached_input_usd": "0",
        "cost_cache_write_usd": "0",
        "cost_cache_write_1h_usd": "0",
        "cost_output_usd": "0",
        "cost_request_usd": "0",
        "cost_web_search_usd": "0",
    }
    assert Decimal(body["totals"]["cost_usd"]) == Decimal("0.1") + Decimal("0.2") + Decimal("1e-18")


async def test_quoted_and_billed_amounts_are_compared_per_group(billing, store, unique):
    team, _ = await new_team(billing, f"t-{unique}")
    cols = (*COLUMNS, "quoted_cost_usd", "quoted_price_version")
    same = [*event(team, at(1), cost="0.000123", served="gpt-4.1"), "0.000123", "v"]
    # told before a price change the meter priced with: told 0.0002, billed 0.0003
    moved = [*event(team, at(1), cost="0.0003", served="gpt-4.1"), "0.0002", "v"]
    silent = [*event(team, at(2), cost="0.5", served="gpt-4.1-mini"), "", ""]  # a stream without include_usage
    cached = [*event(team, at(2), cost="0", served="gpt-4.1-mini"), "0", "v"]
    cached[COLUMNS.index("status")] = "cached"
    dup_id = uuid.uuid4()
    dup = [*event(team, at(3), cost="0.7", served="gpt-4.1-mini", event_id=dup_id), "0.7", "v"]
    await store.insert_rows("usage_events", [same, moved, silent, cached, dup], cols)
    again = [*event(team, at(3), cost="0.7", served="gpt-4.1-mini", event_id=dup_id, row_version=2), "0.7", "v"]
    await store.insert_rows("usage_events", [again], cols)  # a redelivery: still one quote

    body = (await usage(billing, ADMIN, team=team, group_by="model", **MARCH)).json()
    by = {g["model"]: g for g in body["groups"]}
    assert (by["gpt-4.1"]["quoted_requests"], by["gpt-4.1"]["quoted_usd"], by["gpt-4.1"]["quote_differences"]) == (
        2, "0.000323", 1)  # fmt: skip
    assert by["gpt-4.1"]["cost_usd"] == "0.000423"
    mini = by["gpt-4.1-mini"]
    assert (mini["quoted_requests"], mini["quoted_usd"], mini["quote_differences"]) == (2, "0.7", 0)
    t = body["totals"]
    assert (t["quoted_requests"], t["quoted_usd"], t["quote_differences"]) == (4, "0.700323", 1)


async def test_group_by_model_falls_back_to_the_requested_model(billing, store, unique):
    team, _ = await new_team(billing, f"t-{unique}")
    rows = [
        event(team, at(1), served="gpt-4.1", cost="1.25"),
        event(team, at(2), served="gpt-4.1", cost="0.75"),
        event(team, at(3), served="", requested="claude-sonnet", cost="0", priced=False),
        event(team, at(4), served="deepseek-v3.2", requested="deepseek-chat", cost="0.000028"),
    ]
    await store.insert_rows("usage_events", rows, COLUMNS)
    body = (await usage(billing, ADMIN, team=team, group_by="model", **MARCH)).json()
    assert body["group_by"] == "model"
    assert [(g["model"], g["requests"], g["cost_usd"], g["unpriced_requests"]) for g in body["groups"]] == [
        ("claude-sonnet", 1, "0", 1),
        ("deepseek-v3.2", 1, "0.000028", 0),
        ("gpt-4.1", 2, "2", 0),
    ]
    assert body["totals"]["requests"] == 4 and body["totals"]["unpriced_requests"] == 1
    assert body["totals"]["cost_usd"] == "2.000028"


async def test_group_by_day_uses_utc_days_and_a_date_to_covers_that_day(billing, store, unique):
    team, _ = await new_team(billing, f"t-{unique}")
    rows = [
        event(team, at(1, 23, 59, 59, 999), prompt=1, completion=0),
        event(team, at(2, 0, 0, 0, 0), prompt=2, completion=0),
        event(team, at(2, 23, 59, 59, 999), prompt=4, completion=0),
        event(team, at(3, 0, 0, 0, 0), prompt=8, completion=0),
        event(team, datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC), prompt=16, completion=0),
    ]
    await store.insert_rows("usage_events", rows, COLUMNS)
    body = (await usage(billing, ADMIN, team=team, group_by="day", **{"from": "2026-03-01", "to": "2026-03-02"})).json()
    assert [(g["day"], g["prompt_tokens"]) for g in body["groups"]] == [("2026-03-01", 1), ("2026-03-02", 6)]
    assert body["totals"]["prompt_tokens"] == 7
    # Datetime bounds are [from, to): the event at exactly `to` is out.
    body = (
        await usage(billing, ADMIN, team=team, **{"from": "2026-03-02T00:00:00Z", "to": "2026-03-03T00:00:00Z"})
    ).json()
    assert body["totals"]["prompt_tokens"] == 6


async def test_group_by_key_and_staff_view_of_all_teams(billing, store, unique):
    a, _ = await new_team(billing, f"a-{unique}")
    b, _ = await new_team(billing, f"b-{unique}")
    rows = [
        event(a, at(5), key_id="key_1", cost="0.5"),
        event(a, at(6), key_id="key_2", cost="0.25"),
        event(a, at(7), key_id="key_1", cost="0.125"),
        event(b, at(8), key_id="key_3", cost="1"),
    ]
    await store.insert_rows("usage_events", rows, COLUMNS)
    body = (await usage(billing, ADMIN, team=a, group_by="key", **MARCH)).json()
    assert [(g["key_id"], g["requests"], g["cost_usd"]) for g in body["groups"]] == [
        ("key_1", 2, "0.625"),
        ("key_2", 1, "0.25"),
    ]
    everyone = (await usage(billing, FINANCE, group_by="key", **MARCH)).json()
    assert everyone["team_id"] is None
    assert [g["key_id"] for g in everyone["groups"]] == ["key_1", "key_2", "key_3"]
    assert everyone["totals"]["cost_usd"] == "1.875"
    by_name = (await usage(billing, ADMIN, team=f"b-{unique}", **MARCH)).json()
    assert by_name["team_id"] == b and by_name["totals"]["cost_usd"] == "1"


async def test_a_team_key_reads_only_its_own_team(billing, store, unique):
    a, key_a = await new_team(billing, f"a-{unique}")
    b, _ = await new_team(billing, f"b-{unique}")
    await store.insert_rows("usage_events", [event(a, at(1), cost="1"), event(b, at(1), cost="2")], COLUMNS)
    as_a = {"Authorization": f"Bearer {key_a}"}

    own = (await usage(billing, as_a, **MARCH)).json()
    assert own["team_id"] == a and own["totals"]["cost_usd"] == "1"
    assert (await usage(billing, {"X-API-Key": key_a}, team=a, **MARCH)).json()["totals"]["cost_usd"] == "1"
    for other in (b, f"b-{unique}", "team_unknown"):
        r = await usage(billing, as_a, team=other, **MARCH)
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    r = await usage(billing, FINANCE, team=b, **MARCH)
    assert r.status_code == 200 and r.json()["totals"]["cost_usd"] == "2"


async def test_usage_needs_a_valid_credential(billing, unique):
    _, key = await new_team(billing, f"t-{unique}")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {key}"}):
        r = await usage(billing, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_default_range_is_this_month(billing, store, unique):
    team, _ = await new_team(billing, f"t-{unique}")
    now = datetime.now(UTC)
    await store.insert_rows(
        "usage_events", [event(team, now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))], COLUMNS
    )
    body = (await usage(billing, ADMIN, team=team)).json()
    assert body["from"] == now.strftime("%Y-%m-01T00:00:00Z")
    assert body["totals"]["requests"] == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"group_by": "team"}, "group_by"),
        ({"group_by": "model;DROP TABLE x"}, "group_by"),
        ({"from": "last tuesday"}, "from"),
        ({"to": "2026-02-30"}, "to"),
        ({"from": "2026-03-05", "to": "2026-03-01"}, "from"),
        ({"from": "0001-01-01"}, "from"),
    ],
)
async def test_bad_parameters_are_400_in_openai_shape(billing, unique, params, field):
    team, _ = await new_team(billing, f"t-{unique}")
    r = await usage(billing, ADMIN, team=team, **params)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request_error"
    assert err["message"].startswith(f"{field}:")


async def test_unknown_team_for_staff_is_404(billing):
    r = await usage(billing, ADMIN, team="team_nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "team_not_found"
