"""The proxy writes usage events in the contract's canonical form without building a model on the request
path: its bytes must be exactly what `UsageEvent.model_dump_json` gives for the same event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import UsageEvent, utc_now
from services.proxy.draft import UsageDraft
from services.proxy.events import canonical_event

text = st.text(max_size=40)
counts = st.integers(min_value=0, max_value=2**62)
millis = st.floats(min_value=0, max_value=1e7, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def handler_events(draw: st.DrawFn) -> dict:
    """Fields as ProxyHandler sets them, in its order, with the optional ones present or not."""
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(milliseconds=draw(st.integers(0, 10**11)))
    ev = {"event_id": "0196b1c2-3d4e-7f50-8a9b-0c1d2e3f4a5b", "occurred_at": when, "request_id": draw(text),
          "endpoint": draw(st.sampled_from(["chat.completions", "embeddings"])), "requested_model": draw(text),
          "status": draw(st.sampled_from(["ok", "error", "cached", "rejected"])),
          "http_status": draw(st.integers(0, 999)), "team_id": draw(st.text(min_size=1, max_size=64)),
          "key_id": draw(text), "metadata": draw(st.dictionaries(text, text, max_size=3))}  # fmt: skip
    optional = {
        "end_user": text, "served_model": text, "stream": st.booleans(), "attempts": st.integers(0, 9),
        "provider": text, "fallback_used": st.booleans(), "prompt_tokens": counts, "completion_tokens": counts,
        "cached_tokens": counts, "usage_source": st.sampled_from(["provider", "estimated"]),
        "error_code": st.none() | text, "ttft_ms": st.none() | millis, "client_disconnected": st.booleans(),
        "cache_hit": st.booleans(), "latency_ms": millis,
    }  # fmt: skip
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        ev[name] = draw(optional[name])
    ev["proxy_instance"], ev["proxy_seq"] = draw(text), draw(counts)
    return ev


@settings(max_examples=400, deadline=None)
@given(handler_events())
def test_emitted_bytes_are_the_models_canonical_bytes(ev: dict) -> None:
    payload = canonical_event(UsageDraft(**ev))
    model = UsageEvent.model_validate_json(payload)
    assert payload == model.model_dump_json().encode()
    assert list(orjson.loads(payload)) == list(UsageEvent.model_fields)  # every field, the model's order


def test_a_real_clock_reading_round_trips() -> None:
    ev = {"event_id": "0196b1c2-3d4e-7f50-8a9b-0c1d2e3f4a5b", "occurred_at": utc_now(), "request_id": "r",
          "endpoint": "chat.completions", "requested_model": "m", "status": "ok", "http_status": 200,
          "team_id": "t", "key_id": "k", "latency_ms": 0.25}  # fmt: skip
    payload = canonical_event(UsageDraft(**ev))
    assert UsageEvent.model_validate_json(payload).occurred_at == ev["occurred_at"]
    assert payload == UsageEvent.model_validate_json(payload).model_dump_json().encode()
