"""The control outbox keeps one pending state per entity, newest last, without losing what a proxy needs
from a replaced message (the event ids of a usage update). No broker here: only the queue is under test;
delivery against the real broker is in tests/integration/test_billing_hostile.py."""

from __future__ import annotations

import asyncio

from schemas.control import QuotaSignal, TeamState
from services.billing.control import MAX_COUNTED_IDS, ControlPublisher


def usage(entity_id: str, tokens: int, counted: list[str]) -> QuotaSignal:
    return QuotaSignal(scope="team", id=entity_id, state="ok", used_tokens=tokens, counted=counted)


async def test_a_newer_state_replaces_the_pending_one_and_goes_to_the_end():
    outbox = ControlPublisher("127.0.0.1:9")
    first = outbox._put(TeamState(team_id="t1", name="a"))
    outbox._put(TeamState(team_id="t2", name="b"))
    newer = outbox._put(TeamState(team_id="t1", name="a2"))
    assert [e.msg.team_id for e in outbox._pending.values()] == ["t2", "t1"]
    assert outbox.pending == 2 and newer.msg.name == "a2"
    newer.delivered()  # landing the newer state answers whoever waited on the older one too
    assert first.done.is_set()


async def test_a_replaced_usage_update_hands_its_counted_event_ids_on():
    outbox = ControlPublisher("127.0.0.1:9")
    outbox._put(usage("t1", 10, ["e1", "e2"]))
    merged = outbox._put(usage("t1", 30, ["e3"]))
    assert outbox.pending == 1
    assert merged.msg.used_tokens == 30 and merged.msg.counted == ["e1", "e2", "e3"]


async def test_carried_over_event_ids_are_capped_to_keep_a_message_small():
    outbox = ControlPublisher("127.0.0.1:9")
    outbox._put(usage("t1", 10, [f"old-{i}" for i in range(MAX_COUNTED_IDS)]))
    merged = outbox._put(usage("t1", 20, ["new-1", "new-2"]))
    assert len(merged.msg.counted) == MAX_COUNTED_IDS and merged.msg.counted[-2:] == ["new-1", "new-2"]


async def test_while_the_broker_is_known_away_publish_queues_and_answers_at_once():
    outbox = ControlPublisher("127.0.0.1:9", wait_s=30.0)
    outbox._failing = True  # what the sender sets after a failed send
    began = asyncio.get_running_loop().time()
    assert await outbox.publish(TeamState(team_id="t1", name="a")) is False
    assert asyncio.get_running_loop().time() - began < 0.5 and outbox.pending == 1
