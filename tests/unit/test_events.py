"""The UsageEvent contract: round-trips, rejects what it must, and its JSON Schema files are current."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import pytest
from pydantic import ValidationError

from schemas import control
from schemas.events import UsageEvent
from schemas.export import OUT, documents
from tests.support.events import make_event


def test_event_round_trips_through_bytes():
    e = make_event("team_a", metadata={"project": "x"}, ttft_ms=12.5, cached_tokens=3)
    assert UsageEvent.from_bytes(e.to_bytes()) == e


def test_occurred_at_is_normalised_to_utc_and_naive_times_are_rejected():
    plus2 = datetime(2026, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    e = make_event("t", occurred_at=plus2)
    assert e.occurred_at.utcoffset() == timedelta(0) and e.occurred_at.hour == 10
    with pytest.raises(ValidationError, match="timezone"):
        make_event("t", occurred_at=datetime(2026, 5, 1))


@pytest.mark.parametrize(
    "over", [{"event_id": "not-a-uuid"}, {"status": "weird"}, {"prompt_tokens": -1}, {"key_id": "k" * 65}]
)
def test_invalid_events_are_rejected(over):
    with pytest.raises(ValidationError):
        make_event("t", **over)


def test_unknown_fields_from_a_newer_proxy_are_tolerated():
    raw = orjson.loads(make_event("t").to_bytes())
    raw["some_future_field"] = 1
    assert UsageEvent.from_bytes(orjson.dumps(raw)).team_id == "t"


def test_control_messages_round_trip_by_kind():
    msgs = [
        control.KeyState(key_id="k", key_hash="h" * 64, prefix="tw-abc...", team_id="t"),
        control.TeamState(team_id="t", name="acme"),
        control.QuotaSignal(scope="team", id="t", state="exhausted"),
    ]
    for m in msgs:
        assert control.decode(control.encode(m)) == m
    assert control.message_key(msgs[0]) == b"key:k"


def test_json_schema_files_are_current():
    for name, text in documents().items():
        on_disk = (OUT / name).read_text()
        assert on_disk == text, f"{name} is stale: run `make schemas`"
