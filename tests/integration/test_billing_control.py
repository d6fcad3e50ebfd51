"""Billing -> proxies over `tollway.control.v1`: every admin write lands on the topic, and a start
republishes the whole state ending with a Snapshot. Only key hashes ever travel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.control import CONTROL_TOPIC, KeyState, Snapshot, TeamState, decode
from schemas.keys import hash_key
from tests.support.billing import ADMIN, running_billing

Record = tuple[bytes, object, bytes]  # (kafka key, decoded message, raw value)


async def read_control_until(
    bootstrap: str, done: Callable[[list[Record]], bool], timeout_s: float = 20.0
) -> list[Record]:
    """Read the control topic from the beginning, as a proxy does, until `done` holds for what was seen."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    tp = TopicPartition(CONTROL_TOPIC, 0)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    seen: list[Record] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not done(seen):
                batch = await consumer.getmany(tp, timeout_ms=500)
                seen.extend((r.key, decode(r.value), r.value) for r in batch.get(tp, []))
    finally:
        await consumer.stop()
    return seen


def states_of(seen: list[Record], key_id: str) -> list[KeyState]:
    return [m for _, m, _ in seen if isinstance(m, KeyState) and m.key_id == key_id]


async def test_created_key_is_published_with_its_hash_never_its_secret(billing, bootstrap, unique):
    team = (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)).json()
    created = (
        await billing.post(
            "/v1/admin/keys", json={"team_id": team["team_id"], "plan": "free", "limits": {"rpm": 3}}, headers=ADMIN
        )
    ).json()
    seen = await read_control_until(bootstrap, lambda s: bool(states_of(s, created["key_id"])))

    (state,) = states_of(seen, created["key_id"])
    assert state.key_hash == hash_key(created["key"])
    assert state.team_id == team["team_id"] and state.plan == "free" and state.limits.rpm == 3
    assert state.revoked is False
    kafka_key, _, raw = next(r for r in seen if r[1] is state)
    assert kafka_key == f"key:{created['key_id']}".encode()
    assert created["key"].encode() not in raw
    assert not any(created["key"].encode() in r[2] for r in seen)
    teams = [m for _, m, _ in seen if isinstance(m, TeamState) and m.team_id == team["team_id"]]
    assert teams and teams[0].name == f"t-{unique}"


async def test_revoke_publishes_revoked_true(billing, bootstrap, unique):
    team = (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)).json()
    key = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
    assert (await billing.delete(f"/v1/admin/keys/{key['key_id']}", headers=ADMIN)).status_code == 200

    seen = await read_control_until(bootstrap, lambda s: any(k.revoked for k in states_of(s, key["key_id"])))
    assert [k.revoked for k in states_of(seen, key["key_id"])] == [False, True]


async def test_start_republishes_full_state_ending_with_a_snapshot(store, bootstrap, unique):
    async with running_billing(store, bootstrap) as billing:
        team = (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)).json()
        live = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
        gone = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
        await billing.delete(f"/v1/admin/keys/{gone['key_id']}", headers=ADMIN)

    restarted_at = datetime.now(UTC)
    async with running_billing(store, bootstrap):
        pass  # the lifespan's start is what is under test

    def republished(seen: list[Record]) -> bool:
        return any(isinstance(m, Snapshot) and m.published_at >= restarted_at for _, m, _ in seen)

    seen = await read_control_until(bootstrap, republished)
    end = next(i for i, (_, m, _) in enumerate(seen) if isinstance(m, Snapshot) and m.published_at >= restarted_at)
    snapshot = seen[end][1]
    assert isinstance(snapshot, Snapshot) and (snapshot.teams, snapshot.keys) == (1, 2)
    block = [m for _, m, _ in seen[end - 3 : end]]
    assert isinstance(block[0], TeamState) and block[0].team_id == team["team_id"]
    by_id = {m.key_id: m for m in block[1:] if isinstance(m, KeyState)}
    assert set(by_id) == {live["key_id"], gone["key_id"]}
    assert by_id[live["key_id"]].revoked is False and by_id[gone["key_id"]].revoked is True
    assert by_id[live["key_id"]].key_hash == hash_key(live["key"])
