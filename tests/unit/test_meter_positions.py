"""The meter's commit guard (services/meter/positions.py): what it commits and where it seeks, from pure inputs."""

from __future__ import annotations

from typing import Any

from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from services.meter.positions import CommitGuard, Rewind

A, B = TopicPartition("usage", 0), TopicPartition("usage", 1)


def steady(ours: dict[TopicPartition, int]) -> CommitGuard:
    guard = CommitGuard()
    guard.committed(ours)
    return guard


def test_steady_state_commits_each_batch_end():
    guard = steady({A: 1_000})
    plan = guard.plan({A: (1_000, 1_499)}, {A: 1_000})
    assert plan.commit == {A: 1_500} and plan.rewind == []
    guard.committed(plan.commit)
    assert guard.plan({A: (1_500, 1_999)}, {A: 1_500}).commit == {A: 2_000}


def test_broker_ahead_after_a_handover_is_not_a_rewind():
    # Another meter owned the partition for a while and committed further; ours is older: nothing forgotten.
    plan = steady({A: 1_000}).plan({A: (5_000, 5_099)}, {A: 5_000})
    assert plan.commit == {A: 5_100} and plan.rewind == []


def test_broker_that_forgot_everything_sends_the_partition_back_to_the_beginning():
    guard = steady({A: 1_000})
    # Read at the stale position from the refilled log: committing 1_300 would skip offsets 0-999 of it.
    plan = guard.plan({A: (1_000, 1_299)}, {A: None})
    assert plan.commit == {}
    assert plan.rewind == [Rewind(A, ours=1_000, broker=None, to=0, batch=(1_000, 1_299), reason="broker_behind")]
    assert A not in guard.ours  # nothing of ours to trust any more


def test_group_reset_to_an_earlier_offset_rewinds_to_it():
    plan = steady({A: 1_000}).plan({A: (1_000, 1_099)}, {A: 400})
    assert plan.commit == {} and [(r.to, r.reason) for r in plan.rewind] == [(400, "broker_behind")]


def test_batches_read_before_the_seek_never_commit_and_the_first_one_after_it_does():
    guard = steady({A: 1_000})
    assert guard.plan({A: (1_000, 1_299)}, {A: None}).rewind  # detected: seek to 0
    # The pipeline still holds a batch read before the seek took effect, further along the stale positions.
    second = guard.plan({A: (1_300, 1_399)}, {A: None})
    assert second.commit == {} and [(r.to, r.reason, r.ours) for r in second.rewind] == [(0, "not_contiguous", None)]
    # A batch that straddles the seek: starts stale, ends in the re-read head of the log. Its end is no proof.
    third = guard.plan({A: (1_400, 120)}, {A: None})
    assert third.commit == {} and third.rewind[0].to == 0
    # Read after the seek: starts where the broker's knowledge ends (nothing: offset 0), covers up to its end.
    after = guard.plan({A: (0, 1_999)}, {A: None})
    assert after.commit == {A: 2_000} and after.rewind == []
    guard.committed(after.commit)
    assert guard.plan({A: (2_000, 2_099)}, {A: 2_000}).commit == {A: 2_100}  # steady again


def test_broker_that_forgot_but_the_batch_already_starts_at_the_beginning_commits():
    # aiokafka itself restarted the partition from the beginning (OffsetOutOfRange on the new, shorter log).
    guard = steady({A: 1_000})
    plan = guard.plan({A: (0, 499)}, {A: None})
    assert plan.commit == {A: 500} and plan.rewind == []


def test_first_commit_of_a_meter_is_checked_against_the_brokers_offset():
    fresh = CommitGuard()
    assert fresh.plan({A: (0, 99)}, {A: None}).commit == {A: 100}  # a new group starts at the beginning
    assert CommitGuard().plan({A: (7_000, 7_099)}, {A: 7_000}).commit == {A: 7_100}  # resumes a group's commit
    # Read from the old log just before the broker restarted (the group had committed 7_000 there).
    plan = CommitGuard().plan({A: (7_000, 7_099)}, {A: None})
    assert plan.commit == {} and [(r.to, r.reason, r.ours) for r in plan.rewind] == [(0, "not_contiguous", None)]


def test_overlap_with_the_brokers_offset_is_fine():
    # A batch may start below the committed offset (a replay after a rebalance): it still covers up to its end.
    assert CommitGuard().plan({A: (900, 1_099)}, {A: 1_000}).commit == {A: 1_100}


def test_nothing_fetchable_at_the_seek_point_commits_on_the_second_identical_start():
    # Retention deleted offsets 0-4_999 (or they are transaction markers): after the seek to 0 the fetch starts at
    # 5_000 every time. The first such batch is refused (it could be a stale one), the repeat proves it is not.
    guard = steady({A: 9_000})
    assert guard.plan({A: (9_000, 9_099)}, {A: None}).rewind  # the stale batch
    first = guard.plan({A: (5_000, 5_099)}, {A: None})
    assert first.commit == {} and first.rewind[0].to == 0
    again = guard.plan({A: (5_000, 5_099)}, {A: None})
    assert again.commit == {A: 5_100} and again.rewind == []
    guard.committed(again.commit)
    assert guard.plan({A: (5_100, 5_199)}, {A: 5_100}).commit == {A: 5_200}


def test_the_repeat_escape_does_not_outlive_a_commit():
    guard = steady({A: 9_000})
    assert guard.plan({A: (9_000, 9_099)}, {A: None}).rewind  # refused once at 9_000
    guard.committed(guard.plan({A: (0, 99)}, {A: None}).commit)  # then back on track
    # The broker forgets again and a batch starts at 9_000 again: a new stale batch, not a repeat after a seek.
    plan = guard.plan({A: (9_000, 9_099)}, {A: None})
    assert plan.commit == {} and plan.rewind[0].reason == "broker_behind"


def test_each_partition_is_decided_on_its_own():
    guard = steady({A: 1_000, B: 2_000})
    plan = guard.plan({A: (1_000, 1_099), B: (2_000, 2_099)}, {A: 1_000, B: None})
    assert plan.commit == {A: 1_100}
    assert [(r.partition, r.to) for r in plan.rewind] == [(B, 0)]


def test_a_plan_alone_does_not_move_what_we_committed():
    # The commit may still fail (rebalance): only an accepted commit becomes ours.
    guard = steady({A: 1_000})
    guard.plan({A: (1_000, 1_099)}, {A: 1_000})
    assert guard.ours == {A: 1_000}
    assert guard.plan({A: (1_000, 1_099)}, {A: None}).rewind[0].ours == 1_000  # still compared with 1_000


class FakeConsumer:
    """The four consumer calls the guard makes, recorded."""

    def __init__(self, committed: dict[TopicPartition, int | None], assigned: set[TopicPartition]) -> None:
        self._committed = committed
        self._assigned = assigned
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []

    async def committed(self, tp: TopicPartition) -> int | None:
        return self._committed.get(tp)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


def rewound(reason: str) -> float:
    return REGISTRY.get_sample_value("tollway_meter_positions_rewound_total", {"reason": reason}) or 0.0


async def test_commit_seeks_what_is_unsafe_commits_the_rest_and_remembers_it():
    guard = steady({A: 1_000, B: 2_000})
    consumer: Any = FakeConsumer({A: 1_000}, assigned={A, B})  # B forgotten by the broker
    before = rewound("broker_behind")
    await guard.commit(consumer, {("usage", 0): (1_000, 1_099), ("usage", 1): (2_000, 2_099)})
    assert consumer.commits == [{A: 1_100}] and consumer.seeks == [(B, 0)]
    assert guard.ours == {A: 1_100} and rewound("broker_behind") == before + 1


async def test_commit_neither_seeks_an_unassigned_partition_nor_commits_nothing():
    guard = steady({A: 1_000})
    consumer: Any = FakeConsumer({}, assigned=set())  # mid-rebalance: its next owner starts at the broker's offset
    await guard.commit(consumer, {("usage", 0): (1_000, 1_099)})
    assert consumer.seeks == [] and consumer.commits == []
