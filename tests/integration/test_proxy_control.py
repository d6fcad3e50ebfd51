"""A running proxy's control listener across a restart of the bundled broker (memory only: it comes back
empty, and billing refills it). The listener must re-read the new log from its start, whether the new log is
still shorter than the position it had reached or has already grown past it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.proxy.auth import KeyView
from services.proxy.control import ControlListener
from tests.support.billing import ADMIN, running_billing
from tests.support.stack import publish_key
from tests.support.waiting import eventually
from tollway.broker import BundledBroker
from tollway.topics import ensure_topics


@asynccontextmanager
async def listening(bootstrap: str) -> AsyncIterator[tuple[KeyView, ControlListener]]:
    view = KeyView()
    stop = asyncio.Event()
    listener = ControlListener(bootstrap, view.apply)
    task = asyncio.create_task(listener.run(stop))
    try:
        yield view, listener
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)


async def _view(view: KeyView) -> KeyView:
    return view


async def gone(listener: ControlListener) -> None:
    """Until the listener has dropped its consumer of the killed broker (a restart takes a while; a consumer
    still polling the new broker before the topics are made could make them with the wrong partitions)."""
    await eventually(lambda: asyncio.sleep(0, listener), lambda li: li.rereads >= 1, timeout_s=30)
    await asyncio.sleep(0.5)


async def test_a_running_listener_reads_a_restarted_brokers_log_from_its_start(tmp_path) -> None:
    first = BundledBroker(log_path=tmp_path / "first.log")
    first.start()
    second = BundledBroker(port=first.port, log_path=tmp_path / "second.log")
    try:
        await ensure_topics(first.bootstrap, usage_partitions=1)
        async with listening(first.bootstrap) as (view, listener):
            old = [await publish_key(first.bootstrap, "team-a") for _ in range(3)]
            await eventually(lambda: _view(view), lambda v: all(v.lookup(s) for s, _ in old))
            first.kill()
            await gone(listener)
            second.start()
            await ensure_topics(second.bootstrap, usage_partitions=1)
            new_secret, _ = await publish_key(second.bootstrap, "team-a")  # offset 0 of the new log
            await eventually(lambda: _view(view), lambda v: v.lookup(new_secret) is not None, timeout_s=30)
    finally:
        second.stop()
        first.stop()


async def test_a_revocation_made_while_the_broker_was_away_reaches_a_running_proxy(store, tmp_path) -> None:
    """Billing refills the empty log (the revocation, then the full state) to past where the proxy had read:
    reading on from the old position would skip the revocation."""
    first = BundledBroker(log_path=tmp_path / "first.log")
    first.start()
    second = BundledBroker(port=first.port, log_path=tmp_path / "second.log")
    try:
        await ensure_topics(first.bootstrap, usage_partitions=1)
        async with running_billing(store, first.bootstrap, control_publish_wait_s=0.5) as billing, \
                listening(first.bootstrap) as (view, listener):  # fmt: skip
            team = (await billing.post("/v1/admin/teams", json={"name": "restart"}, headers=ADMIN)).json()
            keys = [(await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
                    for _ in range(3)]  # fmt: skip
            await eventually(lambda: _view(view), lambda v: all(v.lookup(k["key"]) for k in keys))
            first.kill()
            r = await billing.delete(f"/v1/admin/keys/{keys[0]['key_id']}", headers=ADMIN)
            assert r.status_code == 202 and r.json()["will_retry"] is True
            await gone(listener)
            second.start()
            await ensure_topics(second.bootstrap, usage_partitions=1)
            await eventually(lambda: _view(view), lambda v: v.lookup(keys[0]["key"]) is None, timeout_s=60)
            assert all(view.lookup(k["key"]) is not None for k in keys[1:])
    finally:
        second.stop()
        first.stop()
