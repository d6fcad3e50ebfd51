"""Anthropic's Messages API end to end: `tollway up --demo`, the official `anthropic` SDK through the proxy
(create, stream, count_tokens, a prompt-cached pair, a web search, a client hanging up mid-stream, a quota
429), then each call's billed row in ClickHouse (exactly one, every dimension as the SDK saw it) and the
usage API, the invoice and reconcile agreeing on the team's total.

The calls are made once for the module (`billed`), the stack stopped, and its ClickHouse read directly;
each test checks one promise over that record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import anthropic
import httpx
import pytest

from tests.e2e.conftest import Stack, stack_env, start_stack, stop_stack

MODEL = "claude-sonnet-4.5"
MILLION = Decimal(1_000_000)
# tollway.yaml's list prices for MODEL, USD per 1M tokens, restated so the test checks the meter
# (the 2026-12-01 entry: cache writes 1.25x / 2x input, web searches per 1,000; these calls stay under 200K)
UNIT = {
    "input": Decimal("3.00"),
    "cached_input": Decimal("0.30"),
    "output": Decimal("15.00"),
    "cache_write": Decimal("3.75"),
    "cache_write_1h": Decimal("6.00"),
    "web_search": Decimal("10.00"),
}
PER = {c: (Decimal(1_000) if c == "web_search" else MILLION) for c in UNIT}
DIMS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens",
        "web_search_requests")  # fmt: skip
ROW_SQL = """
import json, sys, clickhouse_connect
c = clickhouse_connect.get_client(dsn=sys.argv[1])
cols = ["request_id", "endpoint", "status", "stream", "usage_source", "client_disconnected", "service_tier",
        "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens",
        "web_search_requests"]
rows = c.query(f"SELECT {', '.join(cols)} FROM tollway.usage_events FINAL WHERE team_id = %(t)s",
               parameters={"t": sys.argv[2]}).result_rows
print(json.dumps([dict(zip(cols, [v if isinstance(v, (int, str, bool)) else str(v) for v in r])) for r in rows]))
"""


def components(d: dict[str, int]) -> dict[str, int]:
    """Billed quantities per invoice component for one call's dimensions: cache reads and writes are carved out
    of prompt_tokens, each at its own price, and web searches are billed per 1,000."""
    writes = d["cache_write_tokens"] + d["cache_write_1h_tokens"]
    return {"input": d["prompt_tokens"] - d["cached_tokens"] - writes, "cached_input": d["cached_tokens"],
            "cache_write": d["cache_write_tokens"], "cache_write_1h": d["cache_write_1h_tokens"],
            "output": d["completion_tokens"], "web_search": d["web_search_requests"]}  # fmt: skip


def cost(d: dict[str, int]) -> Decimal:
    return sum((Decimal(q) * UNIT[c] / PER[c] for c, q in components(d).items()), Decimal(0))


def from_usage(u: Any) -> dict[str, int]:
    """The event's dimensions recomputed from an anthropic.types.Usage as the SDK read it."""
    split = u.cache_creation
    w1h = split.ephemeral_1h_input_tokens if split else 0
    w5m = split.ephemeral_5m_input_tokens if split else (u.cache_creation_input_tokens or 0)
    read, write = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
    return {"prompt_tokens": u.input_tokens + read + write, "completion_tokens": u.output_tokens,
            "cached_tokens": read, "cache_write_tokens": w5m, "cache_write_1h_tokens": w1h,
            "web_search_requests": u.server_tool_use.web_search_requests if u.server_tool_use else 0}  # fmt: skip


@dataclass
class Call:
    request_id: str
    endpoint: str = "messages"
    status: str = "ok"
    stream: bool = False
    dims: dict[str, int] | None = None  # None: not exactly knowable by the client (checked by `check`)
    check: Any = None
    tier: str | None = None
    billable: bool = True


@dataclass
class Record:
    team_id: str
    calls: list[Call] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    invoice: dict[str, Any] = field(default_factory=dict)
    reconcile: dict[str, Any] = field(default_factory=dict)
    quota_error: Any = None
    quota_team: str = ""
    quota_rows: list[dict[str, Any]] = field(default_factory=list)

    def row(self, rid: str) -> dict[str, Any]:
        (row,) = [r for r in self.rows if r["request_id"] == rid]
        return row

    def billed_dims(self) -> list[dict[str, int]]:
        return [{k: r[k] for k in DIMS} for r in self.rows if r["status"] in ("ok", "error")]


def admin(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.billing_url, headers={"authorization": f"Bearer {stack.admin_token}"})


def key_with_limits(stack: Stack, team: str, limits: dict[str, Any]) -> dict[str, Any]:
    with admin(stack) as c:
        team_id = c.post("/v1/admin/teams", json={"name": team}).json()["team_id"]
        created = c.post("/v1/admin/keys", json={"team_id": team_id, "limits": limits}).json()
    deadline = time.monotonic() + 5
    while httpx.get(f"{stack.proxy_url}/models", headers={"x-api-key": created["key"]}).status_code != 200:
        assert time.monotonic() < deadline, "new key not accepted"
        time.sleep(0.02)
    return {**created, "team_id": team_id}


def wait_requests(stack: Stack, team_id: str, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    with admin(stack) as c:
        while True:
            u = c.get("/v1/usage", params={"team": team_id, "group_by": "model"}).json()
            if u["totals"]["requests"] >= n:
                return u
            assert time.monotonic() < deadline, f"usage never reached {n} requests: {u['totals']}"
            time.sleep(0.2)


def run_calls(stack: Stack, rec: Record, secret: str) -> None:
    client = anthropic.Anthropic(base_url=stack.proxy_url.removesuffix("/v1"), api_key=secret, max_retries=0)
    tag = uuid.uuid4().hex
    ask = [{"role": "user", "content": f"What is seven times six? ({tag})"}]

    def rid(name: str) -> dict[str, str]:
        return {"x-request-id": f"{name}-{tag}"}

    # a plain create
    made = client.messages.create(model=MODEL, max_tokens=128, messages=ask, extra_headers=rid("create"))
    rec.calls.append(Call(f"create-{tag}", dims=from_usage(made.usage), tier=made.usage.service_tier))
    # a stream: message_start's input and message_delta's output
    with client.messages.stream(model=MODEL, max_tokens=128, messages=ask, extra_headers=rid("stream")) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.usage.output_tokens == len(text.split())
    rec.calls.append(Call(f"stream-{tag}", stream=True, dims=from_usage(final.usage), tier=final.usage.service_tier))
    # count_tokens: seen, never billed
    counted = client.messages.count_tokens(model=MODEL, messages=ask, extra_headers=rid("count"))
    assert counted.input_tokens > 0
    rec.calls.append(Call(f"count-{tag}", endpoint="messages.count_tokens", dims=dict.fromkeys(DIMS, 0)))
    # a prompt-cached pair: the system prompt written (1 h and 5 min breakpoints), then read
    system = [{"type": "text", "text": f"You are a terse calculator {tag}. " * 40,
               "cache_control": {"type": "ephemeral", "ttl": "1h"}},
              {"type": "text", "text": "Answer with a number only. " * 40, "cache_control": {"type": "ephemeral"}}]  # fmt: skip
    for name in ("cache-write", "cache-read"):
        r = client.messages.create(model=MODEL, max_tokens=64, system=system, messages=ask, extra_headers=rid(name))
        rec.calls.append(Call(f"{name}-{tag}", dims=from_usage(r.usage), tier=r.usage.service_tier))
    write, read = rec.calls[-2].dims, rec.calls[-1].dims
    assert write["cache_write_tokens"] > 0 and write["cache_write_1h_tokens"] > 0 and write["cached_tokens"] == 0
    assert read["cached_tokens"] == write["cache_write_tokens"] + write["cache_write_1h_tokens"]
    # a web search (the mock reports the server-side searches it ran), on the priority tier
    web = client.messages.create(
        model=MODEL, max_tokens=64, messages=ask, extra_headers=rid("web"),
        tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        extra_body={"mock": {"web_search_requests": 2, "service_tier": "priority"}},
    )  # fmt: skip
    assert web.usage.server_tool_use.web_search_requests == 2 and web.usage.service_tier == "priority"
    rec.calls.append(Call(f"web-{tag}", dims=from_usage(web.usage), tier="priority"))
    # a client that hangs up mid-stream: billed, its input from message_start, its output estimated
    seen_words = 0
    with client.messages.stream(model=MODEL, max_tokens=1000, messages=ask, extra_headers=rid("hangup"),
                                extra_body={"mock": {"stream_chunks": 300, "chunk_delay_ms": 20}}) as s:  # fmt: skip
        for event in s:
            if event.type == "content_block_delta":
                seen_words += 1
            if seen_words == 5:
                break
        start = from_usage(s.current_message_snapshot.usage)

    def hung_up(row: dict[str, Any]) -> None:
        assert row["client_disconnected"] and row["usage_source"] == "estimated" and row["status"] == "ok"
        assert row["prompt_tokens"] == start["prompt_tokens"] and row["cached_tokens"] == start["cached_tokens"]
        assert seen_words <= row["completion_tokens"] < 300

    rec.calls.append(Call(f"hangup-{tag}", stream=True, check=hung_up))


@pytest.fixture(scope="module")
def billed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Record]:
    tmp = tmp_path_factory.mktemp("messages")
    stack = start_stack(tmp, stack_env(tmp))
    try:
        main = key_with_limits(stack, f"msg-{uuid.uuid4().hex[:6]}", {})
        rec = Record(main["team_id"])
        run_calls(stack, rec, main["key"])
        # a quota 429, in Anthropic's shape: one call uses the month's single token, the next is refused
        quota = key_with_limits(stack, f"msg-quota-{uuid.uuid4().hex[:6]}", {"tokens_per_month": 1})
        rec.quota_team = quota["team_id"]
        q = anthropic.Anthropic(base_url=stack.proxy_url.removesuffix("/v1"), api_key=quota["key"], max_retries=0)
        q.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.RateLimitError) as err:
            q.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi again"}])
        rec.quota_error = err.value
        rec.usage = wait_requests(stack, rec.team_id, len(rec.calls))
        wait_requests(stack, rec.quota_team, 2)
        period = datetime.now(UTC).strftime("%Y-%m")
        with admin(stack) as c:
            (rec.invoice,) = c.get("/v1/invoices", params={"team": rec.team_id, "period": period}).json()["data"]
            deadline = time.monotonic() + 10  # rollups are recomputed every second
            while True:
                rec.reconcile = c.get("/v1/reconcile", params={"period": period, "team": rec.team_id}).json()
                if Decimal(rec.reconcile["totals"]["rollup_difference_usd"]) == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
    finally:
        stop_stack(stack)
    chdb = f"chdb://{(tmp / 'data' / 'clickhouse').resolve()}"
    for team, into in ((rec.team_id, rec.rows), (rec.quota_team, rec.quota_rows)):
        out = subprocess.run([sys.executable, "-c", ROW_SQL, chdb, team], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        into.extend(json.loads(out.stdout.strip().splitlines()[-1]))
    yield rec


def test_each_call_is_billed_exactly_once_in_every_dimension(billed):
    assert sorted(r["request_id"] for r in billed.rows) == sorted(c.request_id for c in billed.calls)
    for call in billed.calls:
        row = billed.row(call.request_id)  # exactly one row: a second would fail the unpacking
        assert (row["endpoint"], row["status"], row["stream"]) == (call.endpoint, call.status, call.stream), row
        if call.dims is not None:
            assert {k: row[k] for k in DIMS} == call.dims, call.request_id
            assert row["usage_source"] == "provider" and not row["client_disconnected"]
        if call.tier is not None:
            assert row["service_tier"] == call.tier
        if call.check is not None:
            call.check(row)


def test_the_usage_api_agrees_with_the_calls(billed):
    t = billed.usage["totals"]
    dims = billed.billed_dims()
    assert t["requests"] == len(billed.calls) and t["unpriced_requests"] == 0
    assert t["prompt_tokens"] == sum(d["prompt_tokens"] for d in dims)
    assert t["cached_tokens"] == sum(d["cached_tokens"] for d in dims)
    assert t["completion_tokens"] == sum(d["completion_tokens"] for d in dims)
    assert Decimal(t["cost_usd"]) == sum((cost(d) for d in dims), Decimal(0))
    assert [g["model"] for g in billed.usage["groups"]] == [MODEL]


def test_the_invoice_and_reconcile_agree_with_the_usage_api(billed):
    dims = billed.billed_dims()
    exact = sum((cost(d) for d in dims), Decimal(0))
    assert Decimal(billed.usage["totals"]["cost_usd"]) == exact
    lines = {x["component"]: x for x in billed.invoice["lines"] if x["type"] == "usage" and x["model"] == MODEL}
    quantities = {c: sum(components(d)[c] for d in dims) for c in components(dims[0])}
    assert {c: x["quantity"] for c, x in lines.items()} == {c: q for c, q in quantities.items() if q}
    for c, x in lines.items():
        assert Decimal(x["amount_usd"]) == (Decimal(x["quantity"]) * UNIT[c] / PER[c]).quantize(
            Decimal("0.01"), ROUND_HALF_UP
        )
    rec = billed.reconcile
    assert rec["ok"] is True and rec["sequence_gaps"] == 0, rec.get("problems")
    (row,) = [r for r in rec["rows"] if r["team_id"] == billed.team_id and r["model"] == MODEL]
    assert Decimal(row["metered_usd"]) == exact
    assert Decimal(row["billable_usd"]) == sum((Decimal(x["amount_usd"]) for x in lines.values()), Decimal(0))


def test_a_quota_429_is_a_rate_limit_error_in_anthropics_shape(billed):
    err = billed.quota_error
    assert err.status_code == 429 and err.body["type"] == "error"
    assert err.body["error"]["type"] == "rate_limit_error" and "quota" in err.body["error"]["message"]
    assert int(err.response.headers["retry-after"]) >= 1 and err.response.headers["x-request-id"]
    statuses = sorted(r["status"] for r in billed.quota_rows)
    assert statuses == ["ok", "rejected"]
    (rejected,) = [r for r in billed.quota_rows if r["status"] == "rejected"]
    assert all(rejected[k] == 0 for k in DIMS)
