"""End-user and tag budgets on `tollway up --demo`, driven by the official openai client: alice's budget bites
with a 429 insufficient_quota while bob is served, a tag value's likewise; the alerts land on tollway.alerts.v1
naming the entity; an operator restart keeps every budget, its month-to-date and its exhausted state, and sends
no alert twice; what billing counted for alice is what the usage API shows and the ledger holds."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.control import ALERTS_TOPIC
from tests.e2e.conftest import Stack, stack_env, start_stack, stop_stack

LEDGER = """
import asyncio, json, sys
from schemas.clickhouse import Store
from schemas.periods import bounds
from services.billing.ledger import effective_sql

async def main():
    store = Store(sys.argv[1])
    await store.open()
    start, end = bounds(sys.argv[3])
    rows = await store.query(
        "SELECT toString(sumIf(cost_usd, billable)) FROM " + effective_sql(team=True) + " AS x WHERE end_user = 'alice'",
        parameters={"start": start, "end": end, "team": sys.argv[2]})
    alerts = await store.query(
        "SELECT metric, toString(threshold) FROM {db}.quota_alerts FINAL WHERE entity_id = {e:String} ORDER BY 1, 2",
        parameters={"e": sys.argv[2] + ":alice"})
    print(json.dumps({"alice_usd": rows[0][0], "alerts": [list(a) for a in alerts]}))
    await store.close()

asyncio.run(main())
"""


def printed_bootstrap(s: Stack) -> str:
    deadline = time.monotonic() + 10
    while not (found := re.findall(r"Tollway is up: .* kafka (\S+)", s.log_path.read_text())):
        assert time.monotonic() < deadline, "`tollway up` never printed its Kafka address"
        time.sleep(0.05)
    return found[-1]


def reap_broker(tmp: Path) -> None:
    try:
        pid = int((tmp / "data" / "broker.pid").read_text())
        if b"broker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def read_alerts(bootstrap: str, done, timeout_s: float = 20.0) -> list[dict]:
    async def run() -> list[dict]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        tp = TopicPartition(ALERTS_TOPIC, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        seen: list[dict] = []
        try:
            async with asyncio.timeout(timeout_s):
                while not done(seen):
                    batch = await consumer.getmany(tp, timeout_ms=200)
                    seen.extend(orjson.loads(r.value) for r in batch.get(tp, []))
        finally:
            await consumer.stop()
        return seen

    return asyncio.run(run())


def spend_until_refused(client: openai.OpenAI, **extra) -> tuple[int, openai.RateLimitError]:
    for n in range(300):
        try:
            client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": f"call {n}"}],
                                           **extra)  # fmt: skip
        except openai.RateLimitError as err:
            return n, err
    raise AssertionError("the budget never bit")


def served(client: openai.OpenAI, **extra) -> bool:
    r = client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "hi"}], **extra)
    return r.usage.total_tokens > 0


def test_end_user_and_tag_budgets_bite_alert_and_survive_a_restart(tmp_path: Path) -> None:
    env = stack_env(tmp_path, TOLLWAY_QUOTA_COMMIT_DELAY_S="1")
    s = start_stack(tmp_path, env)
    try:
        bootstrap = printed_bootstrap(s)
        admin = httpx.Client(base_url=s.billing_url, headers={"authorization": f"Bearer {s.admin_token}"}, timeout=10)
        team = admin.post("/v1/admin/teams", json={"name": "saas", "plan": "enterprise"}).json()
        tid = team["team_id"]
        plain = s.cli("keys", "create", "--team", tid)
        tagged = admin.post("/v1/admin/keys", json={"team_id": tid, "metadata": {"project": "apollo"}}).json()
        for body in ({"scope": "end_user", "value": "alice", "budget_usd_per_month": "0.002",
                      "daily_alert_usd": "0.001"},
                     {"scope": "tag", "tag": "project", "value": "apollo", "budget_usd_per_month": "0.002"}):  # fmt: skip
            r = admin.post("/v1/admin/budgets", json={"team_id": tid, **body})
            assert r.status_code == 201 and r.json()["published"], r.text
        listed = admin.get("/v1/admin/budgets", params={"team": tid}).json()["data"]
        assert {(b["scope"], b["value"]) for b in listed} == {("end_user", "alice"), ("tag", "apollo")}

        def client(key: dict) -> openai.OpenAI:
            c = openai.OpenAI(base_url=s.proxy_url, api_key=key["key"], max_retries=0)
            deadline = time.monotonic() + 5
            while True:  # the key reaches the proxy over the control topic
                try:
                    c.models.list()
                    return c
                except openai.AuthenticationError:
                    assert time.monotonic() < deadline, "key never accepted"
                    time.sleep(0.02)

        c_plain, c_tagged = client(plain), client(tagged)
        n, err = spend_until_refused(c_plain, user="alice")
        assert n > 1 and err.status_code == 429 and err.code == "insufficient_quota"
        assert "end user" in err.message
        assert served(c_plain, user="bob") and served(c_plain)  # bob, and no end user at all: served
        n, err = spend_until_refused(c_tagged)
        assert n > 1 and err.code == "insufficient_quota" and "tag value" in err.message
        assert served(c_plain, user="carol")  # carol on the untagged key: neither budget
        # The same tag value from the request's own metadata (attribution) is the same budget: refused at once.
        assert spend_until_refused(c_plain, extra_body={"metadata": {"project": "apollo"}})[0] == 0
        assert served(c_plain, extra_body={"metadata": {"project": "zeus"}})

        alice = f"{tid}:alice"

        def complete(seen: list[dict]) -> bool:
            ids = [a["id"] for a in seen]
            return ids.count(alice) >= 4 and ids.count(f"{tid}:project=apollo") >= 3

        alerts = read_alerts(bootstrap, complete)
        mine = [a for a in alerts if a["id"] == alice]
        assert sorted((a["metric"], a["threshold_pct"]) for a in mine) == [
            ("budget_usd", 50), ("budget_usd", 80), ("budget_usd", 100), ("daily_usd", 100)]  # fmt: skip
        assert {(a["scope"], a["end_user"], a["team_id"]) for a in mine} == {("end_user", "alice", tid)}
        tag_alerts = [a for a in alerts if a["id"] == f"{tid}:project=apollo"]
        assert {(a["tag"], a["value"], a["scope"]) for a in tag_alerts} == {("project", "apollo", "tag")}

        def alice_budget() -> dict:
            data = admin.get("/v1/admin/budgets", params={"team": tid}).json()["data"]
            return next(b for b in data if b["value"] == "alice")

        before = alice_budget()
        assert before["state"] == "exhausted" and Decimal(before["used"]["usd"]) >= Decimal("0.002")
    finally:
        assert stop_stack(s) == 0
        reap_broker(tmp_path)

    # The operator restarts: a fresh bundled broker, the same data dir. Billing seeds from the ledger.
    s = start_stack(tmp_path, env)
    try:
        admin = httpx.Client(base_url=s.billing_url, headers={"authorization": f"Bearer {s.admin_token}"}, timeout=10)
        c_plain = openai.OpenAI(base_url=s.proxy_url, api_key=plain["key"], max_retries=0)
        c_tagged = openai.OpenAI(base_url=s.proxy_url, api_key=tagged["key"], max_retries=0)
        after = alice_budget()
        assert (after["state"], after["used"]) == ("exhausted", before["used"])
        assert spend_until_refused(c_plain, user="alice")[0] == 0  # refused at once: the state came back
        assert spend_until_refused(c_tagged)[0] == 0
        assert served(c_plain, user="bob")
        period = after["period"]
        # The usage API's spend for alice (group_by end_user, read from the ledger) is what billing counted.
        usage = admin.get("/v1/usage", params={"team": tid, "group_by": "end_user"}).json()
        by_user = {g["end_user"]: Decimal(g["cost_usd"]) for g in usage["groups"]}
        assert by_user["alice"] == Decimal(before["used"]["usd"]), usage
    finally:
        assert stop_stack(s) == 0
        reap_broker(tmp_path)

    out = subprocess.run([sys.executable, "-c", LEDGER, f"chdb://{tmp_path / 'data' / 'clickhouse'}", tid, period],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Decimal(got["alice_usd"]) == Decimal(before["used"]["usd"])  # what billing counted = the ledger
    # One claim per threshold across the restart (the restart re-sent none: its topic was fresh).
    assert got["alerts"] == [["budget_usd", "100"], ["budget_usd", "50"], ["budget_usd", "80"], ["daily_usd", "100"]]
