"""The meter's decode fast path accepts only what the checked path accepts, and returns the same row.

`event_row` (checks built from schemas/usage_row.py) may never accept what pydantic would refuse, and where it
accepts, its row is `model_row` of the validated model. (It replaced `exact_fields` + `fast_fields`, two
hand-written copies of the contract's checks.)"""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.config import load_config
from schemas.events import UsageEvent
from schemas.prices import DIMENSIONS, PriceBook, price
from services.meter.reference import decode_and_price
from services.meter.row import EVENT_COLUMNS, event_row, model_row
from tests.support.events import make_event

BASE = orjson.loads(make_event("team-a", metadata={"p": "x"}, end_user="u", ttft_ms=3.5).to_bytes())
FIELDS = sorted(BASE)
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(2**15, 2**17), st.sampled_from([999, 1000, -0.0, 1e300]),
    st.floats(allow_nan=False), st.text(max_size=3), st.sampled_from(["", "x" * 65, "x" * 257, "ok", "cached",
    "provider", "estimated", "2026-11-22T10:00:00Z", "2026-11-22T10:00:00", "2026-11-22T10:00:00.5+05:30",
    BASE["event_id"].upper(), "0" * 36]), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.one_of(st.text(max_size=2), st.integers()), max_size=2),
)  # fmt: skip


def pydantic_accepts(d: dict) -> tuple | None:
    try:
        return model_row(UsageEvent.model_validate_json(orjson.dumps(d)))
    except ValidationError:
        return None


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ODD, max_size=3), st.sets(st.sampled_from(FIELDS), max_size=2))
def test_the_fast_path_never_accepts_what_pydantic_refuses_and_gives_its_row(changes, dropped):
    d = {k: v for k, v in {**BASE, **changes}.items() if k not in dropped}
    fast = event_row(d)
    if fast is not None:
        assert pydantic_accepts(d) == fast


def test_the_proxy_shaped_event_an_older_proxys_and_a_newer_proxys_take_the_fast_path():
    assert sorted(BASE) == sorted(EVENT_COLUMNS)  # what the proxy writes: every field of the table
    older = {k: v for k, v in BASE.items() if k not in ("reasoning_tokens", "cache_write_tokens",
                                                         "cache_write_1h_tokens", "service_tier")}  # fmt: skip
    for d in (BASE, older, {**BASE, "newer_field": 1}):
        row = event_row(d)
        assert row is not None and row == pydantic_accepts(d)
    assert event_row(older)[EVENT_COLUMNS.index("reasoning_tokens")] == 0


def test_an_unhashable_status_is_a_dead_letter_not_a_crash():
    recs = [SimpleNamespace(topic="t", partition=0, offset=i, key=None, value=orjson.dumps({**BASE, field: ["ok"]}))
            for i, field in enumerate(("status", "usage_source"))]  # fmt: skip
    batch, dead = decode_and_price(recs, PriceBook(load_config("tollway.yaml")))
    assert batch.rows == 0 and len(dead) == 2


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_a_latency_pydantic_refuses_never_takes_the_fast_path(value):
    """Hypothesis found `latency_ms: inf` accepted here while pydantic refuses it (JSON has no infinity)."""
    d = {**BASE, "latency_ms": value}
    assert pydantic_accepts(d) is None and event_row(d) is None


def test_an_event_in_every_price_dimension_takes_the_fast_path_and_is_priced_as_its_model_is():
    book = PriceBook(load_config("tollway.yaml"))
    events = [make_event("team-a", requested_model="claude-sonnet-4.5", served_model="claude-sonnet-4.5",
                         provider="anthropic", prompt_tokens=p, completion_tokens=40, cached_tokens=900,
                         cache_write_tokens=300, cache_write_1h_tokens=20, web_search_requests=2)
              for p in (5_000, 200_001)]  # fmt: skip
    events.append(make_event("team-a", prompt_tokens=100, completion_tokens=5, service_tier="priority"))
    for e in events:
        d = orjson.loads(e.to_bytes())
        assert event_row(d) is not None and event_row(d) == pydantic_accepts(d)
    records = [SimpleNamespace(topic="t", partition=0, offset=i, key=None, value=e.to_bytes())
               for i, e in enumerate(events)]  # fmt: skip
    batch, dead = decode_and_price(records, book)
    assert not dead
    for e, row in zip(events, batch.table.to_pylist(), strict=True):
        p = price(e, book)
        assert (row["price_version"], row["price_tier"], row["cost_total"]) == (p.unit.version, p.unit.tier,
                                                                                p.cost.total)  # fmt: skip
        assert all(row[f"cost_{d}"] == getattr(p.cost, d) and row[f"unit_{d}"] == p.unit.of(d) for d in DIMENSIONS)
    assert [r["price_tier"] for r in batch.table.to_pylist()] == ["", "long_context", "priority"]
