"""The meter's decode fast paths accept exactly what the checked path accepts, and return the same fields.

`exact_fields` (all 28 fields present) must agree with `fast_fields` on every input, and neither may accept
what pydantic would refuse."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.config import load_config
from schemas.events import UsageEvent
from schemas.prices import PriceBook
from services.meter.pricing import decode_and_price, exact_fields, fast_fields, model_fields
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
        return model_fields(UsageEvent.model_validate_json(orjson.dumps(d)))
    except ValidationError:
        return None


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ODD, max_size=3), st.sets(st.sampled_from(FIELDS), max_size=2))
def test_exact_and_fast_paths_agree_and_never_accept_what_pydantic_refuses(changes, dropped):
    d = {k: v for k, v in {**BASE, **changes}.items() if k not in dropped}
    fast, exact = fast_fields(d), exact_fields(d)
    if len(d) == 28:
        assert exact == fast
    else:
        assert exact is None
    if fast is not None:
        assert pydantic_accepts(d) == fast


def test_the_proxy_shaped_event_takes_the_exact_path():
    assert exact_fields(BASE) is not None and exact_fields(BASE) == fast_fields(BASE)
    assert exact_fields({**BASE, "newer_field": 1}) is None and fast_fields({**BASE, "newer_field": 1}) is not None


def test_an_unhashable_status_is_a_dead_letter_not_a_crash():
    recs = [SimpleNamespace(topic="t", partition=0, offset=i, key=None, value=orjson.dumps({**BASE, field: ["ok"]}))
            for i, field in enumerate(("status", "usage_source"))]  # fmt: skip
    batch, dead = decode_and_price(recs, PriceBook(load_config("tollway.yaml")))
    assert batch.rows == 0 and len(dead) == 2
