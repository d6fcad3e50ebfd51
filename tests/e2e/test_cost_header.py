"""The cost told to the caller is the amount billed, end to end: `tollway up --demo`, the official OpenAI SDK,
`x-tollway-cost-usd` on a plain answer and `usage.cost` in a stream, against billing's usage API for the
same call (one key per call, so the key's usage is that call). The expected amount is recomputed here from
tollway.yaml's prices and the tokens, without the gateway's pricing code."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime
from decimal import Decimal

import httpx
import openai
import yaml

from tests.e2e.conftest import REPO

MILLION = Decimal(1_000_000)


def entry_in_force(model: str, day: date) -> dict:
    """The model's price entry in force on `day`, read straight from the YAML."""
    entries = yaml.safe_load((REPO / "tollway.yaml").read_text())["models"][model]["prices"]
    return max((e for e in entries if e["effective_from"] <= day), key=lambda e: e["effective_from"])


def list_price(model: str, day: date) -> tuple[Decimal, Decimal, Decimal]:
    """(input, output, cached_input) per 1M in force on `day`, read straight from the YAML."""
    p = entry_in_force(model, day)
    inp = Decimal(str(p["input"]))
    return inp, Decimal(str(p.get("output", "0"))), Decimal(str(p.get("cached_input", inp)))


def expected(model: str, prompt: int, completion: int, cached: int = 0) -> Decimal:
    inp, out, cached_rate = list_price(model, datetime.now(UTC).date())
    return ((prompt - cached) * inp + cached * cached_rate + completion * out) / MILLION


def billed(stack, secret: str, requests: int = 1, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{stack.billing_url}/v1/usage", headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
        totals = r.json()["totals"]
        if totals["requests"] >= requests:
            return totals
        assert time.monotonic() < deadline, f"usage never reached {requests} requests: {totals}"
        time.sleep(0.1)


def client_for(stack, team: str) -> tuple[openai.OpenAI, str]:
    key = stack.new_key(team)["key"]
    return openai.OpenAI(base_url=stack.proxy_url, api_key=key, max_retries=0), key


def test_the_cost_header_is_exactly_what_the_call_is_billed(stack):
    client, key = client_for(stack, "cost-plain")
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4", messages=[{"role": "user", "content": "What does a toll road cost per mile?"}]
    )
    r = raw.parse()
    told = raw.headers["x-tollway-cost-usd"]
    assert raw.headers["x-tollway-cost-status"] == "provisional"
    since = entry_in_force("gpt-4.1", datetime.now(UTC).date())["effective_from"]
    assert raw.headers["x-tollway-price-version"].startswith(f"gpt-4.1/*@{since.isoformat()}#")
    assert "e" not in told.lower() and Decimal(told) > 0
    assert Decimal(told) == expected("gpt-4.1", r.usage.prompt_tokens, r.usage.completion_tokens)
    totals = billed(stack, key)
    assert Decimal(totals["cost_usd"]) == Decimal(told)
    assert (totals["quoted_requests"], Decimal(totals["quoted_usd"]), totals["quote_differences"]) == (
        1, Decimal(told), 0)  # fmt: skip


def test_the_streams_usage_cost_is_exactly_what_the_call_is_billed(stack):
    client, key = client_for(stack, "cost-stream")
    with client.chat.completions.with_streaming_response.create(
        model="claude-sonnet", messages=[{"role": "user", "content": "Count to five."}], stream=True,
        stream_options={"include_usage": True},
    ) as resp:  # fmt: skip
        assert "x-tollway-cost-usd" not in resp.headers
        events = [json.loads(line[5:], parse_float=Decimal) for line in resp.iter_lines()
                  if line.startswith("data:") and line != "data: [DONE]"]  # fmt: skip
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and isinstance(usage["cost"], Decimal)
    assert usage["cost"] == expected("claude-sonnet-4.5", usage["prompt_tokens"], usage["completion_tokens"])
    totals = billed(stack, key)
    assert Decimal(totals["cost_usd"]) == usage["cost"] and totals["quote_differences"] == 0

    # the SDK's own chunk objects carry it too (as a float: exact only in the JSON text above)
    chunks = client.chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "Again."}],
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    last = [c for c in chunks if c.usage][-1]
    assert last.usage.cost == float(expected("claude-sonnet-4.5", last.usage.prompt_tokens,
                                             last.usage.completion_tokens))  # fmt: skip


def test_the_header_says_when_the_amount_is_an_estimate_or_a_cache_hit(stack):
    client, key = client_for(stack, "cost-status")
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "No usage reported, please."}],
        extra_body={"mock": {"usage": False}},
    )  # fmt: skip
    assert raw.headers["x-tollway-cost-status"] == "estimated" and raw.parse().usage is None
    estimate = Decimal(raw.headers["x-tollway-cost-usd"])
    assert Decimal(billed(stack, key)["cost_usd"]) == estimate > 0  # billed on the same estimate

    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "Cache this one."}], "temperature": 0}
    first = client.chat.completions.with_raw_response.create(**body)
    again = client.chat.completions.with_raw_response.create(**body)
    assert first.headers["x-tollway-cost-status"] == "provisional"
    assert (again.headers["x-tollway-cache"], again.headers["x-tollway-cost-usd"],
            again.headers["x-tollway-cost-status"]) == ("hit", "0", "cached")  # fmt: skip
    totals = billed(stack, key, requests=3)
    assert Decimal(totals["cost_usd"]) == estimate + Decimal(first.headers["x-tollway-cost-usd"])
    assert totals["cache_hits"] == 1 and totals["quoted_requests"] == 3 and totals["quote_differences"] == 0


def rates_in_force(model: str, tier: str = "") -> dict[str, Decimal]:
    """Every unit price of the entry in force today, the served tier's rates over the base ones, from the YAML."""
    entry = entry_in_force(model, datetime.now(UTC).date())
    base = {k: Decimal(str(v)) for k, v in entry.items() if k in ("input", "output", "cached_input", "cache_write",
                                                                  "cache_write_1h", "request", "web_search")}  # fmt: skip
    tiered = {k: Decimal(str(v)) for k, v in (entry.get("service_tiers") or {}).get(tier, {}).items()}
    r = {**base, **tiered}
    r.setdefault("cached_input", r["input"])
    r.setdefault("cache_write", r["input"])
    r.setdefault("cache_write_1h", r["input"])
    return r


def priced(r: dict[str, Decimal], uncached: int, cached: int, write_5m: int, write_1h: int, output: int,
           searches: int) -> Decimal:  # fmt: skip
    return (uncached * r["input"] + cached * r["cached_input"] + write_5m * r["cache_write"]
            + write_1h * r["cache_write_1h"] + output * r["output"]) / MILLION + r.get("request", Decimal(0)) + (
        searches * r.get("web_search", Decimal(0)) / 1000)  # fmt: skip


def sse_events(lines) -> list[tuple[str, dict]]:
    """(event name, data parsed with exact Decimals) of a typed SSE stream."""
    out, name = [], ""
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            out.append((name, json.loads(line[5:], parse_float=Decimal)))
    return out


def test_the_messages_streams_usage_cost_is_exactly_what_the_call_is_billed(stack):
    import anthropic

    key = stack.new_key("cost-messages-stream")["key"]
    mock = {"input_tokens": 60, "cached_tokens": 20, "cache_write_tokens": 6, "cache_write_1h_tokens": 4,
            "web_search_requests": 1}  # fmt: skip
    body = {"model": "claude-sonnet", "max_tokens": 64, "stream": True, "mock": mock,
            "messages": [{"role": "user", "content": "Count to five."}]}  # fmt: skip
    with httpx.stream("POST", stack.proxy_url + "/messages", json=body, timeout=30,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"}) as r:  # fmt: skip
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    start = next(d for n, d in events if n == "message_start")["message"]["usage"]
    (delta,) = [d for n, d in events if n == "message_delta"]
    u = {**start, **{k: v for k, v in delta["usage"].items() if v is not None}}
    split = u["cache_creation"]
    assert (u["cache_read_input_tokens"], split["ephemeral_5m_input_tokens"], split["ephemeral_1h_input_tokens"],
            u["server_tool_use"]["web_search_requests"]) == (20, 6, 4, 1)  # fmt: skip
    cost = delta["usage"]["cost"]
    assert isinstance(cost, Decimal) and cost == priced(
        rates_in_force("claude-sonnet-4.5"), u["input_tokens"], 20, 6, 4, u["output_tokens"], 1)  # fmt: skip
    totals = billed(stack, key)
    assert Decimal(totals["cost_usd"]) == cost and totals["quote_differences"] == 0

    # the official SDK reads every event; the amount rides on the usage model as an extra field (a float)
    client = anthropic.Anthropic(base_url=stack.proxy_url.removesuffix("/v1"), api_key=key, max_retries=0)
    with client.messages.stream(model="claude-sonnet", max_tokens=64, extra_body={"mock": mock},
                                messages=[{"role": "user", "content": "Again."}]) as stream:  # fmt: skip
        deltas = [ev for ev in stream if ev.type == "message_delta"]
        final = stream.get_final_message()
    assert final.usage.cache_creation_input_tokens == 10 and deltas[0].usage.model_extra["cost"] == float(
        priced(rates_in_force("claude-sonnet-4.5"), final.usage.input_tokens, 20, 6, 4, final.usage.output_tokens, 1)
    )


def test_the_responses_streams_usage_cost_is_exactly_what_the_call_is_billed(stack):
    client, key = client_for(stack, "cost-responses-stream")
    mock = {"cached_tokens": 6, "reasoning_tokens": 5, "web_search_requests": 2, "service_tier": "priority"}
    body = {"model": "gpt-4.1", "input": "What does a toll road cost per mile?", "stream": True, "mock": mock}
    with httpx.stream("POST", stack.proxy_url + "/responses", json=body, timeout=30,
                      headers={"authorization": f"Bearer {key}"}) as r:  # fmt: skip
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    name, done = events[-1]
    final = done["response"]
    u = final["usage"]
    searches = sum(1 for item in final["output"] if item["type"] == "web_search_call")
    assert name == "response.completed" and final["service_tier"] == "priority" and searches == 2
    cached = u["input_tokens_details"]["cached_tokens"]
    assert cached == 6 and u["output_tokens_details"]["reasoning_tokens"] == 5
    cost = u["cost"]
    assert isinstance(cost, Decimal) and cost == priced(rates_in_force("gpt-4.1", "priority"),
                                                        u["input_tokens"] - cached, cached, 0, 0,
                                                        u["output_tokens"], searches)  # fmt: skip
    totals = billed(stack, key)
    assert Decimal(totals["cost_usd"]) == cost and totals["quote_differences"] == 0

    # the official SDK's stream accumulates the final response, cost included (as a float)
    with client.responses.stream(model="gpt-4.1", input="Again.", extra_body={"mock": mock}) as stream:
        text = "".join(ev.delta for ev in stream if ev.type == "response.output_text.delta")
        response = stream.get_final_response()
    assert response.output_text == text and response.usage is not None
    got = response.usage
    assert got.model_extra["cost"] == float(priced(rates_in_force("gpt-4.1", "priority"),
                                                   got.input_tokens - 6, 6, 0, 0, got.output_tokens, 2))  # fmt: skip
