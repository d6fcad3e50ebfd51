"""The meter's Arrow insert stores exactly what clickhouse-connect's column insert stored: every Decimal
amount and unit price, timestamps (UTC, floored to the millisecond), UUIDs, maps, nulls, for the edge cases."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace

import orjson

from schemas.config import load_config, parse_config
from schemas.prices import PriceBook
from services.meter.encode import ipc, table_of
from services.meter.reference import decode_and_price, decode_rows
from services.meter.row import COLUMNS, INGESTED_AT
from services.meter.writer import TABLE, UsageWriter
from tests.support.events import make_event

CONFIG = load_config("tollway.yaml")
INGESTED = datetime(2026, 11, 23, 9, 30, 15, 123987, tzinfo=UTC)


def edge_values(team: str) -> list[bytes]:
    base = datetime(2026, 11, 22, 23, 59, 59, 999999, tzinfo=UTC)
    events = [
        make_event(team, prompt_tokens=0, completion_tokens=0),  # nothing to price
        make_event(team, prompt_tokens=10**15, completion_tokens=10**15 + 7, cached_tokens=3 * 10**14),  # huge
        make_event(team, prompt_tokens=100, completion_tokens=5, cached_tokens=1_000),  # cached > prompt
        make_event(team, metadata={"projet": "été ☃ 日本", "": "", "k": "𝄞"}, end_user="ユーザー"),  # unicode
        make_event(team, ttft_ms=None, stream=True, latency_ms=0),
        make_event(team, ttft_ms=12.5, stream=True, latency_ms=1e-3, status="error", error_code="upstream_502"),
        make_event(team, status="cached", cache_hit=True),
        make_event(team, status="rejected", http_status=429, prompt_tokens=0, completion_tokens=0),
        make_event(team, requested_model="no-such-model", served_model="no-such-model"),  # held: unpriced
        make_event(team, occurred_at=base),  # sub-millisecond part floored, day boundary
        make_event(team, occurred_at=datetime(2026, 1, 1, 0, 0, 0, 500, tzinfo=UTC)),
        make_event(team, occurred_at=datetime(2026, 11, 23, 5, 0, 0, 1000, tzinfo=timezone(timedelta(hours=5)))),
        make_event(team, proxy_seq=2**64 - 1, attempts=65_535, http_status=999),
    ]
    values = [e.to_bytes() for e in events]
    # What a different writer might send: an offset timestamp, missing defaults, an extra field (pydantic path).
    d = orjson.loads(values[0])
    d.update(occurred_at="2026-11-23T10:00:00.123456+02:00", prompt_tokens=7)
    del d["served_model"], d["ttft_ms"]
    d["new_field"] = {"x": 1}
    values.append(orjson.dumps(d))
    d = orjson.loads(make_event(team, event_id="01A2092E-F774-768F-8155-88505E895D73").to_bytes())
    d["event_id"] = d["event_id"].upper()  # normalised by pydantic
    values.append(orjson.dumps(d))
    # Every price dimension (tollway.yaml's 2026-12-01 entries): cache writes, web searches, long context, a tier.
    values += [e.to_bytes() for e in (
        make_event(team, requested_model="claude-sonnet-4.5", served_model="claude-sonnet-4.5", provider="anthropic",
                   prompt_tokens=250_001, completion_tokens=77, cached_tokens=1_000, cache_write_tokens=333,
                   cache_write_1h_tokens=7, web_search_requests=2),
        make_event(team, prompt_tokens=999, completion_tokens=3, cached_tokens=9, service_tier="priority",
                   web_search_requests=1),
    )]  # fmt: skip
    return values


def records(values: list[bytes]) -> list[SimpleNamespace]:
    return [SimpleNamespace(topic="t", partition=3, offset=i, key=b"k", value=v) for i, v in enumerate(values)]


async def read_back(store, team: str) -> list[tuple]:
    cols = ", ".join(c for c in COLUMNS if c != "ingested_at")
    return await store.query(f"SELECT {cols}, toUnixTimestamp64Milli(occurred_at), toUnixTimestamp64Milli("
                             f"ingested_at) FROM {{db}}.{TABLE} WHERE team_id = {{t:String}} ORDER BY kafka_offset",
                             {"t": team})  # fmt: skip


async def insert_both_ways(store, values: list[bytes], team: str, book: PriceBook) -> tuple[list, list]:
    rows, _, _, dead = decode_rows(records(values), book)
    assert not dead and len(rows) == len(values)
    n = len(rows)
    # The reference's Python values through clickhouse-connect's column insert, into a twin team id.
    old_cols = [list(c) for c in zip(*rows, strict=True)]
    old_cols[COLUMNS.index("team_id")] = [f"{team}-old"] * n
    old_cols[INGESTED_AT] = [INGESTED] * n
    await store.insert_columns(TABLE, old_cols, COLUMNS)
    # The same values as the meter's batch form (encode.table_of) and its Arrow insert, with the same ingested_at.
    new_cols = [list(c) for c in zip(*rows, strict=True)]
    new_cols[COLUMNS.index("team_id")] = [f"{team}-new"] * n
    await store.insert_raw(TABLE, ipc(table_of(new_cols, n), INGESTED), COLUMNS, "ArrowStream")
    old, new = await read_back(store, f"{team}-old"), await read_back(store, f"{team}-new")
    team_at = COLUMNS.index("team_id")
    strip = lambda rows: [r[:team_at] + r[team_at + 1 :] for r in rows]  # noqa: E731
    return strip(old), strip(new)


async def test_arrow_insert_stores_exactly_what_the_column_insert_stored(store, unique):
    old, new = await insert_both_ways(store, edge_values(f"team_{unique}"), f"team_{unique}", PriceBook(CONFIG))
    assert len(new) == len(old) == 17
    assert new == old
    by = {c: i for i, c in enumerate(c for c in COLUMNS if c not in ("ingested_at", "team_id"))}
    for row in new:
        for c in ("cost_input", "cost_cached_input", "cost_output", "cost_total", "unit_input", "cost_cache_write",
                  "cost_cache_write_1h", "cost_request", "cost_web_search", "unit_web_search"):  # fmt: skip
            assert isinstance(row[by[c]], Decimal)
    long, tier = new[15], new[16]
    assert (long[by["price_tier"]], tier[by["price_tier"]]) == ("long_context", "priority")
    assert long[by["cost_cache_write"]] == 333 * Decimal("7.5") / 10**6  # above 200K: the long-context rate
    assert long[by["cost_web_search"]] == 2 * Decimal(10) / 1000 and long[by["unit_cache_write_1h"]] == 12
    assert tier[by["cost_input"]] == 990 * Decimal("3.5") / 10**6 and tier[by["unit_output"]] == 14
    assert long[by["cost_total"]] == sum(long[by[f"cost_{d}"]] for d in ("input", "cached_input", "cache_write",
                                         "cache_write_1h", "output", "request", "web_search"))  # fmt: skip
    huge = new[1]
    assert huge[by["cost_output"]] == Decimal(10**15 + 7) * Decimal("8.00") / Decimal(10**6)
    assert huge[by["cost_total"]] == huge[by["cost_input"]] + huge[by["cost_cached_input"]] + huge[by["cost_output"]]
    assert new[2][by["cost_input"]] == 0 and new[2][by["cost_cached_input"]] > 0  # cached capped at prompt
    assert new[3][by["metadata"]] == {"projet": "été ☃ 日本", "": "", "k": "𝄞"} and new[3][by["end_user"]] == "ユーザー"
    assert new[4][by["ttft_ms"]] is None and new[5][by["ttft_ms"]] == 12.5
    assert new[8][by["priced"]] is False
    assert new[9][-2] == int(datetime(2026, 11, 22, 23, 59, 59, 999000, tzinfo=UTC).timestamp() * 1000)
    assert new[11][-2] == int(datetime(2026, 11, 23, 0, 0, 0, 1000, tzinfo=UTC).timestamp() * 1000)
    assert new[13][-2] == int(datetime(2026, 11, 23, 8, 0, 0, 123000, tzinfo=UTC).timestamp() * 1000)
    assert new[0][-1] == int(INGESTED.replace(microsecond=123000).timestamp() * 1000)  # floored: .123987 -> .123
    assert new[12][by["proxy_seq"]] == 2**64 - 1 and new[12][by["attempts"]] == 65_535
    assert str(new[14][by["event_id"]]) == "01a2092e-f774-768f-8155-88505e895d73"


async def test_prices_with_more_digits_than_the_column_are_truncated_the_same_way(store, unique):
    # 13 decimals in a unit price: cost = tokens * price / 1e6 carries 19+ fractional digits, more than
    # Decimal(38, 18) holds, and the unit itself more than Decimal(38, 12) holds.
    raw = CONFIG.model_dump(mode="json")
    model = next(iter(raw["models"]))
    for p in raw["models"][model]["prices"]:
        p.update(input="1.0000000000007", output="3.3333333333333", cached_input="0.1234567890123")
    for r in raw["models"][model].get("routes", []):
        r["prices"] = None
    book = PriceBook(parse_config(raw))
    team = f"team_{unique}"
    values = [make_event(team, requested_model=model, served_model=model, prompt_tokens=n, completion_tokens=n + 1,
                         cached_tokens=n // 3).to_bytes() for n in (1, 7, 999_999, 123_456_789_012)]  # fmt: skip
    old, new = await insert_both_ways(store, values, team, book)
    assert new == old
    cost_output = COLUMNS.index("cost_output") - 1  # team_id stripped (ingested_at comes after)
    assert new[0][cost_output] == Decimal("0.000006666666666666")  # 2 * 3.3333333333333 / 1e6, truncated


async def test_a_value_no_column_holds_is_a_dead_letter_and_the_rest_is_stored(store, unique):
    # A unit price of 10^26 does not fit Decimal(38, 12); with no tokens its cost is 0, so only the Arrow
    # conversion finds it. (Before the one batch form, the writer fell back to a column insert here.)
    raw = CONFIG.model_dump(mode="json")
    model = next(iter(raw["models"]))
    for p in raw["models"][model]["prices"]:
        p.update(input=str(10**26))
    for r in raw["models"][model].get("routes", []):
        r["prices"] = None
    book = PriceBook(parse_config(raw))
    team = f"team_{unique}"
    bad = make_event(team, requested_model=model, served_model=model, prompt_tokens=0, completion_tokens=0)
    good = make_event(team, requested_model="no-such-model", served_model="no-such-model")
    batch, dead = decode_and_price(records([good.to_bytes(), bad.to_bytes()]), book)
    assert batch.rows == 1 and [d.offset for d in dead] == [1] and "exceeds its column" in dead[0].reason
    assert batch.spans == {("t", 3): (0, 1)}
    assert await UsageWriter(store).insert(batch, asyncio.Event())
    rows = await store.query("SELECT event_id FROM {db}.usage_events WHERE team_id = {t:String}", {"t": team})
    assert [str(r[0]) for r in rows] == [good.event_id]


def test_counts_beyond_their_column_are_dead_letters_not_a_stuck_batch():
    ok = make_event("t").to_bytes()
    # Beyond 64 bits orjson refuses to write or read a number: pydantic (the slow path) takes those.
    big = lambda field, n: make_event("t").to_bytes().replace(f'"{field}":'.encode(), f'"{field}":{n},"x":'.encode())  # noqa: E731
    bad = [make_event("t", attempts=70_000).to_bytes(), big("proxy_seq", 2**64), big("prompt_tokens", 2**70)]
    batch, dead = decode_and_price(records([ok, *bad]), PriceBook(CONFIG))
    assert batch.rows == 1 and [d.offset for d in dead] == [1, 2, 3]
    assert all("exceeds its column" in d.reason for d in dead)
    assert batch.spans == {("t", 3): (0, 3)}  # the dead still count for the commit


async def test_a_retried_arrow_insert_with_the_same_token_is_dropped(store, unique):
    team = f"team_{unique}"
    batch, _ = decode_and_price(records([make_event(team).to_bytes() for _ in range(50)]), PriceBook(CONFIG))
    for _ in range(3):
        await store.insert_raw(TABLE, ipc(batch.table, datetime.now(UTC)), COLUMNS, "ArrowStream",
                               dedup_token=batch.dedup_token())  # fmt: skip
    rows = await store.query("SELECT count() FROM {db}.usage_events WHERE team_id = {t:String}", {"t": team})
    assert rows[0][0] == 50  # raw rows, not FINAL: the retries never reached the table
