"""Broker down during traffic: the proxy keeps answering, spools every usage event to disk (also across its
own restart), and replays them in order once the broker is back; the meter bills each exactly once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx

from schemas.config import load_config
from services.billing.api.reconcile import reconcile_report
from services.meter.rollups import refresh_all
from services.meter.settings import MeterSettings
from services.proxy.app import create_app
from services.proxy.settings import ProxySettings
from tests.support.meter_harness import meter_task
from tests.support.stack import gateway_config, mock_upstream, publish_key, wait_key_active
from tests.support.waiting import eventually
from tollway.broker import BundledBroker, free_port
from tollway.topics import ensure_topics

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hello there, how are you?"}]}


async def calls(client: httpx.AsyncClient, secret: str, n: int) -> list[int]:
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> int:
        async with sem:
            r = await client.post("/v1/chat/completions", json=CHAT,
                                  headers={"authorization": f"Bearer {secret}", "x-request-id": f"r{i}"})  # fmt: skip
            return r.status_code

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_broker_down_then_back_every_answered_call_is_billed_once(store, tmp_path, unique):
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
            config = gateway_config(upstream_url)
            app = create_app(settings, config, broker.bootstrap)
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c:
                    await wait_key_active(c, secret)
                    assert set(await calls(c, secret, 50)) == {200}
                    await eventually(count, lambda n: n == 50, timeout_s=30)

                    broker.kill()  # the broker is gone: the proxy keeps serving, the spool takes the events
                    assert set(await calls(c, secret, 150)) == {200}
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
                    assert set(await calls(c, secret, 50)) == {200}
                    await eventually(count, lambda n: n >= 250, timeout_s=60)
                    await eventually(lambda: _v(app.state.proxy.emitter.queued), lambda q: q == 0, timeout_s=30)
        assert await count() == 250
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
