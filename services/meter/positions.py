"""Keep the meter's consumer positions honest against the broker's committed offsets.

The bundled broker (tansu, memory storage) forgets topics, logs and committed offsets when it restarts; the proxy
spool then refills a new log whose offsets have nothing to do with the old one. An offset this meter read from the
old log, committed on the new broker, makes the group skip everything below it in the refilled log: never billed.
How it gets there (tansu + aiokafka 0.14): the new broker does not know the meter's member, aiokafka rejoins, a
commit sent meanwhile goes out with generation -1, which tansu accepts (Kafka would not), and the rejoin starts the
partition at that committed offset. A consumer that keeps its old fetch positions reads from there just the same.

So before each commit the meter asks the broker what the group has committed (one OffsetFetch per partition of the
batch, in parallel) and commits a partition's end only when everything below it is known to be in ClickHouse:

1. This meter committed `ours` for the partition and the broker still has at least that (more after a rebalance
   handed it over and back): positions ran on contiguously from a commit, the batch continues them. Commit.
2. The broker has less than `ours`, or nothing: it forgot (restart) or the group was reset. Forget `ours`; go on as
   in 3, against what the broker has now.
3. Nothing of ours to compare with (first commit for the partition since this meter started, or after 2): commit
   only if the batch starts at or below the broker's committed offset (0 when it has none): the broker vouches for
   what lies below that offset and this batch, inserted, covers the rest up to its end. Otherwise commit nothing
   for the partition and seek it back to that offset (0 = the beginning: the meter's auto_offset_reset is
   earliest). The batch is in ClickHouse already and is read again, like every batch read before the seek took
   effect (the pipeline holds one more, the fetcher's buffer is dropped by the seek): event_id dedup absorbs
   them, and each of them meets this same rule, so none of them commits past the seek point. A partition no
   longer assigned is not sought: its next owner starts from the broker's committed offset, which was not moved.

An escape keeps 3 from looping where nothing can be fetched at the seek point (retention deleted it, compaction,
transaction markers): when two batches in a row for the partition start at the same offset, the second was read
after a seek back to the broker's offset, so nothing fetchable lies between them: commit.

What this cannot see (offsets alone cannot tell two logs apart):
- A batch starting exactly at the broker's offset (0 on a group that never committed, e.g. a meter's first batch
  on a fresh broker) read from the old log, with the broker restarting between its fetch and its commit: its
  offsets pass rule 3 on the new broker too.
- A commit already in flight when the broker dies: aiokafka resends it to the new broker by itself; if that lands
  (during the rejoin) it is indistinguishable from our own. The window is one commit round trip per batch.
Reconciliation's proxy_seq gaps (docs/metering.md section 5) still report either as missing events.
Offsets are positions for this commit step only: nothing stored is named by them (the insert dedup token, dead
letters and adjustments are named by content, docs/metering.md section 1), so a batch read again after a seek,
or a new log at the old offsets, is never mistaken for one already stored.
Earlier detection does not help: aiokafka already restarts from the beginning when a fetch position is past the
new log's end (OffsetOutOfRange) and on every rejoin; the loss only happens once the new log has grown past the
old offsets, which looks like any fetch, so the commit is where it is stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.meter import metrics

log = structlog.get_logger("tollway.meter.positions")
Span = tuple[int, int]  # first and last offset of a partition's records in a batch


@dataclass(frozen=True)
class Rewind:
    partition: TopicPartition
    ours: int | None  # this meter's last commit for it, before it was forgotten (None: none to compare)
    broker: int | None  # the group's committed offset on the broker (None: nothing committed)
    to: int  # where the partition is sought back to
    batch: Span
    reason: str  # broker_behind | not_contiguous


@dataclass
class Plan:
    commit: dict[TopicPartition, int] = field(default_factory=dict)  # next offset to commit, per partition
    rewind: list[Rewind] = field(default_factory=list)  # partitions to seek back, with nothing committed


class CommitGuard:
    """The commit step of one meter's consumer: `plan` decides (pure), `commit` fetches, seeks and commits."""

    def __init__(self) -> None:
        self.ours: dict[TopicPartition, int] = {}  # what this meter last committed, once the broker accepted it
        self._refused: dict[TopicPartition, int] = {}  # first offset of the last batch refused, per partition

    def plan(self, spans: Mapping[TopicPartition, Span], broker: Mapping[TopicPartition, int | None]) -> Plan:
        plan = Plan()
        for tp, (first, last) in spans.items():
            theirs, ours = broker.get(tp), self.ours.get(tp)
            reason = "not_contiguous"
            if ours is not None and theirs is not None and theirs >= ours:
                plan.commit[tp] = last + 1  # rule 1
                continue
            if ours is not None:  # rule 2: the broker forgot, or the group was reset
                del self.ours[tp]
                reason = "broker_behind"
            start = theirs or 0
            if first <= start or first == self._refused.get(tp):  # rule 3, or the escape
                plan.commit[tp] = last + 1
            else:
                self._refused[tp] = first
                plan.rewind.append(Rewind(tp, ours, theirs, start, (first, last), reason))
        return plan

    def committed(self, offsets: Mapping[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self.ours[tp] = offset
            self._refused.pop(tp, None)

    async def commit(self, consumer: AIOKafkaConsumer, spans: Mapping[tuple[str, int], Span]) -> None:
        """Commit what is safe of a written batch; seek back what is not. Raises what consumer.commit raises."""
        by_tp = {TopicPartition(t, p): span for (t, p), span in spans.items()}
        theirs = await asyncio.gather(*(consumer.committed(tp) for tp in by_tp))
        plan = self.plan(by_tp, dict(zip(by_tp, theirs, strict=True)))
        assigned = consumer.assignment()
        for r in plan.rewind:
            metrics.POSITIONS_REWOUND.labels(r.reason).inc()
            log.warning("meter_positions_rewound", partition=f"{r.partition.topic}:{r.partition.partition}",
                        ours=r.ours, broker=r.broker, to=r.to, batch=list(r.batch), reason=r.reason,
                        assigned=r.partition in assigned)  # fmt: skip
            if r.partition in assigned:
                consumer.seek(r.partition, r.to)
        if plan.commit:
            await consumer.commit(plan.commit)
            self.committed(plan.commit)
