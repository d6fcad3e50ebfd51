"""Meter throughput: topic -> ClickHouse events/s, next to the raw consume rate of the same topic, in one run.

    .venv/bin/python -m bench.meter_throughput [--events 800000] [--partitions 4] [--procs 2]

Starts a bundled broker and an embedded ClickHouse in a temp dir, fills a topic, then measures (1) a bare
consumer reading every record (the ceiling), (2) decode and price alone (CPU), both the per-record reference
`decode_and_price` and the columnar path the meter uses (`decode_and_price_columnar`), (3) the real meter loop
(fetch, decode, price, Arrow insert, commit) until every event is committed, in this process. The meter rate
is steady state: events committed between 20% of the topic and the point where the fetcher would reach its
end (`meter_rate_window`, see `_window`), over the time between them. Group join and warm-up come before that
window (`meter_first_commit_s`), and after it the pipeline only drains batches it fetched earlier: counting
either would misstate the rate. `--procs N` also runs N meter processes in one consumer group (each with its
own embedded ClickHouse, as chdb allows one engine per process) on a second topic and reports their combined
rate from the group's committed offsets over the same window. The box is shared: the load average is in the
output; repeat runs and report ranges.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import uuid_utils
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.clickhouse import Store
from schemas.config import load_config
from schemas.events import UsageEvent, utc_now
from schemas.prices import PriceBook
from services.meter import metrics
from services.meter.columnar import decode_and_price_columnar
from services.meter.consumer import run_meter
from services.meter.reference import decode_and_price
from services.meter.settings import MeterSettings
from tollway.broker import BundledBroker
from tollway.topics import create_missing

TOPIC = "bench.usage"


def usage_event(i: int) -> bytes:
    """The i-th call of the load: an ordinary successful chat call by one of 50 teams and 200 keys."""
    return UsageEvent(event_id=str(uuid_utils.uuid7()), occurred_at=utc_now(), request_id="req_bench",
                      team_id=f"team-{i % 50}", key_id=f"k{i % 200}", endpoint="chat.completions",
                      requested_model="gpt-4.1", served_model="gpt-4.1", provider="openai", status="ok",
                      http_status=200, prompt_tokens=100 + i % 900, completion_tokens=i % 500, attempts=1,
                      proxy_instance="bench", proxy_seq=i + 1).to_bytes()  # fmt: skip


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    await create_missing(bootstrap, {topic: partitions})


async def fill(bootstrap: str, n: int, topic: str = TOPIC) -> list[bytes]:
    values = [usage_event(i) for i in range(n)]
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, compression_type="lz4",
                         max_batch_size=1024 * 1024)  # fmt: skip
    await p.start()
    try:
        futs = [await p.send(topic, v, key=f"team-{i % 50}".encode()) for i, v in enumerate(values)]
        await asyncio.gather(*futs)
    finally:
        await p.stop()
    return values


async def raw_consume(bootstrap: str, n: int) -> float:
    c = AIOKafkaConsumer(TOPIC, bootstrap_servers=bootstrap, group_id="bench-raw", auto_offset_reset="earliest",
                         enable_auto_commit=False, max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)  # fmt: skip
    await c.start()
    try:
        got, t0 = 0, None
        while got < n:
            batch = await c.getmany(timeout_ms=500, max_records=20_000)
            t0 = t0 or time.perf_counter()
            got += sum(len(v) for v in batch.values())
        return n / (time.perf_counter() - t0)
    finally:
        await c.stop()


def cpu_only(values: list[bytes], book: PriceBook, decode=decode_and_price) -> float:
    recs = [SimpleNamespace(topic=TOPIC, partition=0, offset=i, key=None, value=v) for i, v in enumerate(values)]
    t0 = time.perf_counter()
    for i in range(0, len(recs), 20_000):
        decode(recs[i : i + 20_000], book)
    return len(recs) / (time.perf_counter() - t0)


BATCH_ROWS = int(os.environ.get("BENCH_METER_BATCH_ROWS", "50000"))  # the meter's default; env for experiments


def _settings(group: str, topic: str) -> MeterSettings:
    return MeterSettings(meter_group=group, usage_topic=topic, batch_max_rows=BATCH_ROWS, batch_max_wait_ms=200,
                         rollup_interval_s=3600)  # fmt: skip


def _window(n: int) -> tuple[int, int]:
    """The committed counts between which a rate is steady: after the first batches (group join, warm-up)
    and before the fetcher reaches the end of the topic (from then on the pipeline only drains, which would
    flatter the rate). The pipeline holds at most 1 fetching + pipeline_depth queued + 1 writing batches."""
    in_pipeline = (MeterSettings().pipeline_depth + 2) * BATCH_ROWS
    return max(n // 5, BATCH_ROWS), n - in_pipeline - BATCH_ROWS


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def meter(bootstrap: str, n: int, tmp: Path) -> dict:
    store = Store(f"chdb://{tmp / 'clickhouse'}")
    await store.open()
    await store.migrate()
    stop, started = asyncio.Event(), asyncio.Event()
    written = metrics.EVENTS.labels("written")
    base = written._value.get()
    task = asyncio.create_task(run_meter(_settings("bench-meter", TOPIC), load_config("tollway.yaml"), store,
                                         bootstrap, stop, started))  # fmt: skip
    await started.wait()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    rss_start = rss_peak = _rss_mb()
    lo, hi = _window(n)
    marks: dict[str, tuple[float, int]] = {}
    while (done := written._value.get() - base) < n:
        for name, at in (("first", 1), ("lo", lo), ("hi", hi)):
            if name not in marks and done >= at:
                marks[name] = (time.perf_counter(), done)
        await asyncio.sleep(0.005)
        rss_peak = max(rss_peak, _rss_mb())
    t_end, cpu = time.perf_counter(), time.process_time() - cpu_start
    stop.set()
    await task
    rows = (await store.query("SELECT count() FROM {db}.usage_events FINAL"))[0][0]
    await store.close()
    t_end_n = (t_end, n)
    (t_a, c_a), (t_b, c_b) = marks.get("lo", t_end_n), marks.get("hi", t_end_n)
    if c_b <= c_a:
        (t_a, c_a), (t_b, c_b) = marks.get("first", (t_start, 0)), t_end_n
    t_first, at_first = marks.get("first", t_end_n)
    return {"meter_topic_to_clickhouse_eps": round((c_b - c_a) / max(t_b - t_a, 1e-9)),
            "meter_rate_window": [c_a, c_b],
            "meter_first_commit_s": round(t_first - t_start, 3), "meter_first_batch_rows": at_first,
            "meter_wall_eps": round(n / (t_end - t_start)), "rows_final": rows,
            # CPU of this whole process (all threads: loop, ClickHouse engine, merges) per event, so a rate
            # per core that a loaded box cannot hide: events / CPU-second.
            "meter_cpu_us_per_event": round(cpu / n * 1e6, 2), "meter_eps_per_cpu_s": round(n / cpu),
            # The memory the pipeline's batches in flight take (fetched, being priced, being written).
            "meter_rss_growth_mb": round(rss_peak - rss_start)}  # fmt: skip


def _meter_child(bootstrap: str, topic: str, data_dir: str, ready: object, stop: object, out: object) -> None:
    async def go() -> None:
        store = Store(f"chdb://{data_dir}")
        await store.open()
        await store.migrate()
        stop_ev, started = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_meter(_settings("bench-meters", topic), load_config("tollway.yaml"), store,
                                             bootstrap, stop_ev, started))  # fmt: skip
        await started.wait()
        ready.set()  # type: ignore[attr-defined]
        await asyncio.to_thread(stop.wait)  # type: ignore[attr-defined]
        stop_ev.set()
        await task
        out.put((await store.query("SELECT count() FROM {db}.usage_events FINAL"))[0][0])  # type: ignore[attr-defined]
        await store.close()

    asyncio.run(go())


async def committed_total(c: AIOKafkaConsumer, tps: list[TopicPartition]) -> int:
    return sum([(await c.committed(tp)) or 0 for tp in tps])


async def meters(bootstrap: str, n: int, procs: int, partitions: int, tmp: Path) -> dict:
    """N meter processes in one group; rate from the group's committed offsets between 20% and 100%."""
    topic = TOPIC + ".multi"
    await create_topic(bootstrap, topic, partitions)
    await fill(bootstrap, n, topic)
    ctx = mp.get_context("spawn")
    ready, stop, out = [ctx.Event() for _ in range(procs)], ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=_meter_child, args=(bootstrap, topic, str(tmp / f"ch{i}"), ready[i], stop, out))
                for i in range(procs)]  # fmt: skip
    for ch in children:
        ch.start()
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="bench-meters", enable_auto_commit=False)
    await probe.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        await asyncio.to_thread(lambda: [e.wait() for e in ready])
        t_start = time.perf_counter()
        lo, hi = _window(n)
        marks: dict[str, tuple[float, int]] = {}
        while (c := await committed_total(probe, tps)) < n:
            for name, at in (("lo", lo), ("hi", hi)):
                if name not in marks and c >= at:
                    marks[name] = (time.perf_counter(), c)
            await asyncio.sleep(0.02)
        t_end = time.perf_counter()
    finally:
        stop.set()
        await probe.stop()
    rows = [out.get(timeout=60) for _ in children]
    for ch in children:
        ch.join(60)
    (t_a, c_a), (t_b, c_b) = marks.get("lo", (t_start, 0)), marks.get("hi", (t_end, n))
    if c_b <= c_a:
        (t_a, c_a), (t_b, c_b) = (t_start, 0), (t_end, n)
    return {f"meters_{procs}_eps": round((c_b - c_a) / max(t_b - t_a, 1e-9)),
            f"meters_{procs}_wall_eps": round(n / (t_end - t_start)), f"meters_{procs}_rows_each": rows}  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=800_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--procs", type=int, default=0, help="also run this many meter processes in one group")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        broker = BundledBroker(log_path=Path(d) / "tansu.log")
        broker.start()
        try:
            await create_topic(broker.bootstrap, TOPIC, args.partitions)
            values = await fill(broker.bootstrap, args.events)
            raw = await raw_consume(broker.bootstrap, args.events)
            book = PriceBook(load_config("tollway.yaml"))
            cpu = cpu_only(values, book)
            columnar = cpu_only(values, book, decode_and_price_columnar)
            res = await meter(broker.bootstrap, args.events, Path(d))
            if args.procs:
                res |= await meters(broker.bootstrap, args.events, args.procs, args.partitions, Path(d))
        finally:
            broker.stop()
    rate = res["meter_topic_to_clickhouse_eps"]
    print(json.dumps({"events": args.events, "raw_consume_eps": round(raw), "decode_and_price_eps": round(cpu),
                      "decode_and_price_columnar_eps": round(columnar),
                      **res, "meter_vs_raw": round(rate / raw, 3), "cpus": os.cpu_count(),
                      "load_avg_before": [round(x, 2) for x in load_before],
                      "load_avg_after": [round(x, 2) for x in os.getloadavg()]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
