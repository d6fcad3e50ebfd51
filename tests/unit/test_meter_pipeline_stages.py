"""The meter pipeline's stages (services/meter/pipeline.py) with fake consumer, writer and dead-letter sink, no
broker: the way aiokafka tests its Sender. What it must keep: write before commit, batches in fetch order, a
write that gives up stops everything after it uncommitted, dead letters are safe before the commit."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from schemas.config import load_config
from schemas.prices import PriceBook
from services.meter.pipeline import MeterPipeline
from services.meter.reference import decode_and_price
from tests.support.events import make_event

BOOK = PriceBook(load_config("tollway.yaml"))
TP = TopicPartition("usage", 0)


def rec(offset: int, value: bytes | None = None) -> SimpleNamespace:
    return SimpleNamespace(topic=TP.topic, partition=TP.partition, offset=offset, key=b"t",
                           value=make_event("t").to_bytes() if value is None else value)  # fmt: skip


class FakeConsumer:
    def __init__(self, batches: list[list], log: list, commit_error: Exception | None = None) -> None:
        self.batches, self.log, self.commit_error = list(batches), log, commit_error
        self.broker: dict[TopicPartition, int] = {}

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        if self.batches:
            return {TP: self.batches.pop(0)}
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.broker.get(tp)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.commit_error is not None:
            raise self.commit_error
        self.broker.update(offsets)
        self.log.append(("commit", offsets[TP]))

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.log.append(("seek", offset))

    def highwater(self, tp: TopicPartition) -> int | None:
        return None


class FakeWriter:
    def __init__(self, log: list, give_up_on: int | None = None) -> None:
        self.log, self.give_up_on, self.calls = log, give_up_on, 0

    async def insert(self, batch, stop: asyncio.Event) -> bool:
        self.calls += 1
        if self.calls == self.give_up_on:
            return False  # what UsageWriter answers when `stop` is set while ClickHouse keeps failing
        self.log.append(("insert", sorted(batch.table["kafka_offset"].to_pylist())))
        return True

    async def insert_dead(self, dead: list, stop: asyncio.Event) -> bool:
        if dead:
            self.log.append(("insert_dead", [d.offset for d in dead]))
        return True


class FakeSink:
    def __init__(self, log: list) -> None:
        self.log = log

    async def send(self, dead: list) -> None:
        if dead:
            self.log.append(("dlq", [d.offset for d in dead]))


def pipeline(consumer, writer, log: list, rows: int = 2) -> MeterPipeline:
    return MeterPipeline(consumer, writer, FakeSink(log), BOOK, decode_and_price, ThreadPoolExecutor(1),
                         batch_max_rows=rows, batch_max_wait_ms=20, future_tolerance_s=300, depth=2)  # fmt: skip


async def test_each_batch_is_written_then_committed_in_fetch_order():
    log: list = []
    batches = [[rec(0), rec(1)], [rec(2), rec(3)], [rec(4), rec(5)]]
    assert await pipeline(FakeConsumer(batches, log), FakeWriter(log), log).run(None, asyncio.Event())
    assert log == [("insert", [0, 1]), ("commit", 2), ("insert", [2, 3]), ("commit", 4), ("insert", [4, 5]),
                   ("commit", 6)]  # fmt: skip


async def test_a_write_that_gives_up_stops_the_pipeline_with_nothing_after_it_committed():
    log: list = []
    batches = [[rec(0), rec(1)], [rec(2), rec(3)], [rec(4), rec(5)]]
    consumer = FakeConsumer(batches, log)
    assert not await pipeline(consumer, FakeWriter(log, give_up_on=2), log).run(None, asyncio.Event())
    assert log == [("insert", [0, 1]), ("commit", 2)]
    assert consumer.broker == {TP: 2}  # batch 2 (and 3, fetched or not) is read again on the next start


async def test_dead_letters_are_stored_and_sent_before_the_commit():
    log: list = []
    batches = [[rec(0), rec(1, b"not json")]]
    assert await pipeline(FakeConsumer(batches, log), FakeWriter(log), log).run(None, asyncio.Event())
    assert log == [("insert", [0]), ("insert_dead", [1]), ("dlq", [1]), ("commit", 2)]


async def test_a_commit_lost_to_a_rebalance_does_not_stop_the_pipeline():
    log: list = []
    batches = [[rec(0), rec(1)], [rec(2), rec(3)]]
    consumer = FakeConsumer(batches, log, commit_error=CommitFailedError("rebalanced"))
    assert await pipeline(consumer, FakeWriter(log), log).run(None, asyncio.Event())
    # Both batches still written; the new owner replays (dedup absorbs it). Nothing of ours was committed, so
    # the commit guard (positions.py rule 3) seeks back rather than committing past what the broker vouches for.
    assert log == [("insert", [0, 1]), ("insert", [2, 3]), ("seek", 0)]


async def test_a_stop_ends_the_fetching_and_what_was_fetched_is_still_written():
    log: list = []
    stop = asyncio.Event()

    class StoppingWriter(FakeWriter):
        async def insert(self, batch, give_up):
            stop.set()  # asked to stop while the first batch is being written
            return await super().insert(batch, give_up)

    batches = [[rec(i), rec(i + 1)] for i in range(0, 20, 2)]
    assert await pipeline(FakeConsumer(batches, log), StoppingWriter(log), log).run(stop, asyncio.Event())
    inserts = [e for e in log if e[0] == "insert"]
    assert inserts and len(inserts) < 10 and inserts[0] == ("insert", [0, 1])
    assert log[-1] == ("commit", inserts[-1][1][-1] + 1)  # everything handed over was written and committed
