"""The columnar meter path stores exactly what the per-record reference (`decode_and_price`) stores.

Generated batches mix events as the proxy writes them with everything a broken or different writer could
send; both paths must give the same rows (compared as the Arrow bytes ClickHouse receives, ordered by offset),
the same dead letters in the same order, the same spans and the same unpriced count."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace
from unittest.mock import patch

import orjson
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from schemas.config import load_config, parse_config
from schemas.prices import PriceBook
from services.meter import columnar
from services.meter.columnar import decode_and_price_columnar
from services.meter.encode import ipc
from services.meter.reference import decode_and_price
from tests.support.events import make_event

CONFIG = load_config("tollway.yaml")
BOOK = PriceBook(CONFIG)
INGESTED = datetime(2026, 11, 23, 9, 30, 15, 123000, tzinfo=UTC)
BASE = orjson.loads(make_event("team-a").to_bytes())
FIELDS = sorted(BASE)


def odd_book() -> PriceBook:
    """Prices the columnar path must refuse (too many digits) or bound (28-digit rounding), next to plain ones."""
    raw = CONFIG.model_dump(mode="json")
    model = raw["models"]["gpt-4.1"]
    model["prices"] = [
        {"effective_from": "2020-01-01", "input": "1.0000000000007", "output": "3.3333333333333",
         "cached_input": "0.1234567890123"},  # 13 fractional digits: more than Decimal(38, 12)
        {"effective_from": "2024-01-01", "input": "1234567.123456789012", "output": "8.000000000000",
         "cached_input": "0"},  # a 19-digit coefficient: big token counts round in a 28-digit context
        {"effective_from": "2026-01-01", "input": "2.00", "output": "8.00", "cached_input": "0.50"},
    ]  # fmt: skip
    for route in model.get("routes", []):
        route["prices"] = [{"effective_from": "2025-06-01", "input": "99999999999999.999999999999",
                            "output": "0.000000000001", "cached_input": None}]  # fmt: skip
    return PriceBook(parse_config(raw))


ODD_BOOK = odd_book()


def dimension_book() -> PriceBook:
    """Prices in every dimension (schemas/prices.py): cache writes, fees, a long-context tier that generated
    prompts cross, service tiers; on the model and on a route, next to a plain older entry."""
    raw = CONFIG.model_dump(mode="json")
    model = raw["models"]["gpt-4.1"]
    model["prices"] = [
        {"effective_from": "2020-01-01", "input": "2.00", "output": "8.00", "cached_input": "0.50"},
        {"effective_from": "2024-01-01", "input": "3", "output": "15", "cached_input": "0.30", "cache_write": "3.75",
         "cache_write_1h": "6", "request": "0.0004", "web_search": "10",
         "long_context": {"above_prompt_tokens": 2000, "input": "6", "output": "22.5", "cached_input": "0.6",
                          "cache_write": "7.5", "cache_write_1h": "12"},
         "service_tiers": {"flex": {"input": "1.5", "output": "7.5"},
                           "priority": {"input": "5.000000000001", "output": "25", "cache_write": "0.000000000003"}}},
    ]  # fmt: skip
    for route in model.get("routes", []):
        route["prices"] = [{"effective_from": "2025-06-01", "input": "1", "output": "2", "web_search": "25.5",
                            "request": "0.01", "long_context": {"above_prompt_tokens": 100, "input": "2"},
                            "service_tiers": {"batch": {"input": "0.5", "output": "1", "cached_input": "0.05"}}}]  # fmt: skip
    return PriceBook(parse_config(raw))


DIMENSION_BOOK = dimension_book()


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


CHARS = st.sampled_from(["a", "é", "日", "𝄞", "\x00", '"', "\\", "\n", "\u2028"])


def around(bound: int, low: int = 0) -> st.SearchStrategy[str]:
    """Strings of code points at a contract bound (one past it comes from BAD)."""
    return st.builds(lambda c, k: c * k, CHARS, st.sampled_from([low, low + 1, bound - 1, bound]))


def text(bound: int, low: int = 0) -> st.SearchStrategy[str]:
    return st.one_of(st.text(min_size=low, max_size=8), around(bound, low),
                     st.sampled_from(["gpt-4.1", "gpt-4.1-mini", "no-such-model", "openai"]))  # fmt: skip


TOKENS = st.one_of(
    st.integers(0, 5_000),
    st.integers(0, 2**64 - 1),
    st.integers(10**8, 10**14),
    st.sampled_from([0, 10**15, 10**19, 2**63, 2**64 - 1]),
)
UTC_WHEN = st.datetimes(datetime(2019, 1, 1), datetime(2031, 1, 1), timezones=st.just(UTC)).map(iso)
ODD_WHEN = st.one_of(
    st.datetimes(datetime(1965, 1, 1), datetime(2031, 1, 1),
                 timezones=st.sampled_from([timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8)),
                                            UTC])).map(lambda d: d.isoformat()),
    st.datetimes(datetime(2019, 1, 1), datetime(2031, 1, 1)).map(lambda d: d.isoformat()),  # naive
    st.sampled_from(["2026-11-22T10:00:00Z", "2026-11-22T10:00:00.000000Z", "2026-11-22T10:00:00.123Z",
                     "2026-11-22T10:00:00.1234567Z", "2026-02-30T10:00:00Z", "2026-02-29T10:00:00Z",
                     "2028-02-29T23:59:59.999999Z", "2026-11-22T23:59:60Z", "2026-11-22T24:00:00Z",
                     "1969-12-31T23:59:59.999999Z", "1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z",
                     "2026-11-22 10:00:00Z", "2026-11-22T10:00:00z", "2026-11-22T10:00:00+00:00", "2026-11-22",
                     "9999-12-31T23:59:59.999999Z", "2026-13-01T00:00:00Z", "2026-04-31T00:00:00Z", ""]),
)  # fmt: skip
# Values of another type or beyond a bound, put in any field.
BAD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([70_000, 65_535, 65_536, 999, 1000, -0.0, 1.0,
    1e300, 0.5, -1, 2**64, 2**70, "x" * 65, "é" * 129, "𝄞" * 201, "x" * 257, BASE["event_id"].upper(),
    BASE["event_id"].replace("-", ""), BASE["event_id"] + " ", "0" * 36]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=3), ODD_WHEN,
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.one_of(st.text(max_size=2),
    st.integers(), st.none()), max_size=2), st.sampled_from(["ok", "cached", "rejected", "estimated"]),
)  # fmt: skip


@st.composite
def event(draw) -> dict:
    d = dict(BASE)
    d.update(
        event_id=draw(st.uuids().map(str)),
        occurred_at=draw(UTC_WHEN),
        team_id=draw(text(64, low=1)),
        request_id=draw(text(200)),
        key_id=draw(text(64)),
        end_user=draw(st.one_of(st.none(), text(256))),
        requested_model=draw(text(256)),
        served_model=draw(st.one_of(st.sampled_from(["", "gpt-4.1", "gpt-4.1-mini", "deepseek-v3.2"]), text(256))),
        provider=draw(st.one_of(st.sampled_from(["openai", "deepseek", "other", ""]), around(128))),
        status=draw(st.sampled_from(["ok", "error", "cached", "rejected"])),
        http_status=draw(st.sampled_from([200, 0, 429, 999])),
        error_code=draw(st.one_of(st.none(), text(128))),
        prompt_tokens=draw(TOKENS), completion_tokens=draw(TOKENS), cached_tokens=draw(TOKENS),
        latency_ms=draw(st.one_of(st.floats(0, 1e12), st.integers(0, 2**64 - 1))),
        ttft_ms=draw(st.one_of(st.none(), st.floats(0, 1e6))),
        attempts=draw(st.sampled_from([0, 1, 3, 65_535, 65_536])),
        stream=draw(st.booleans()), cache_hit=draw(st.booleans()),
        proxy_instance=draw(text(128)), proxy_seq=draw(TOKENS),
        usage_source=draw(st.sampled_from(["provider", "estimated"])),
        cache_write_tokens=draw(TOKENS), cache_write_1h_tokens=draw(TOKENS),
        web_search_requests=draw(st.one_of(st.integers(0, 40), st.sampled_from([2**32 - 1, 2**32]))),
        service_tier=draw(st.one_of(st.sampled_from(["", "flex", "priority", "batch", "default"]), around(64))),
    )  # fmt: skip
    if draw(st.integers(0, 3)) == 0:  # a field or two of another type or value, missing fields, an extra field
        d.update(draw(st.dictionaries(st.sampled_from(FIELDS), BAD, max_size=2)))
        for name in draw(st.sets(st.sampled_from(FIELDS), max_size=2)):
            d.pop(name, None)
        if draw(st.booleans()):
            d["newer_field"] = draw(BAD)
    if draw(st.integers(0, 5)) == 0:
        d["metadata"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), min_size=1, max_size=3))
    return d


def dumps(d: dict) -> bytes:
    """Compact JSON like the proxy's, but also for counts orjson cannot write (beyond 64 bits)."""
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()


def raw_forms(value: bytes) -> st.SearchStrategy[bytes | None]:
    """Bytes a JSON parser may read differently from orjson."""
    return st.sampled_from([
        value,
        value.replace(b'"latency_ms":', b'"latency_ms":NaN,"x":', 1),
        value.replace(b'"latency_ms":', b'"latency_ms":Infinity,"x":', 1),
        value.replace(b'"request_id":"', b'"request_id":"\\ud800', 1),
        value.replace(b'"request_id":"', b'"request_id":"\\ud83d\\ude00\\u0000\\/', 1),
        value.replace(b'"request_id":"', b'"request_id":"\xff', 1),
        value.replace(b'"key_id":', b'"team_id":"dup","key_id":', 1),
        value.replace(b',"request_id"', b',\n"request_id"', 1),
        value.replace(b',"request_id"', b',\r"request_id"', 1),
        value.replace(b'"prompt_tokens":', b'"prompt_tokens":1e2,"x":', 1),
        value.replace(b'"metadata":{}', b'"metadata":{},"nested":{"metadata":{"a":"b"}}', 1),
        value.replace(b'"metadata":{}', b'"metadata": {}', 1),
        b"\xef\xbb\xbf" + value, value + b" " + value, value + b"\n", b" " + value, value[:-1],
        b"", b"   ", b"{}", b"[1]", b"null", b"garbage", b'{"schema_version":1}', b"{ }", None,
    ])  # fmt: skip


@st.composite
def value(draw) -> bytes | None:
    v = dumps(draw(event()))
    return draw(raw_forms(v)) if draw(st.integers(0, 4)) == 0 else v


def records(values: list[bytes | None], partitions: int = 3) -> list[SimpleNamespace]:
    return [SimpleNamespace(topic="t", partition=i % partitions, offset=i, key=b"k", value=v)
            for i, v in enumerate(values)]  # fmt: skip


def stored(batch) -> pa.Table:
    """What ClickHouse receives for the batch, without the per-batch stamp row_version, in offset order."""
    return (
        pa.ipc.open_stream(ipc(batch.table, INGESTED)).read_all().drop_columns(["row_version"]).sort_by("kafka_offset")
    )


def assert_same(values: list[bytes | None], book: PriceBook) -> int:
    """Both paths agree; returns how many rows the columnar path built itself."""
    recs = records(values)
    ref, ref_dead = decode_and_price(recs, book)
    got, got_dead = decode_and_price_columnar(recs, book)
    assert got_dead == ref_dead
    assert (got.rows, got.unpriced, got.spans) == (ref.rows, ref.unpriced, ref.spans)
    assert list(got.spans) == list(ref.spans)
    expected, actual = stored(ref), stored(got)
    assert actual.schema == expected.schema
    for name in expected.column_names:
        assert actual[name].to_pylist() == expected[name].to_pylist(), name
    assert actual.equals(expected)
    return got.columnar_rows


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(value(), min_size=1, max_size=30), st.sampled_from([2, 64]))
def test_columnar_path_stores_what_the_reference_stores(values, split_min):
    with patch.object(columnar, "_SPLIT_MIN", split_min):
        fast = assert_same(values, BOOK)
    note(f"columnar rows: {'all' if fast == len(values) else 'some' if fast else 'none'}")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.builds(dumps, event()), min_size=1, max_size=30))
def test_every_price_dimension_is_priced_the_same_on_both_paths(values):
    fast = assert_same(values, DIMENSION_BOOK)
    note(f"columnar rows: {'all' if fast == len(values) else 'some' if fast else 'none'}")


def test_dimension_events_take_the_columnar_path_and_cost_what_prices_says():
    # Proxy-shaped calls in every dimension: all priced in Arrow, each row's costs as schemas.prices has them.
    from schemas.prices import price

    when = datetime(2026, 11, 22, 12, tzinfo=UTC)
    shapes = [dict(prompt_tokens=1500, completion_tokens=40, cached_tokens=500, cache_write_tokens=300,
                   cache_write_1h_tokens=200, web_search_requests=3),
              dict(prompt_tokens=2500, completion_tokens=10, cached_tokens=100, cache_write_tokens=2000),  # long
              dict(prompt_tokens=900, completion_tokens=9, cache_write_tokens=100, service_tier="priority"),
              dict(prompt_tokens=5000, completion_tokens=9, service_tier="flex"),  # long: long context, not flex
              dict(prompt_tokens=10, completion_tokens=1, cached_tokens=8, cache_write_tokens=8),  # over: clipped
              dict(prompt_tokens=0, completion_tokens=0, status="error"),  # no tokens: no request fee
              dict(prompt_tokens=3000, completion_tokens=5, status="cached")]  # fmt: skip
    events = [make_event("t", occurred_at=when, served_model="gpt-4.1", provider="other", **k) for k in shapes]
    values = [e.to_bytes() for e in events]
    batch, dead = decode_and_price_columnar(records(values), DIMENSION_BOOK)
    assert not dead and batch.columnar_rows == len(values)
    rows = {r["event_id"]: r for r in batch.table.to_pylist()}
    for e in events:
        p, row = price(e, DIMENSION_BOOK), rows[e.event_id]
        assert row["price_tier"] == p.unit.tier
        for d in ("input", "cached_input", "cache_write", "cache_write_1h", "output", "request", "web_search"):
            assert row[f"cost_{d}"] == getattr(p.cost, d), d
            assert row[f"unit_{d}"] == p.unit.of(d), d
        assert row["cost_total"] == p.cost.total
    assert [rows[e.event_id]["price_tier"] for e in events] == [
        "",
        "long_context",
        "priority",
        "long_context",  # flex is priced at long context above the threshold
        "",
        "",
        "long_context",
    ]
    assert (
        rows[events[0].event_id]["cost_total"]
        == (Decimal(500) * 3 + Decimal(500) * Decimal("0.3") + 300 * Decimal("3.75") + 200 * 6 + 40 * 15) / 10**6
        + Decimal("0.0004")
        + Decimal(3) * 10 / 1000
    )
    assert_same(values, DIMENSION_BOOK)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.builds(dumps, event()), min_size=1, max_size=30))
def test_prices_that_round_or_do_not_fit_go_to_the_reference(values):
    fast = assert_same(values, ODD_BOOK)
    note(f"columnar rows: {'all' if fast == len(values) else 'some' if fast else 'none'}")


def test_proxy_shaped_events_all_take_the_columnar_path():
    events = [make_event(f"team-{i % 3}", prompt_tokens=i * 1000, completion_tokens=i, cached_tokens=i * 7,
                         status=("ok", "cached", "error", "rejected")[i % 4], served_model=("gpt-4.1", "")[i % 2],
                         occurred_at=datetime(2026, 11, 22, 23, 59, 59, 999999 - i, tzinfo=UTC) + timedelta(
                         microseconds=i * 1500)) for i in range(200)]  # fmt: skip
    values = [e.to_bytes() for e in events]
    batch, dead = decode_and_price_columnar(records(values), BOOK)
    assert not dead and batch.rows == 200 and batch.reference_rows == 0 and batch.columnar_rows == 200
    assert_same(values, BOOK)


def test_a_bad_record_only_sends_its_own_part_to_the_reference():
    values = [make_event("team-a").to_bytes() for _ in range(1000)]
    values[617] = values[617].replace(b'"prompt_tokens":', b'"prompt_tokens":-1,"x":')
    values[618] = orjson.dumps({**orjson.loads(values[618]), "metadata": {"project": "x"}})
    batch, dead = decode_and_price_columnar(records(values), BOOK)
    assert [d.offset for d in dead] == [617] and batch.rows == 999
    assert batch.reference_rows < 2 * columnar._SPLIT_MIN  # the metadata row and the rest of the failed part
    assert_same(values, BOOK)


def test_an_all_bad_batch_gives_up_splitting_and_matches_the_reference():
    values = [orjson.dumps({**BASE, "newer_field": i}) for i in range(5000)]
    with patch.object(columnar, "_read", wraps=columnar._read) as read:
        batch, dead = decode_and_price_columnar(records(values), BOOK)
    assert read.call_count <= columnar._MAX_FAILED_PARSES + 1
    assert batch.rows == 5000 and not dead and batch.reference_rows == 5000
    assert_same(values, BOOK)


def test_empty_batch():
    batch, dead = decode_and_price_columnar([], BOOK)
    assert batch.rows == 0 and not dead and batch.spans == {}


def test_costs_at_the_28_digit_edge_match_the_decimal_context():
    # ODD_BOOK's 2024 input price has a 19-digit coefficient: from `edge` tokens on, Decimal rounds the product.
    edge = (10**28 - 1) // 1234567123456789012
    when = datetime(2025, 3, 1, tzinfo=UTC)
    values = [make_event("t", occurred_at=when, provider="other", prompt_tokens=n, completion_tokens=0).to_bytes()
              for n in (1, edge - 1, edge, edge + 1, edge + 7, 10**12 + 3, 2**64 - 1)]  # fmt: skip
    values += [make_event("t", occurred_at=when, provider="other", prompt_tokens=n, completion_tokens=n // 3,
                          cached_tokens=n // 7).to_bytes() for n in (10**6, edge // 2, edge)]  # fmt: skip
    assert assert_same(values, ODD_BOOK) >= 4  # the smaller ones are priced in Arrow, the rest by Decimal


def test_a_cost_beyond_its_column_is_a_dead_letter_on_both_paths():
    # found by the property test above in CI: 10^12 prompt tokens at one of ODD_BOOK's huge route prices, a
    # cost Decimal(38, 18) cannot hold, which would have failed the batch's insert on every retry
    value = b'{"schema_version":1,"event_id":"f728b4fa-4248-5e3a-0a5d-2f346baa9455","occurred_at":"2026-01-01T00:00:00Z","request_id":"","team_id":"0","key_id":"","end_user":null,"metadata":{"":""},"endpoint":"chat.completions","requested_model":"","served_model":"gpt-4.1","provider":"openai","stream":false,"status":"ok","http_status":200,"error_code":null,"prompt_tokens":1000000000001,"completion_tokens":0,"cached_tokens":0,"latency_ms":0.0,"ttft_ms":null,"attempts":0,"fallback_used":false,"cache_hit":false,"client_disconnected":false,"proxy_instance":"","proxy_seq":0,"usage_source":"provider"}'
    ref, dead = decode_and_price(records([value]), ODD_BOOK)
    assert ref.rows == 0 and len(dead) == 1 and "exceeds the cost columns" in dead[0].reason
    assert_same([value, value.replace(b'"metadata":{"":""}', b'"metadata":{}')], ODD_BOOK)
