"""`tollway meter` as a real process, killed with SIGKILL again and again mid-drain: totals stay exact."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support.events import make_event
from tests.support.meter_harness import create_topic, produce
from tests.support.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
TOLLWAY = str(Path(sys.executable).with_name("tollway"))
QUERY = """
import json, sys, clickhouse_connect
c = clickhouse_connect.get_client(dsn=sys.argv[1])
r = c.query("SELECT count(), sum(prompt_tokens), sum(completion_tokens), toString(sum(cost_total)) "
            "FROM tollway.usage_events FINAL WHERE team_id = %(t)s", parameters={"t": sys.argv[2]}).result_rows[0]
raw = c.query("SELECT count() FROM tollway.usage_events WHERE team_id = %(t)s", parameters={"t": sys.argv[2]})
print(json.dumps({"count": r[0], "prompt": r[1], "completion": r[2], "cost": r[3], "raw": raw.result_rows[0][0]}))
"""


def meter_env(bootstrap: str, chdb: Path, group: str, topic: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update(TOLLWAY_KAFKA_BOOTSTRAP=bootstrap, TOLLWAY_CLICKHOUSE_URL=f"chdb://{chdb}", TOLLWAY_METER_GROUP=group,
               TOLLWAY_USAGE_TOPIC=topic, TOLLWAY_BATCH_MAX_ROWS="400", TOLLWAY_BATCH_MAX_WAIT_MS="20",
               TOLLWAY_CONFIG=str(REPO / "tollway.yaml"), TOLLWAY_LOG_FORMAT="json", TOLLWAY_LOG_LEVEL="warning",
               TOLLWAY_DATA_DIR=str(chdb.parent), TOLLWAY_METER_SESSION_TIMEOUT_MS="3000")  # fmt: skip
    return env


def spawn_meter(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([TOLLWAY, "meter"], env=env, stdout=out, stderr=subprocess.STDOUT)


def query_totals(chdb: Path, team: str) -> subprocess.CompletedProcess[str]:
    """The test process holds its own chdb engine: read the meter's database from a fresh process."""
    return subprocess.run([sys.executable, "-c", QUERY, f"chdb://{chdb}", team], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


async def committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return sum([(await c.committed(TopicPartition(topic, p))) or 0 for p in range(partitions)])
    finally:
        await c.stop()


async def test_meter_killed_mid_drain_repeatedly_bills_each_event_once(bootstrap, tmp_path, unique):
    topic, group, team = f"usage-{unique}", f"kill-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic, partitions=4)
    events = [make_event(team, key_id=f"k{i % 3}", prompt_tokens=10 + i % 11, completion_tokens=i % 13)
              for i in range(12_000)]  # fmt: skip
    keys = [f"{team}-{i % 8}".encode() for i in range(len(events))]  # spread over every partition
    ends = await produce(bootstrap, topic, list(zip(keys, [e.to_bytes() for e in events], strict=True)))
    total = sum(ends.values())
    chdb = tmp_path / "clickhouse"
    env = meter_env(bootstrap, chdb, group, topic)
    log = tmp_path / "meter.log"
    procs: list[subprocess.Popen[bytes]] = []
    kills, progress = 0, []
    try:
        while True:
            p = spawn_meter(env, log)
            procs.append(p)
            done = await committed(bootstrap, group, topic, 4)
            if kills >= 3 or done >= total:
                break
            # Let it make some progress (a commit beyond the last), then SIGKILL it mid-drain.
            await eventually(lambda d=done: committed(bootstrap, group, topic, 4), lambda n, d=done: n > d,
                             timeout_s=60, interval_s=0.02)  # fmt: skip
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            kills += 1
            progress.append(await committed(bootstrap, group, topic, 4))
        await eventually(lambda: committed(bootstrap, group, topic, 4), lambda n: n >= total, timeout_s=90)
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert kills == 3 and progress[-1] < total, progress  # the kills really landed mid-drain
    out = await asyncio.to_thread(query_totals, chdb, team)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    cost = sum(e.prompt_tokens for e in events) * Decimal(2) + sum(e.completion_tokens for e in events) * Decimal(8)
    assert got["count"] == len(events)
    assert (got["prompt"], got["completion"]) == (sum(e.prompt_tokens for e in events),
                                                  sum(e.completion_tokens for e in events))  # fmt: skip
    assert Decimal(got["cost"]) == cost / Decimal(1_000_000)
    assert got["raw"] >= len(events)
