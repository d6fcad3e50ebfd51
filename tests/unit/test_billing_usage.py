"""Usage report building: range and group_by validation, parameterised SQL, exact totals."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from schemas.money import plain
from services.billing.errors import InvalidRequest
from services.billing.usage import (
    build_query,
    parse_group_by,
    parse_instant,
    parse_range,
    shape_report,
)

NOW = datetime(2026, 11, 23, 15, 30, tzinfo=UTC)


def test_default_range_is_the_current_utc_month_up_to_now():
    assert parse_range(None, None, NOW) == (datetime(2026, 11, 1, tzinfo=UTC), NOW)


def test_dates_and_datetimes_become_utc_instants():
    assert parse_instant("2026-03-01", "from") == datetime(2026, 3, 1, tzinfo=UTC)
    # A bare date as `to` covers that whole day.
    assert parse_instant("2026-03-01", "to", end=True) == datetime(2026, 3, 2, tzinfo=UTC)
    assert parse_instant("2026-03-01T10:00:00Z", "from") == datetime(2026, 3, 1, 10, tzinfo=UTC)
    assert parse_instant("2026-03-01T12:00:00+02:00", "from") == datetime(2026, 3, 1, 10, tzinfo=UTC)
    assert parse_instant("2026-03-01T10:00:00", "from") == datetime(2026, 3, 1, 10, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "2026-02-30", "01/03/2026", "2026-03-01T25:00"])
def test_bad_instants_are_invalid_requests(bad: str):
    with pytest.raises(InvalidRequest, match="from: expected an ISO date"):
        parse_range(bad, None, NOW)


def test_range_must_be_ordered_and_representable():
    with pytest.raises(InvalidRequest, match="earlier than"):
        parse_range("2026-03-02", "2026-03-01T00:00:00Z", NOW)
    with pytest.raises(InvalidRequest, match="between 1900"):
        parse_range("1800-01-01", None, NOW)
    with pytest.raises(InvalidRequest, match="between 1900"):
        parse_range(None, "9999-01-01", NOW)


def test_group_by_accepts_model_day_key_or_none():
    assert parse_group_by(None) is None
    assert parse_group_by("none") is None
    assert [parse_group_by(g) for g in ("model", "day", "key")] == ["model", "day", "key"]
    for bad in ("team", "MODEL", "model; DROP TABLE x"):
        with pytest.raises(InvalidRequest, match="group_by"):
            parse_group_by(bad)


def test_query_reads_final_and_binds_every_user_value():
    start, end = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    team = "team_x' OR 1=1 --"
    sql, params = build_query(team, start, end, "model")
    assert "FROM {db}.usage_events FINAL" in sql and "FROM {db}.usage_adjustments FINAL" in sql
    assert team not in sql and "2026" not in sql
    assert "{team:String}" in sql and "{start:DateTime64(6, 'UTC')}" in sql
    assert params == {"team": team, "start": start, "end": end}
    assert "x.model AS g" in sql and "if(served_model = '', requested_model, served_model) AS model" in sql
    assert sql.rstrip().endswith("GROUP BY g\nORDER BY g")


def test_query_without_team_or_grouping_covers_all_teams_in_one_row():
    sql, params = build_query(None, NOW, NOW, None)
    assert "{team:String}" not in sql and "GROUP BY g" not in sql
    assert set(params) == {"start", "end"}
    assert "toDate(x.occurred_at, 'UTC') AS g" in build_query(None, NOW, NOW, "day")[0]
    assert "x.key_id AS g" in build_query(None, NOW, NOW, "key")[0]


def _row(g: object, requests: int, cost: str, unpriced: int = 0) -> dict[str, object]:
    return {
        "g": g,
        "requests": requests,
        "prompt_tokens": 10 * requests,
        "completion_tokens": 5 * requests,
        "cached_tokens": requests,
        "cost_usd": Decimal(cost),
        "unpriced_requests": unpriced,
        "adjustments_usd": Decimal(0),
        "billed_requests": requests - unpriced,
        "billed_input_tokens": 9 * requests,
        "billed_cached_input_tokens": requests,
        "billed_output_tokens": 5 * requests,
        "cache_hits": 0,
        "cache_hit_prompt_tokens": 0,
        "cache_hit_completion_tokens": 0,
        "quoted_requests": requests,
        "quoted_usd": Decimal(cost) + Decimal(unpriced),  # an unpriced call is told its amount here: 1 differs
        "quote_differences": unpriced,
        # the price dimensions (issue 15): a cache write and a web search per request, cost split by dimension
        "cache_write_tokens": 2 * requests,
        "cache_write_1h_tokens": 0,
        "web_search_requests": requests,
        "billed_cache_write_tokens": 2 * (requests - unpriced),
        "billed_cache_write_1h_tokens": 0,
        "billed_fee_requests": requests - unpriced,
        "billed_web_search_requests": requests - unpriced,
        "cost_input_usd": Decimal(cost) / 2,
        "cost_cached_input_usd": Decimal(0),
        "cost_cache_write_usd": Decimal(0),
        "cost_cache_write_1h_usd": Decimal(0),
        "cost_output_usd": Decimal(0),
        "cost_request_usd": Decimal(0),
        "cost_web_search_usd": Decimal(cost) / 2,
    }


def test_report_totals_are_the_exact_sum_of_groups():
    rows = [_row(date(2026, 3, 1), 2, "0.1"), _row(date(2026, 3, 2), 1, "0.2", unpriced=1)]
    start, end = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    report = shape_report(rows, "team_x", start, end, "day")
    assert report["from"] == "2026-03-01T00:00:00Z" and report["to"] == "2026-04-01T00:00:00Z"
    assert report["totals"] == {
        "requests": 3,
        "prompt_tokens": 30,
        "completion_tokens": 15,
        "cached_tokens": 3,
        "total_tokens": 45,
        "cost_usd": "0.3",  # 0.1 + 0.2 as floats would be 0.30000000000000004
        "unpriced_requests": 1,
        "adjustments_usd": "0",
        "billed_requests": 2,
        "billed_input_tokens": 27,
        "billed_cached_input_tokens": 3,
        "billed_output_tokens": 15,
        "cache_hits": 0,
        "cache_hit_prompt_tokens": 0,
        "cache_hit_completion_tokens": 0,
        "quoted_requests": 3,
        "quoted_usd": "1.3",
        "quote_differences": 1,
        "cache_write_tokens": 6,
        "cache_write_1h_tokens": 0,
        "web_search_requests": 3,
        "billed_cache_write_tokens": 4,
        "billed_cache_write_1h_tokens": 0,
        "billed_fee_requests": 2,
        "billed_web_search_requests": 2,
        "cost_input_usd": "0.15",
        "cost_cached_input_usd": "0",
        "cost_cache_write_usd": "0",
        "cost_cache_write_1h_usd": "0",
        "cost_output_usd": "0",
        "cost_request_usd": "0",
        "cost_web_search_usd": "0.15",
    }
    assert [g["day"] for g in report["groups"]] == ["2026-03-01", "2026-03-02"]
    assert report["groups"][0]["cost_usd"] == "0.1"


def test_money_is_plain_decimal_notation():
    assert plain(Decimal("0E-18")) == "0"
    assert plain(Decimal("1.500000000000000000")) == "1.5"
    assert plain(Decimal("100.000000000000000000")) == "100"
    assert plain(Decimal("0.000000000000000001")) == "0.000000000000000001"


def test_models_the_config_does_not_know_merge_into_one_group():
    from schemas.config import load_config

    rows = [_row("gpt-4.1", 2, "0.5"), _row("made-up-1", 1, "0"), _row("\x1b[31mevil", 3, "0")]
    report = shape_report(rows, "team_x", NOW, NOW, "model", load_config("tollway.yaml"))
    assert [(g["model"], g["requests"]) for g in report["groups"]] == [("(unknown)", 4), ("gpt-4.1", 2)]
    assert report["totals"]["requests"] == 6
