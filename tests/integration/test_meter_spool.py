"""Broker down during traffic: the proxy keeps answering, spools every usage event to disk (also across its
own restart), and replays them in order once the broker is back; the meter bills each exactly once."""

from __future__ import annotations

import asyncio
import struct
import zlib
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from schemas.config import load_config
from schemas.events import USAGE_TOPIC
from services.billing.api.reconcile import reconcile_report
from services.meter.rollups import refresh_all
from services.meter.settings import MeterSettings
from services.proxy.app import create_app
from services.proxy.settings import ProxySettings
from tests.support.events import make_event
from tests.support.meter_harness import meter_task
from tests.support.stack import gateway_config, messages_gateway_config, mock_upstream, publish_key, wait_key_active
from tests.support.waiting import eventually
from tollway.broker import BundledBroker, free_port
from tollway.topics import ensure_topics

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hello there, how are you?"}]}
RESPONSES = {"model": "gpt-4.1", "input": "Hello there, how are you?"}


MESSAGES = {"model": "claude-sonnet-4.5", "max_tokens": 64, "messages": CHAT["messages"]}


async def calls(client: httpx.AsyncClient, secret: str, n: int, api: str = "chat", first: int = 0) -> list[int]:
    """`responses`: /v1/responses, every other call streamed (answered = its response.completed arrived);
    `messages`: Anthropic Messages calls, every other one streamed (answered = message_stop seen)."""
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> int:
        headers = {"authorization": f"Bearer {secret}", "x-request-id": f"r{i}"}
        async with sem:
            if api == "chat":
                r = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
                return r.status_code
            if api == "responses":
                r = await client.post("/v1/responses", json={**RESPONSES, "stream": i % 2 == 1}, headers=headers)
                completed = i % 2 == 0 or "event: response.completed" in r.text
                return r.status_code if completed else 599
            r = await client.post("/v1/messages", json={**MESSAGES, "stream": i % 2 == 1}, headers=headers)
            complete = i % 2 == 0 or r.text.rstrip().endswith('data: {"type":"message_stop"}')
            return r.status_code if complete else 599

    return await asyncio.gather(*(one(i) for i in range(first, first + n)))


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
async def test_broker_down_then_back_every_answered_call_is_billed_once(store, tmp_path, unique, api):
    broker = BundledBroker(port=free_port(), log_path=tmp_path / "tansu.log")
    await asyncio.to_thread(broker.start)
    team = f"team_{unique}"
    period = datetime.now(UTC).strftime("%Y-%m")
    settings = ProxySettings(data_dir=tmp_path, proxy_instance=f"spool-{unique}")
    meter_s = MeterSettings(meter_group=f"g-{unique}", batch_max_wait_ms=50, rollup_interval_s=0.5,
                            meter_session_timeout_ms=3000)  # fmt: skip

    async def count():
        return (await store.query("SELECT count() FROM {db}.usage_events FINAL WHERE team_id = {t:String}",
                                  {"t": team}))[0][0]  # fmt: skip

    try:
        await ensure_topics(broker.bootstrap)
        secret, _ = await publish_key(broker.bootstrap, team)
        async with mock_upstream() as upstream_url, meter_task(meter_s, load_config("tollway.yaml"), store,
                                                               broker.bootstrap):  # fmt: skip
            config = messages_gateway_config(upstream_url)
            app = create_app(settings, config, broker.bootstrap)
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c:
                    await wait_key_active(c, secret)
                    assert set(await calls(c, secret, 50, api)) == {200}
                    await eventually(count, lambda n: n == 50, timeout_s=30)

                    broker.kill()  # the broker is gone: the proxy keeps serving, the spool takes the events
                    assert set(await calls(c, secret, 150, api, 50)) == {200}
                    ready = await c.get("/readyz")
                    assert ready.status_code == 200
                    assert ready.json()["spool"]["pending_events"] >= 150
            # The proxy restarts while the broker is still down: its spool (and sequence) survive on disk.
            app = create_app(settings, config, broker.bootstrap)
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c:
                    assert app.state.proxy.emitter.queued >= 150
                    await broker_back(broker)
                    await publish_key(broker.bootstrap, team, secret=secret)  # what billing republishes on start
                    await wait_key_active(c, secret, timeout_s=30)
                    assert set(await calls(c, secret, 50, api, 200)) == {200}
                    await eventually(count, lambda n: n >= 250, timeout_s=60)
                    await eventually(lambda: _v(app.state.proxy.emitter.queued), lambda q: q == 0, timeout_s=30)
        assert await count() == 250
        rows = await store.query("SELECT request_id, endpoint, stream FROM {db}.usage_events FINAL "
                                 "WHERE team_id = {t:String}", {"t": team})  # fmt: skip
        assert sorted(r[0] for r in rows) == sorted(f"r{i}" for i in range(250))  # each call once, by its id
        endpoint = {"chat": "chat.completions", "responses": "responses", "messages": "messages"}[api]
        assert {r[1] for r in rows} == {endpoint} and {r[2] for r in rows} == (
            {False} if api == "chat" else {False, True}
        )
        await refresh_all(store)
        report = await reconcile_report(store, period, team)
        assert report["ok"] and report["sequence_gaps"] == 0, report
        (seq,) = report["sequences"]
        assert seq["last_seq"] - seq["first_seq"] + 1 == 250
    finally:
        broker.stop()


async def broker_back(broker: BundledBroker) -> None:
    await asyncio.to_thread(broker.start)  # same port, empty (memory storage)
    await ensure_topics(broker.bootstrap)


async def _v(x):
    return x


async def test_a_spool_written_before_records_carried_keys_is_replayed_after_an_upgrade(bootstrap, tmp_path, unique):
    """A proxy upgraded over an unsent spool of the keyless format sends those events (keyed by their team,
    in order, as before) and the events of new calls after them, its sequence continuing from theirs."""
    team = f"team_{unique}"
    settings = ProxySettings(data_dir=tmp_path, proxy_instance=f"upgrade-{unique}")
    old = [make_event(team, proxy_instance=settings.instance(), proxy_seq=i).model_dump_json().encode()
           for i in range(1, 6)]  # fmt: skip
    spool_dir = tmp_path / "proxy" / "spool" / f"upgrade-{unique}"  # where the emitter keeps it (see state.py)
    spool_dir.mkdir(parents=True)
    frames = [struct.pack(">II", len(p), zlib.crc32(p)) + p for p in old]  # [u32 length][u32 crc32][payload]
    (spool_dir / "000000000000.seg").write_bytes(b"".join(frames))
    (spool_dir / "cursor").write_bytes(struct.pack(">QQ", 0, len(frames[0])))  # the first one was acknowledged
    consumer = AIOKafkaConsumer(USAGE_TOPIC, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="latest")  # fmt: skip
    await consumer.start()
    seen: list[tuple[bytes, dict]] = []

    async def mine() -> list[tuple[bytes, dict]]:
        for records in (await consumer.getmany(timeout_ms=100)).values():
            seen.extend((r.key, orjson.loads(r.value)) for r in records)
        return [(k, e) for k, e in seen if e["team_id"] == team]

    try:
        await consumer.getmany(timeout_ms=100)  # positions fixed at "now", before the proxy starts
        secret, _ = await publish_key(bootstrap, team)
        async with mock_upstream() as upstream_url:
            app = create_app(settings, gateway_config(upstream_url), bootstrap)
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c:
                    await wait_key_active(c, secret)
                    assert set(await calls(c, secret, 2)) == {200}
                    got = await eventually(mine, lambda xs: len(xs) >= 6, timeout_s=30)
    finally:
        await consumer.stop()
    assert {k for k, _ in got} == {team.encode()}  # every event keyed by its team, old and new alike
    assert [e["proxy_seq"] for _, e in got] == [2, 3, 4, 5, 6, 7]  # the unsent old ones, in order, then the new
    assert [orjson.dumps(e) for _, e in got[:4]] == [orjson.dumps(orjson.loads(p)) for p in old[1:]]  # unchanged
