"""Every identity the meter writes is named by content, never by a broker position (offsets, partitions)."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from schemas.config import load_config
from schemas.prices import PriceBook
from services.meter.columnar import decode_and_price_columnar
from services.meter.dead_letters import DeadLetter
from services.meter.dlq import encode_dead_letter
from services.meter.reference import decode_and_price
from tests.support.events import make_event

BOOK = PriceBook(load_config("tollway.yaml"))
PATHS = [decode_and_price, decode_and_price_columnar]


def records(values: list[bytes], first_offset: int = 0) -> list[SimpleNamespace]:
    return [SimpleNamespace(topic="tollway.usage.v1", partition=0, offset=first_offset + i, key=b"t", value=v)
            for i, v in enumerate(values)]  # fmt: skip


def with_metadata(e) -> bytes:  # a metadata map sends the record through the per-record reference path
    return orjson.dumps({**orjson.loads(e.to_bytes()), "metadata": {"project": "p"}})


@pytest.mark.parametrize("decode", PATHS)
@pytest.mark.parametrize("encode", [lambda e: e.to_bytes(), with_metadata], ids=["arrow-rows", "list-rows"])
def test_batches_at_the_same_offsets_with_other_events_get_other_tokens(decode, encode):
    old = [encode(make_event("team")) for _ in range(20)]
    new = [encode(make_event("team")) for _ in range(20)]
    a, _ = decode(records(old), BOOK)
    b, _ = decode(records(new), BOOK)  # a fresh broker: the same offsets, other events
    assert a.spans == b.spans and a.rows == b.rows == 20
    assert a.dedup_token() != b.dedup_token()


@pytest.mark.parametrize("decode", PATHS)
def test_the_same_rows_get_the_same_token_wherever_they_were_read(decode):
    values = [make_event("team").to_bytes() for _ in range(20)] + [with_metadata(make_event("team"))]
    a, _ = decode(records(values), BOOK)
    b, _ = decode(records(values, first_offset=1000), BOOK)  # a retry, or the same records at other offsets
    assert a.dedup_token() == b.dedup_token()


@pytest.mark.parametrize("decode", PATHS)
def test_one_more_or_one_other_event_changes_the_token(decode):
    events = [make_event("team") for _ in range(50)]
    base, _ = decode(records([e.to_bytes() for e in events]), BOOK)
    more, _ = decode(records([e.to_bytes() for e in events] + [make_event("team").to_bytes()]), BOOK)
    other = [*events[:25], make_event("team"), *events[26:]]
    changed, _ = decode(records([e.to_bytes() for e in other]), BOOK)
    assert len({base.dedup_token(), more.dedup_token(), changed.dedup_token()}) == 3


@pytest.mark.parametrize("decode", PATHS)
def test_the_same_event_at_another_price_gets_another_token(decode):
    e = make_event("team")
    priced, _ = decode(records([e.to_bytes()]), BOOK)
    cheaper = PriceBook(load_config("tollway.yaml").model_copy(update={"models": {
        name: m.model_copy(update={"prices": [p.model_copy(update={"input": p.input / 2}) for p in m.prices]})
        for name, m in load_config("tollway.yaml").models.items()}}))  # fmt: skip
    repriced, _ = decode(records([e.to_bytes()]), cheaper)
    assert priced.dedup_token() != repriced.dedup_token()


def test_a_dead_letter_is_named_by_its_bytes_not_by_where_it_was_read():
    a = DeadLetter("undecodable: x", "tollway.usage.v1", 3, 1234, b"team", b"{not json")
    again = DeadLetter("undecodable: x", "tollway.usage.v1", 0, 0, None, b"{not json")  # re-fed, fresh broker
    other = DeadLetter("undecodable: x", "tollway.usage.v1", 3, 1234, b"team", b"{not json either")
    assert a.dead_id() == again.dead_id() != other.dead_id()
    assert orjson.loads(encode_dead_letter(a))["dead_id"] == a.dead_id()
