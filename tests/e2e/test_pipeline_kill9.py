"""kill -9 of `tollway up` under load, then a restart on the same data dir: every answered call is billed
exactly once (the proxy spool refills the fresh in-memory broker; event_id dedup absorbs the repeats).
The load mixes chat completions with Anthropic Messages calls, plain and streamed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import httpx

from tests.e2e.conftest import TOLLWAY, stack_env, start_stack, stop_stack

QUERY = """
import json, sys, clickhouse_connect
c = clickhouse_connect.get_client(dsn=sys.argv[1])
rows = c.query("SELECT request_id, count() FROM tollway.usage_events FINAL WHERE team_id = %(t)s GROUP BY request_id",
               parameters={"t": sys.argv[2]}).result_rows
print(json.dumps({r: n for r, n in rows}))
"""


def reap_broker(tmp) -> None:
    try:
        os.kill(int((tmp / "data" / "broker.pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def test_kill_9_of_tollway_up_under_load_then_restart_bills_every_answered_call_once(tmp_path):
    env = stack_env(tmp_path, TOLLWAY_METER_SESSION_TIMEOUT_MS="3000")
    stack = start_stack(tmp_path, env)
    answered: list[str] = []
    stop = threading.Event()
    try:
        key = stack.cli("keys", "create", "--team", "kill9")

        def load(worker: int) -> None:
            with httpx.Client(base_url=stack.proxy_url, headers={"authorization": f"Bearer {key['key']}"},
                              timeout=10) as c:  # fmt: skip
                i = 0
                while not stop.is_set():
                    rid = f"w{worker}-{i}"
                    i += 1
                    # by worker % 6: 0, 3 chat; 1 /v1/responses, 2 streamed; 4 Anthropic /v1/messages, 5 streamed
                    api = worker % 6
                    messages = [{"role": "user", "content": rid}]
                    try:
                        if api in (0, 3):
                            r = c.post("/chat/completions", headers={"x-request-id": rid},
                                       json={"model": "gpt-4.1", "messages": messages})  # fmt: skip
                        elif api in (1, 2):
                            r = c.post("/responses", headers={"x-request-id": rid},
                                       json={"model": "gpt-4.1", "input": rid, "stream": api == 2})  # fmt: skip
                        else:
                            r = c.post("/messages", headers={"x-request-id": rid},
                                       json={"model": "claude-sonnet-4.5", "max_tokens": 64, "messages": messages,
                                             "stream": api == 5})  # fmt: skip
                    except httpx.HTTPError:
                        return  # the server died under us: this call was not answered
                    whole = {2: "event: response.completed", 5: '"type":"message_stop"}'}
                    if r.status_code == 200 and (api not in whole or whole[api] in r.text):
                        answered.append(rid)

        threads = [threading.Thread(target=load, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(answered) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        stack.proc.send_signal(signal.SIGKILL)  # mid-load: events in the broker, in flight, in the meter
        stack.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(15)
        assert len(answered) >= 300
        assert {rid.split("-")[0] for rid in answered} == {f"w{w}" for w in range(6)}  # every kind answered

        stack = start_stack(tmp_path, env)  # same data dir and ports: same spool, same proxy instance
        deadline = time.monotonic() + 60
        while True:
            u = httpx.get(f"{stack.billing_url}/v1/usage", params={"team": "kill9"},
                          headers={"authorization": f"Bearer {env['TOLLWAY_ADMIN_TOKEN']}"}).json()  # fmt: skip
            if u["totals"]["requests"] >= len(answered):
                break
            assert time.monotonic() < deadline, f"billed {u['totals']['requests']} of {len(answered)} answered"
            time.sleep(0.2)
        assert stop_stack(stack) == 0
    finally:
        stop.set()
        if stack.proc.poll() is None:
            stack.proc.kill()
            stack.proc.wait()
        reap_broker(tmp_path)

    chdb = f"chdb://{(tmp_path / 'data' / 'clickhouse').resolve()}"
    out = subprocess.run([sys.executable, "-c", QUERY, chdb, key["team_id"]], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    billed = json.loads(out.stdout.strip().splitlines()[-1])
    missing = [rid for rid in answered if rid not in billed]
    assert not missing, f"{len(missing)} answered calls not billed, e.g. {missing[:5]}"
    assert all(n == 1 for n in billed.values())  # each billed once (FINAL: one row per event_id)
    assert len(billed) - len(answered) <= 6  # at most the calls in flight at the kill (billed, not answered)

    rec = subprocess.run([TOLLWAY, "reconcile", "--direct", "--period", datetime.now(UTC).strftime("%Y-%m")],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    report = json.loads(rec.stdout)
    assert rec.returncode == 0 and report["sequence_gaps"] == 0, rec.stdout[-3000:] + rec.stderr[-2000:]
