"""The foundation's promise, end to end with real processes: `tollway up --demo`, a key from the CLI,
the official OpenAI SDK through the proxy, and billing's usage equal to what the client was told."""

from __future__ import annotations

import os
import subprocess
import time
from decimal import Decimal

import httpx
import openai
import pytest

from tests.e2e.conftest import TOLLWAY, stack_env, start_stack, stop_stack

# Catalog list prices (tollway.yaml), USD per 1M tokens, restated here so the test checks the meter.
PRICES = {"gpt-4.1": (Decimal("2.00"), Decimal("8.00")), "claude-sonnet-4.5": (Decimal("3.00"), Decimal("15.00"))}


def usage(stack, secret: str, **params: str) -> dict:
    r = httpx.get(f"{stack.billing_url}/v1/usage", params=params, headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 200, r.text
    return r.json()


def wait_usage(stack, secret: str, requests: int, timeout_s: float = 20.0, **params: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        u = usage(stack, secret, **params)
        if u["totals"]["requests"] >= requests:
            return u
        assert time.monotonic() < deadline, f"usage never reached {requests} requests: {u}"
        time.sleep(0.1)


def test_sdk_calls_are_billed_exactly_what_the_client_was_told(stack):
    created = stack.new_key("acme")
    assert created["key"].startswith("tw-") and created["team_id"] and created["key_id"]
    client = openai.OpenAI(base_url=stack.proxy_url, api_key=created["key"], max_retries=0)

    seen = {m: [0, 0] for m in PRICES}
    calls = [("gpt-4.1", False), ("gpt-4", False), ("claude-sonnet", False), ("gpt-4.1", True)] * 3
    t0 = time.monotonic()
    for i, (model, stream) in enumerate(calls):
        messages = [{"role": "user", "content": f"Question {i}: what is {i} times {i + 1}?"}]
        if stream:
            chunks = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                    stream_options={"include_usage": True})  # fmt: skip
            u = next(c.usage for c in chunks if c.usage)
            served = "gpt-4.1"
        else:
            r = client.chat.completions.create(model=model, messages=messages)
            u, served = r.usage, {"gpt-4": "gpt-4.1", "claude-sonnet": "claude-sonnet-4.5"}.get(model, model)
        seen[served][0] += u.prompt_tokens
        seen[served][1] += u.completion_tokens

    report = wait_usage(stack, created["key"], len(calls), group_by="model")
    visible_after_s = time.monotonic() - t0
    by_model = {g["model"]: g for g in report["groups"]}
    assert set(by_model) == set(PRICES)
    for model, (prompt, completion) in seen.items():
        g = by_model[model]
        assert (g["prompt_tokens"], g["completion_tokens"]) == (prompt, completion)
        p_in, p_out = PRICES[model]
        assert Decimal(g["cost_usd"]) == (prompt * p_in + completion * p_out) / Decimal(1_000_000)
    t = report["totals"]
    assert t["requests"] == len(calls) and t["unpriced_requests"] == 0
    assert Decimal(t["cost_usd"]) == sum(Decimal(g["cost_usd"]) for g in by_model.values())
    assert visible_after_s < 15


def test_group_by_key_and_day_and_team_isolation(stack):
    a = stack.new_key("iso-a")
    b = stack.new_key("iso-b")
    client = openai.OpenAI(base_url=stack.proxy_url, api_key=a["key"], max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "hi"}])
    by_key = wait_usage(stack, a["key"], 3, group_by="key")
    assert [g["key_id"] for g in by_key["groups"]] == [a["key_id"]]
    by_day = usage(stack, a["key"], group_by="day")
    assert len(by_day["groups"]) == 1 and by_day["groups"][0]["requests"] == 3
    # b's key can neither read a's usage nor sees a's calls in its own.
    r = httpx.get(f"{stack.billing_url}/v1/usage", params={"team": a["team_id"]},
                  headers={"authorization": f"Bearer {b['key']}"})  # fmt: skip
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert usage(stack, b["key"])["totals"]["requests"] == 0


def test_revoked_key_stops_working_within_a_second(stack):
    k = stack.new_key("revoke-me")
    client = openai.OpenAI(base_url=stack.proxy_url, api_key=k["key"], max_retries=0)
    client.models.list()
    out = subprocess.run([TOLLWAY, "keys", "revoke", k["key_id"]], env=stack.env, capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    t0 = time.monotonic()
    while True:
        try:
            client.models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() - t0 < 1.0, "revoked key still accepted after 1s"
        time.sleep(0.02)


def test_secrets_never_reach_the_logs(stack):
    k = stack.new_key("logs")
    openai.OpenAI(base_url=stack.proxy_url, api_key=k["key"], max_retries=0).models.list()
    text = stack.log_path.read_text()
    assert k["key"] not in text and k["key"][3:20] not in text
    assert stack.admin_token not in text


def test_bad_config_stops_startup_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: {p: {base_url: 'http://x'}}\nmodels: {m: {routes: [{provider: nope}]}}\n")
    env = {**stack_env(tmp_path), "TOLLWAY_CONFIG": str(bad)}
    out = subprocess.run([TOLLWAY, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "models.m.routes.0.provider" in out.stderr and "nope" in out.stderr


@pytest.mark.slow
def test_ctrl_c_shuts_down_cleanly_and_leaves_no_process(tmp_path):
    s = start_stack(tmp_path, stack_env(tmp_path))
    broker_pid = next(e["pid"] for e in s.log_events() if e.get("event") == "broker_started")
    assert stop_stack(s) == 0
    events = [e.get("event") for e in s.log_events()]
    for name in ("proxy_stopped", "meter_stopped", "billing_stopped", "broker_stopped"):
        assert name in events, events
    assert events.index("proxy_stopped") < events.index("meter_stopped") < events.index("broker_stopped")
    assert not os.path.exists(f"/proc/{broker_pid}") or "zombie" in open(f"/proc/{broker_pid}/status").read()
