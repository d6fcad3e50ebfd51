"""An event dated beyond the meter's clock plus a tolerance is held as a dead letter, never stored as usage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from schemas.config import load_config
from schemas.prices import PriceBook
from services.meter.columnar import decode_and_price_columnar
from services.meter.reference import decode_and_price
from tests.support.events import make_event

BOOK = PriceBook(load_config("tollway.yaml"))


def records(values: list[bytes]) -> list[SimpleNamespace]:
    return [SimpleNamespace(topic="t", partition=0, offset=i, key=b"k", value=v) for i, v in enumerate(values)]


@pytest.mark.parametrize("decode", [decode_and_price, decode_and_price_columnar])
def test_an_event_from_the_future_is_a_dead_letter_with_its_reason(decode):
    now = datetime.now(UTC)
    ahead = make_event("team", occurred_at=now + timedelta(days=40))  # a proxy clock a month ahead
    also = make_event("team", occurred_at=now + timedelta(seconds=400), metadata={"project": "p"})
    near = make_event("team", occurred_at=now + timedelta(seconds=60))  # within the default 300 s
    past = make_event("team", occurred_at=now - timedelta(days=3))
    batch, dead = decode(records([e.to_bytes() for e in (ahead, near, also, past)]), BOOK)
    assert batch.rows == 2
    assert [d.offset for d in dead] == [0, 2] and all(d.future for d in dead)
    assert dead[0].reason.startswith(f"occurred_at {ahead.occurred_at.isoformat()} is in the future")
    assert "300 s" in dead[0].reason
    assert dead[1].value == also.to_bytes()  # the original bytes, to re-feed


@pytest.mark.parametrize("decode", [decode_and_price, decode_and_price_columnar])
def test_the_tolerance_is_a_setting(decode):
    soon = make_event("team", occurred_at=datetime.now(UTC) + timedelta(seconds=60))
    batch, dead = decode(records([soon.to_bytes()]), BOOK, future_tolerance_s=10)
    assert batch.rows == 0 and len(dead) == 1 and "10 s" in dead[0].reason
    batch, dead = decode(records([soon.to_bytes()]), BOOK, future_tolerance_s=3600)
    assert batch.rows == 1 and not dead
