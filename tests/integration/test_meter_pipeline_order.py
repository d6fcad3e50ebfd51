"""The meter prices batches on several threads, so a later batch can be priced before an earlier one; it must
still be written and committed in fetch order, or a commit could run past a batch not yet written."""

from __future__ import annotations

import threading
import time
from itertools import pairwise

from schemas.config import load_config
from services.meter import consumer as meter_consumer
from services.meter.positions import CommitGuard
from services.meter.settings import MeterSettings
from tests.support.events import make_event
from tests.support.meter_harness import create_topic, meter_task, produce
from tests.support.waiting import eventually

CONFIG = load_config("tollway.yaml")


async def test_a_batch_priced_late_is_still_committed_before_the_ones_after_it(bootstrap, store, unique, monkeypatch):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic, partitions=1)
    real_decode = meter_consumer.decode_and_price_columnar
    slow_first = threading.Event()
    priced: list[int] = []  # first offset of each batch, in the order their pricing finished

    def decode(records, book, *args):
        if not slow_first.is_set():
            slow_first.set()
            time.sleep(1.5)  # the other decode thread prices the next batches meanwhile
        out = real_decode(records, book, *args)
        priced.append(records[0].offset)
        return out

    committed: list[tuple[int, int]] = []
    real_commit = CommitGuard.commit

    async def commit(self, consumer, spans):
        committed.extend(spans.values())
        await real_commit(self, consumer, spans)

    monkeypatch.setattr(meter_consumer, "decode_and_price_columnar", decode)
    monkeypatch.setattr(CommitGuard, "commit", commit)
    events = [make_event(team, prompt_tokens=10 + i % 3, proxy_seq=i + 1) for i in range(3_000)]
    # Produced before the meter starts, so its first fetches find full batches of 500.
    await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in events])
    s = MeterSettings(meter_group=f"g-{unique}", usage_topic=topic, batch_max_rows=500, batch_max_wait_ms=50,
                      rollup_interval_s=3600, decode_threads=2, pipeline_depth=2)  # fmt: skip
    async with meter_task(s, CONFIG, store, bootstrap):
        await eventually(lambda: _sum(committed), lambda n: n == 3_000, timeout_s=60)
    # Pricing finished out of order (the slow first batch came after a later one) ...
    assert priced[0] != 0 and 0 in priced
    # ... yet the writer committed every batch in offset order, each one continuing the last.
    assert committed[0][0] == 0
    assert all(b[0] == a[1] + 1 for a, b in pairwise(committed)), committed
    rows = await store.query("SELECT count(), uniqExact(event_id) FROM {db}.usage_events FINAL WHERE team_id = {t:String}",
                             {"t": team})  # fmt: skip
    assert tuple(rows[0]) == (3_000, 3_000)


async def _sum(spans: list[tuple[int, int]]) -> int:
    return sum(last - first + 1 for first, last in spans)
