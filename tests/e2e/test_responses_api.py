"""The Responses API end to end: `tollway up --demo`, the official `openai` SDK (`responses.create`, `.stream`,
`create(stream=True)`, `retrieve`, `input_items.list`, `delete`), a reasoning call, a cached-prefix call, a
client hang-up mid-stream and a quota 429. Each billed call is one event whose every dimension equals what the
SDK saw (recomputed here), and the usage API, the invoice and reconcile agree for the team."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import openai
import pytest

from tests.e2e.conftest import stack_env, start_stack, stop_stack

MODEL = "gpt-4.1"
# tollway.yaml's list prices for gpt-4.1, USD per 1M tokens, restated so the test checks the meter
INPUT, CACHED_INPUT, OUTPUT = Decimal("2.00"), Decimal("0.50"), Decimal("8.00")
WEB_SEARCH = Decimal("10.00")  # per 1,000 (from 2026-12-01); no flex tier for gpt-4.1: flex calls at these rates
MILLION = Decimal(1_000_000)

QUERY = """
import json, sys, clickhouse_connect
c = clickhouse_connect.get_client(dsn=sys.argv[1])
cols = ("request_id", "endpoint", "status", "usage_source", "stream", "client_disconnected", "prompt_tokens",
        "completion_tokens", "cached_tokens", "reasoning_tokens", "web_search_requests", "service_tier",
        "error_code", "cost_total")
rows = c.query("SELECT " + ", ".join(cols) + " FROM tollway.usage_events FINAL WHERE team_id = %(t)s",
               parameters={"t": sys.argv[2]}).result_rows
print(json.dumps([dict(zip(cols, [str(v) if not isinstance(v, (int, bool)) else v for v in r])) for r in rows]))
"""


@dataclass
class Seen:
    """One call's usage as the SDK reported it: what the bill must say."""

    prompt: int
    completion: int
    cached: int = 0
    reasoning: int = 0
    searches: int = 0
    tier: str = "default"


def seen_of(usage, output=(), tier: str = "default") -> Seen:
    return Seen(usage.input_tokens, usage.output_tokens, usage.input_tokens_details.cached_tokens,
                usage.output_tokens_details.reasoning_tokens,
                sum(1 for o in output if o.type == "web_search_call"), tier)  # fmt: skip


def cost(prompt: int, completion: int, cached: int, searches: int = 0) -> Decimal:
    """gpt-4.1's priced dimensions (input, cached input, output, web searches; it has no cache write price of its
    own, no request fee, and its priority tier is not asked for here)."""
    return (
        (prompt - cached) * INPUT + cached * CACHED_INPUT + completion * OUTPUT
    ) / MILLION + searches * WEB_SEARCH / 1000


def rid(name: str) -> dict[str, str]:
    return {"x-request-id": f"e2e-resp-{name}"}


@pytest.fixture
def stack(tmp_path):
    s = start_stack(tmp_path, stack_env(tmp_path))
    yield s
    stop_stack(s)


def admin(stack, path: str, **params: str) -> dict:
    r = httpx.get(f"{stack.billing_url}{path}", params=params,
                  headers={"authorization": f"Bearer {stack.admin_token}"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_responses_calls_through_the_openai_sdk_are_billed_in_every_dimension(stack):
    key = stack.new_key("responses-e2e")
    client = openai.OpenAI(base_url=stack.proxy_url, api_key=key["key"], max_retries=0)
    seen: dict[str, Seen] = {}

    plain = client.responses.create(model=MODEL, input="What is the capital of France?", extra_headers=rid("plain"),
                                    extra_body={"mock": {"web_search_requests": 2, "service_tier": "flex"}})  # fmt: skip
    seen["plain"] = seen_of(plain.usage, plain.output, plain.service_tier)
    assert seen["plain"].searches == 2 and plain.service_tier == "flex"

    with client.responses.stream(model=MODEL, input="Tell me a short story.", extra_headers=rid("stream")) as s:
        text = "".join(ev.delta for ev in s if ev.type == "response.output_text.delta")
        final = s.get_final_response()
    assert final.output_text == text and final.id.startswith("resp_tw1.")
    seen["stream"] = seen_of(final.usage)

    events = list(client.responses.create(model=MODEL, input="Count to five.", stream=True,
                                          extra_headers=rid("create-stream")))  # fmt: skip
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    seen["create-stream"] = seen_of(events[-1].response.usage)

    thinking = client.responses.create(model=MODEL, input="Why is the sky blue?", reasoning={"effort": "low"},
                                       extra_headers=rid("reasoning"))  # fmt: skip
    seen["reasoning"] = seen_of(thinking.usage)
    assert seen["reasoning"].reasoning == 8 and seen["reasoning"].completion > 8

    prefix = "You are a meticulous assistant. " * 40
    cached = client.responses.create(model=MODEL, instructions=prefix, input="Summarise the rules.",
                                     extra_headers=rid("cached"), extra_body={"mock": {"cached_tokens": 128}})  # fmt: skip
    seen["cached"] = seen_of(cached.usage)
    assert seen["cached"].cached == 128 < seen["cached"].prompt

    # follow-ups on the stored plain response: free, but each an event
    got = client.responses.retrieve(plain.id, extra_headers=rid("get"))
    assert got.id == plain.id and got.output_text == plain.output_text
    items = client.responses.input_items.list(plain.id, extra_headers=rid("items"))
    assert [i.content[0].text for i in items.data] == ["What is the capital of France?"]
    chained = client.responses.create(model=MODEL, input="And of Spain?", previous_response_id=plain.id,
                                      extra_headers=rid("chained"))  # fmt: skip
    assert chained.previous_response_id == plain.id
    seen["chained"] = seen_of(chained.usage)
    client.responses.delete(plain.id, extra_headers=rid("delete"))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(plain.id, extra_headers=rid("get-deleted"))
    other = openai.OpenAI(base_url=stack.proxy_url, api_key=stack.new_key("responses-e2e-other")["key"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(chained.id)

    # the client hangs up mid-stream: no usage reached it, the call is still billed (estimated, marked)
    hang = client.responses.create(model=MODEL, input="Write a very long essay.", stream=True,
                                   extra_headers=rid("hang-up"),
                                   extra_body={"mock": {"stream_chunks": 400, "chunk_delay_ms": 10}})  # fmt: skip
    got_chars = 0
    for ev in hang:
        if ev.type == "response.output_text.delta":
            got_chars += len(ev.delta)
            if got_chars > 20:
                break
    hang.close()

    # what billing says, while the stack runs: usage API and reconcile
    billed = {**seen}
    total_cost = sum((cost(s.prompt, s.completion, s.cached, s.searches) for s in billed.values()), Decimal(0))
    calls = len(billed) + 1 + 5  # + the hang-up, + get, items, delete, get-deleted (404) and the other team's 404
    deadline = time.monotonic() + 30
    while True:
        u = httpx.get(f"{stack.billing_url}/v1/usage", headers={"authorization": f"Bearer {key['key']}"}).json()
        if u["totals"]["requests"] >= calls - 1:  # the other team's 404 is the other team's
            break
        assert time.monotonic() < deadline, u
        time.sleep(0.2)
    period = datetime.now(UTC).strftime("%Y-%m")
    rec = admin(stack, "/v1/reconcile", period=period, team=key["team_id"])
    inv = admin(stack, "/v1/invoices", team=key["team_id"], period=period)
    stop_stack(stack)

    out = subprocess.run([sys.executable, "-c", QUERY, f"chdb://{stack.env['TOLLWAY_DATA_DIR']}/clickhouse",
                          key["team_id"]], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["request_id"].removeprefix("e2e-resp-"), []).append(r)
    assert all(len(v) == 1 for v in by_id.values()), by_id  # exactly once
    for name, s in billed.items():
        (e,) = by_id[name]
        assert (e["endpoint"], e["status"], e["usage_source"]) == ("responses", "ok", "provider"), e
        assert (e["prompt_tokens"], e["completion_tokens"], e["cached_tokens"], e["reasoning_tokens"],
                e["web_search_requests"], e["service_tier"]) == (s.prompt, s.completion, s.cached, s.reasoning,
                                                                 s.searches, s.tier), (name, e)  # fmt: skip
        assert Decimal(e["cost_total"]) == cost(s.prompt, s.completion, s.cached, s.searches), (name, e)
    (hung,) = by_id["hang-up"]
    assert hung["client_disconnected"] is True and hung["usage_source"] == "estimated" and hung["stream"] is True
    assert got_chars / 4 <= hung["completion_tokens"] < 400 and hung["prompt_tokens"] > 0
    for name, endpoint, status in (("get", "responses.get", "ok"), ("items", "responses.input_items", "ok"),
                                   ("delete", "responses.delete", "ok"), ("get-deleted", "responses.get", "error")):  # fmt: skip
        (e,) = by_id[name]
        assert (e["endpoint"], e["status"], e["prompt_tokens"], e["completion_tokens"]) == (endpoint, status, 0, 0)
        assert Decimal(e["cost_total"]) == 0
    assert len(rows) == calls - 1

    hang_cost = cost(hung["prompt_tokens"], hung["completion_tokens"], 0)
    t = u["totals"]
    assert t["requests"] == calls - 1 and t["unpriced_requests"] == 0
    assert t["prompt_tokens"] == sum(s.prompt for s in billed.values()) + hung["prompt_tokens"]
    assert t["completion_tokens"] == sum(s.completion for s in billed.values()) + hung["completion_tokens"]
    assert t["cached_tokens"] == sum(s.cached for s in billed.values())
    assert Decimal(t["cost_usd"]) == total_cost + hang_cost
    (row,) = [r for r in rec["rows"] if r["team_id"] == key["team_id"] and r["model"] == MODEL]
    assert Decimal(row["metered_usd"]) == total_cost + hang_cost
    (doc,) = inv["data"]
    usage_lines = [x for x in doc["lines"] if x["type"] == "usage" and x["model"] == MODEL]
    by_component = {x["component"]: x["quantity"] for x in usage_lines}
    prompt = sum(s.prompt for s in billed.values()) + hung["prompt_tokens"]
    cached_total = sum(s.cached for s in billed.values())
    assert by_component["input"] == prompt - cached_total and by_component["cached_input"] == cached_total
    assert by_component["output"] == t["completion_tokens"]
    assert by_component.get("web_search", 0) == sum(s.searches for s in billed.values())  # $10 per 1,000
    assert sum(Decimal(x["amount_usd"]) for x in usage_lines) == Decimal(row["billable_usd"])


def test_a_team_over_its_quota_gets_openais_insufficient_quota_on_responses(tmp_path):
    stack = start_stack(tmp_path, stack_env(tmp_path))
    try:
        r = httpx.post(f"{stack.billing_url}/v1/admin/teams", json={"name": "responses-quota-cap",
                       "limits": {"tokens_per_month": 50}}, headers={"authorization": f"Bearer {stack.admin_token}"})  # fmt: skip
        assert r.status_code in (200, 201), r.text
        capped = stack.cli("keys", "create", "--team", r.json()["team_id"])
        client = openai.OpenAI(base_url=stack.proxy_url, api_key=capped["key"], max_retries=0)
        answered, deadline = 0, time.monotonic() + 20
        while True:
            try:  # the first call is answered (nothing used yet); once its usage is counted, the next is not
                client.responses.create(model=MODEL, input="x" * 400, max_output_tokens=100)
                answered += 1
                assert answered < 5, "calls past a 50-token monthly quota kept being answered"
            except openai.AuthenticationError:  # the new key reaches the proxy through the control topic
                assert time.monotonic() < deadline
                time.sleep(0.05)
            except openai.RateLimitError as err:
                assert err.status_code == 429 and err.code == "insufficient_quota"
                assert err.body["type"] == "insufficient_quota" and err.body["message"]
                break
        assert answered >= 1
    finally:
        stop_stack(stack)
