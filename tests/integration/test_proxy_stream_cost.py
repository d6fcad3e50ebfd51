"""`usage.cost` in the agent streams, through the real proxy under uvicorn against the real mock upstream: the
official SDKs still read every event, and the amount is exact decimal text equal to what the call's event says
the caller was told (`quoted_cost_usd`) and to the price recomputed here by hand from the config's prices, in
every dimension the mock reports (cache reads and writes 5 min / 1 h, web searches, service tier)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import anthropic
import openai
import orjson
import pytest

from schemas.config import parse_config
from tests.integration.test_proxy_live import served_gateway
from tests.integration.test_proxy_messages import PROVIDER_KEY
from tests.support.stack import mock_upstream
from tests.support.waiting import eventually

M = Decimal(1_000_000)
BASE = {"input": "3", "output": "15", "cached_input": "0.3", "cache_write": "3.75", "cache_write_1h": "6"}
FLEX = {"input": "1.5", "output": "7.5", "cached_input": "0.15", "cache_write": "1.875", "cache_write_1h": "3"}
FEES = {"request": "0.0001", "web_search": "10"}  # USD per call, USD per 1,000 searches
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


def config(up: str) -> Any:
    price = [{**BASE, **FEES, "service_tiers": {"flex": FLEX}}]
    return parse_config({
        "providers": {"anth": {"base_url": up, "api": "anthropic", "timeout_s": 5, "headers": {"x-api-key": PROVIDER_KEY}},
                      "oai": {"base_url": up, "timeout_s": 5}},
        "models": {"claude": {"routes": [{"provider": "anth", "model": "claude-upstream"}], "prices": price},
                   "gpt": {"routes": [{"provider": "oai"}], "prices": price},
                   "free": {"routes": [{"provider": "oai"}]}},
    })  # fmt: skip


def by_hand(e: dict[str, Any]) -> Decimal:
    """The call's price from its recorded counts, restated here on purpose (not the book's code)."""
    r = {k: Decimal(v) for k, v in (FLEX if e["service_tier"] == "flex" else BASE).items()}
    writes = e["cache_write_tokens"] + e["cache_write_1h_tokens"]
    uncached = e["prompt_tokens"] - e["cached_tokens"] - writes
    return (uncached * r["input"] + e["cached_tokens"] * r["cached_input"] + e["completion_tokens"] * r["output"]
            + e["cache_write_tokens"] * r["cache_write"] + e["cache_write_1h_tokens"] * r["cache_write_1h"]) / M + (
        Decimal(FEES["request"]) + e["web_search_requests"] * Decimal(FEES["web_search"]) / 1000)  # fmt: skip


@pytest.fixture
async def live(bootstrap, tmp_path):
    async with mock_upstream() as up, served_gateway(bootstrap, tmp_path, config(up)) as gw:
        yield gw


async def one_event(gw: Any, team: str) -> dict[str, Any]:
    (e,) = await eventually(lambda: asyncio.sleep(0, gw.events_of(team)), lambda ev: len(ev) >= 1)
    return e


def data_of(raw: bytes, kind: str) -> list[bytes]:
    """The data lines of the events of one type, as the bytes went over the wire."""
    return [b.split(b"data: ", 1)[1] for b in raw.split(b"\n\n") if b.startswith(b"event: " + kind.encode() + b"\n")]


async def test_messages_stream_prices_the_whole_call_in_the_final_message_delta(live):
    mock = {"input_tokens": 60, "cached_tokens": 20, "cache_write_tokens": 6, "cache_write_1h_tokens": 4,
            "web_search_requests": 1}  # fmt: skip
    secret, key = live.key()
    body = {"model": "claude", "max_tokens": 64, "messages": MESSAGES, "stream": True, "mock": mock}
    r = await live.client.post(
        "/v1/messages", json=body, headers={"x-api-key": secret, "anthropic-version": "2023-06-01"}
    )
    assert r.status_code == 200
    (delta,) = data_of(r.content, "message_delta")
    e = await one_event(live, key.team_id)
    assert e["cache_write_1h_tokens"] == 4 and e["web_search_requests"] == 1 and e["cached_tokens"] == 20
    usd = e["quoted_cost_usd"]
    assert usd and Decimal(usd) == by_hand(e) == Decimal(e["quoted_cost_usd"])
    assert delta.endswith(b'"cost":' + usd.encode() + b"}}")  # exact decimal text, as a JSON number
    assert orjson.loads(delta)["usage"]["output_tokens"] == e["completion_tokens"]

    # the official SDK reads every event; the extra field rides along on the usage model
    secret, key = live.key()
    client = anthropic.AsyncAnthropic(base_url=str(live.client.base_url), api_key=secret, max_retries=0)
    async with client.messages.stream(model="claude", max_tokens=64, messages=MESSAGES,
                                      extra_body={"mock": mock}) as stream:  # fmt: skip
        deltas = [ev async for ev in stream if ev.type == "message_delta"]
        final = await stream.get_final_message()
    e = await one_event(live, key.team_id)
    assert len(deltas) == 1 and Decimal(str(deltas[0].usage.model_extra["cost"])) == Decimal(e["quoted_cost_usd"])
    assert final.usage.output_tokens == e["completion_tokens"] and final.usage.cache_read_input_tokens == 20


async def test_responses_stream_prices_the_call_in_response_completed(live):
    mock = {"cached_tokens": 6, "reasoning_tokens": 5, "web_search_requests": 2, "service_tier": "flex"}
    secret, key = live.key()
    body = {"model": "gpt", "input": "Hello there, how are you?", "stream": True, "mock": mock}
    r = await live.client.post("/v1/responses", json=body, headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 200
    (done,) = data_of(r.content, "response.completed")
    e = await one_event(live, key.team_id)
    assert e["service_tier"] == "flex" and e["web_search_requests"] == 2 and e["cached_tokens"] == 6
    usd = e["quoted_cost_usd"]
    assert usd and Decimal(usd) == by_hand(e)
    assert done.endswith(b'"cost":' + usd.encode() + b"}}}")
    final = orjson.loads(done)["response"]
    assert final["id"].startswith("resp_tw1.") and final["usage"]["output_tokens"] == e["completion_tokens"]

    secret, key = live.key()
    client = openai.AsyncOpenAI(base_url=str(live.client.base_url) + "/v1", api_key=secret, max_retries=0)
    async with client.responses.stream(model="gpt", input="Hello there, how are you?",
                                       extra_body={"mock": mock}) as stream:  # fmt: skip
        text = "".join([ev.delta async for ev in stream if ev.type == "response.output_text.delta"])
        response = await stream.get_final_response()
    e = await one_event(live, key.team_id)
    assert response.output_text == text and response.usage is not None
    assert Decimal(str(response.usage.model_extra["cost"])) == Decimal(e["quoted_cost_usd"]) == by_hand(e)


async def test_an_unpriced_model_streams_no_cost(live):
    secret, key = live.key()
    r = await live.client.post("/v1/responses", json={"model": "free", "input": "Hi", "stream": True},
                               headers={"authorization": f"Bearer {secret}"})  # fmt: skip
    (done,) = data_of(r.content, "response.completed")
    assert "cost" not in orjson.loads(done)["response"]["usage"]
    assert (await one_event(live, key.team_id))["quoted_cost_usd"] == ""
