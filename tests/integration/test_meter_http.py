"""The standalone meter's HTTP endpoints (/healthz, /readyz, /metrics), probed from outside the way a kubelet and
Prometheus do, against the real broker and the real ClickHouse engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from schemas.config import load_config
from services.meter.consumer import run_meter
from services.meter.health import MeterHealth, serving
from services.meter.settings import MeterSettings
from tests.support.events import make_event
from tests.support.meter_harness import FlakyStore, create_topic, produce
from tests.support.waiting import eventually
from tollway.broker import free_port

REPO = Path(__file__).resolve().parents[2]
TOLLWAY = str(Path(sys.executable).with_name("tollway"))


def meter_env(bootstrap: str, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update(TOLLWAY_KAFKA_BOOTSTRAP=bootstrap, TOLLWAY_CLICKHOUSE_URL=f"chdb://{data_dir / 'clickhouse'}",
               TOLLWAY_DATA_DIR=str(data_dir), TOLLWAY_CONFIG=str(REPO / "tollway.yaml"),
               TOLLWAY_METER_HTTP_PORT=str(port), TOLLWAY_LOG_FORMAT="json",
               TOLLWAY_LOG_LEVEL="warning", TOLLWAY_BATCH_MAX_WAIT_MS="20", TOLLWAY_METER_SESSION_TIMEOUT_MS="3000",
               **extra)  # fmt: skip
    return env


def spawn_meter(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([TOLLWAY, "meter"], env=env, stdout=out, stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def meter_process(env: dict[str, str], log: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    proc = spawn_meter(env, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait, 30)


async def get(client: httpx.AsyncClient, path: str) -> httpx.Response | None:
    """None while nothing listens yet (the process is still importing)."""
    try:
        return await client.get(path)
    except httpx.TransportError:
        return None


def non_loopback_ip() -> str | None:
    """An address of this host other than loopback, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


def written(metrics_text: str) -> float:
    m = re.search(r'^tollway_meter_events_total\{outcome="written"\} (\S+)$', metrics_text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def test_tollway_meter_serves_probes_and_metrics(bootstrap, tmp_path, unique):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic, partitions=2)
    port = free_port()
    env = meter_env(bootstrap, tmp_path, port, TOLLWAY_METER_GROUP=f"http-{unique}", TOLLWAY_USAGE_TOPIC=topic)
    async with (
        meter_process(env, tmp_path / "meter.log") as proc,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client,
    ):
        seen: list[tuple[int, str | None]] = []

        async def readyz() -> httpx.Response | None:
            assert proc.poll() is None, (tmp_path / "meter.log").read_text()[-2000:]
            r = await get(client, "/readyz")
            if r is not None:
                seen.append((r.status_code, r.json()["reason"]))
            return r

        await eventually(readyz, lambda r: r is not None and r.status_code == 200, timeout_s=90, interval_s=0.02)
        # Whatever was seen before ready was the start-up, named as such; readiness then holds.
        assert all(code == 503 and reason.startswith("not started (") for code, reason in seen[:-1]), seen
        assert seen[-1] == (200, None)
        r = await client.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        # The default bind address is every interface: other pods (Prometheus, the kubelet) reach it.
        if ip := non_loopback_ip():
            async with httpx.AsyncClient(timeout=5) as outside:
                assert (await outside.get(f"http://{ip}:{port}/healthz")).status_code == 200

        events = [make_event(team, prompt_tokens=10, completion_tokens=2) for _ in range(50)]
        await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in events])

        async def metrics_text() -> str:
            r = await client.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            return r.text

        text = await eventually(metrics_text, lambda t: written(t) >= 50, timeout_s=60)
        assert written(text) == 50
        assert re.search(r"^tollway_meter_insert_seconds_count [1-9]", text, re.MULTILINE)
        assert "process_cpu_seconds_total" in text  # the default collectors, as the old server had
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["last_insert_accepted_at"]

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0


async def test_tollway_meter_is_alive_but_not_ready_while_kafka_does_not_answer(tmp_path):
    # A listener that accepts and never answers: the meter hangs in its first Kafka request.
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    kafka = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    port = free_port()
    try:
        async with meter_process(meter_env(kafka, tmp_path, port), tmp_path / "meter.log") as proc:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                r = await eventually(lambda: get(client, "/healthz"), lambda r: r is not None, timeout_s=60)
                assert r is not None and r.status_code == 200
                for _ in range(3):
                    r = await client.get("/readyz")
                    assert r.status_code == 503, r.text
                    assert r.json()["reason"] == "not started (creating Kafka topics)"
                    assert r.json()["started"] is False
                    await asyncio.sleep(0.3)
                assert proc.poll() is None
    finally:
        for w in held:
            w.close()
        silent.close()


async def test_readyz_names_failing_clickhouse_inserts_and_recovers(bootstrap, store, unique):
    """The real meter loop over a ClickHouse that rejects inserts for a while, probed over HTTP."""
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic, partitions=2)
    settings = MeterSettings(meter_group=f"g-{unique}", usage_topic=topic, batch_max_wait_ms=20,
                             insert_backoff_max_s=0.3, meter_session_timeout_ms=3000)  # fmt: skip
    flaky = FlakyStore(store)
    flaky.failing = True
    stop = asyncio.Event()
    health = MeterHealth(stop)
    async with serving(health, "127.0.0.1", 0) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        assert (await c.get("/readyz")).json()["reason"] == "not started (starting)"
        task = asyncio.create_task(run_meter(settings, load_config(REPO / "tollway.yaml"), flaky, bootstrap, stop,
                                             health.started))  # fmt: skip
        try:
            await eventually(lambda: c.get("/readyz"), lambda r: r.status_code == 200, timeout_s=30)
            events = [make_event(team) for _ in range(20)]
            await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in events])
            r = await eventually(lambda: c.get("/readyz"), lambda r: r.status_code == 503, timeout_s=30)
            body = r.json()
            assert body["reason"].startswith(f"clickhouse inserts failing since {body['inserts_failing_since']} (")
            assert flaky.failed_attempts >= 1 and (await c.get("/healthz")).status_code == 200

            flaky.failing = False
            r = await eventually(lambda: c.get("/readyz"), lambda r: r.status_code == 200, timeout_s=30)
            assert r.json()["inserts_failing_since"] is None and r.json()["last_insert_accepted_at"]
            rows = await store.query("SELECT count() FROM {db}.usage_events FINAL WHERE team_id = {t:String}",
                                     {"t": team})  # fmt: skip
            assert rows[0][0] == 20
            stop.set()
            assert (await c.get("/readyz")).json()["reason"] == "stopping"
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
