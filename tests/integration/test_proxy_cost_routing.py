"""The cost told to the caller and the route chosen, through the real proxy app against real mock upstreams:
`x-tollway-cost-usd` (+ version and status) on plain answers, `usage.cost` in a stream's usage chunk when
the caller asked for usage, both kept on the emitted event; `cheapest` and `fastest` routing with the
reason on the event. Expected amounts are recomputed here from the config's prices and the tokens."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.integration.test_proxy_gateway import CHAT, gateway, make_config, set_fault
from tests.integration.test_proxy_messages import body as messages_body
from tests.integration.test_proxy_messages import expected as messages_dims
from tests.integration.test_proxy_messages import messages_config, post
from tests.support.stack import mock_upstream

MILLION = Decimal(1_000_000)
CHAT_PRICE = (Decimal(1), Decimal(2))  # make_config: model `chat` at input 1, output 2 per 1M


def cost(
    usage: dict[str, Any], price: tuple[Decimal, Decimal] = CHAT_PRICE, cached_rate: Decimal | None = None
) -> Decimal:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    rate = price[0] if cached_rate is None else cached_rate
    return (
        (usage["prompt_tokens"] - cached) * price[0] + cached * rate + usage["completion_tokens"] * price[1]
    ) / MILLION


@pytest.fixture
async def single(bootstrap, tmp_path):
    async with mock_upstream() as url, gateway(bootstrap, tmp_path, make_config({"a": url}, [{"provider": "a"}])) as gw:
        yield gw


async def sse_raw(
    client: httpx.AsyncClient, secret: str, body: dict[str, Any], live: bool = True
) -> list[dict[str, Any]]:
    """The stream's events parsed with Decimal for every JSON number with a fraction (usage.cost stays exact)."""
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {secret}"}) as r:  # fmt: skip
        assert r.status_code == 200
        # a live stream's headers leave before its cost is known; a cache hit's is known (0) at once
        assert r.headers.get("x-tollway-cost-usd") == (None if live else "0")
        lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[5:], parse_float=Decimal) for line in lines[:-1]]


async def test_a_plain_answer_carries_its_exact_cost_version_and_status_and_the_event_keeps_them(single):
    secret, key = single.key()
    r = await single.chat(secret)
    assert r.status_code == 200
    want = cost(r.json()["usage"])
    assert (
        r.headers["x-tollway-cost-usd"] == format(want.normalize(), "f")
        and Decimal(r.headers["x-tollway-cost-usd"]) == want
    )
    assert r.headers["x-tollway-cost-status"] == "provisional"
    assert r.headers["x-tollway-price-version"].startswith("chat/*@2000-01-01#")
    (e,) = single.events_of(key.team_id)
    assert e["quoted_cost_usd"] == r.headers["x-tollway-cost-usd"]
    assert e["quoted_price_version"] == r.headers["x-tollway-price-version"]
    assert e["route_reason"] == "only_route"


async def test_cached_prompt_tokens_are_priced_at_the_input_rate_when_no_cached_price_is_set(single):
    secret, _ = single.key()
    r = await single.chat(secret, {**CHAT, "mock": {"cached_tokens": 5}})
    usage = r.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 5
    assert Decimal(r.headers["x-tollway-cost-usd"]) == cost(usage)  # cached_input defaults to input


async def test_a_stream_carries_usage_cost_only_when_the_caller_asked_for_usage(single):
    secret, key = single.key()
    chunks = await sse_raw(single.client, secret, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and isinstance(usage["cost"], Decimal)
    assert usage["cost"] == cost(usage)
    assert all(c.get("usage") is None for c in chunks[:-1])  # only the usage chunk has one
    silent = await sse_raw(single.client, secret, {**CHAT, "stream": True})
    assert not any(c.get("usage") for c in silent)
    told, untold = single.events_of(key.team_id)
    assert Decimal(told["quoted_cost_usd"]) == usage["cost"] and told["quoted_price_version"].startswith("chat/")
    assert (untold["quoted_cost_usd"], untold["quoted_price_version"]) == ("", "")  # nothing was told
    assert untold["prompt_tokens"] > 0  # ...but the call is billed as ever


async def test_unpriced_and_estimated_answers_say_so(single):
    secret, key = single.key()
    unpriced = await single.chat(secret, {**CHAT, "model": "other"})
    assert unpriced.status_code == 200 and unpriced.headers["x-tollway-cost-status"] == "unpriced"
    assert "x-tollway-cost-usd" not in unpriced.headers and "x-tollway-price-version" not in unpriced.headers
    estimated = await single.chat(secret, {**CHAT, "mock": {"usage": False}})
    assert estimated.headers["x-tollway-cost-status"] == "estimated" and "usage" not in estimated.json()
    e_unpriced, e_estimated = single.events_of(key.team_id)
    assert e_unpriced["quoted_cost_usd"] == ""
    assert e_estimated["usage_source"] == "estimated"
    usage = {"prompt_tokens": e_estimated["prompt_tokens"], "completion_tokens": e_estimated["completion_tokens"]}
    assert Decimal(estimated.headers["x-tollway-cost-usd"]) == cost(usage) == Decimal(e_estimated["quoted_cost_usd"])


async def test_a_cache_hit_is_told_zero_plain_and_streamed(single):
    secret, key = single.key()
    body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": f"cache me {uuid.uuid4()}"}]}
    first = await single.chat(secret, body)
    hit = await single.chat(secret, body)
    assert hit.headers["x-tollway-cache"] == "hit"
    assert (hit.headers["x-tollway-cost-usd"], hit.headers["x-tollway-cost-status"]) == ("0", "cached")
    assert hit.headers["x-tollway-price-version"] == first.headers["x-tollway-price-version"]
    chunks = await sse_raw(single.client, secret, {**body, "stream": True, "stream_options": {"include_usage": True}},
                           live=False)  # fmt: skip
    assert chunks[-1]["usage"]["cost"] == 0 and chunks[-1]["usage"]["prompt_tokens"] > 0
    _, e_hit, e_stream_hit = single.events_of(key.team_id)
    assert (e_hit["status"], e_hit["quoted_cost_usd"], e_hit["route_reason"]) == ("cached", "0", "cache")
    assert (e_stream_hit["status"], e_stream_hit["route_reason"]) == ("cached", "cache")


async def test_embeddings_are_told_their_cost(single):
    secret, _ = single.key()
    r = await single.client.post("/v1/embeddings", json={"model": "embed", "input": "hello"},
                                 headers={"authorization": f"Bearer {secret}"})  # fmt: skip
    assert r.status_code == 200 and r.headers["x-tollway-cost-status"] == "unpriced"  # `embed` has no price


async def test_a_failed_call_is_told_nothing(single):
    secret, key = single.key()
    r = await single.chat(secret, {**CHAT, "mock": {"status": 400}})
    assert r.status_code == 400 and not any(h.startswith("x-tollway-cost") for h in r.headers)
    (e,) = single.events_of(key.team_id)
    assert e["quoted_cost_usd"] == "" and e["route_reason"] == "only_route"  # it was routed, then refused


# ---- routing strategies ----

DEAR = [{"input": "10", "output": "10"}]
CHEAP = [{"input": "0.5", "output": "3"}]


async def test_cheapest_sends_every_call_to_the_cheapest_route_and_falls_back_when_it_fails(bootstrap, tmp_path):
    async with mock_upstream() as a, mock_upstream() as b:
        cfg = make_config({"a": a, "b": b}, [{"provider": "a", "weight": 5, "prices": DEAR},
                                             {"provider": "b", "prices": CHEAP}],
                          model_extra={"routing": "cheapest"}, retry={"retries_per_route": 0})  # fmt: skip
        async with gateway(bootstrap, tmp_path, cfg) as gw:
            secret, key = gw.key()
            answers = [await gw.chat(secret) for _ in range(12)]
            events = gw.events_of(key.team_id)
            assert {e["provider"] for e in events} == {"b"}  # weight 5 on a changes nothing: price decides
            assert {e["route_reason"] for e in events} == {"cheapest"}
            r = answers[0]
            assert Decimal(r.headers["x-tollway-cost-usd"]) == cost(r.json()["usage"], (Decimal("0.5"), Decimal(3)))
            assert r.headers["x-tollway-price-version"].startswith("chat/b@")
            await set_fault(b, 503)
            try:
                r = await gw.chat(secret)
            finally:
                await set_fault(b, None)
            last = gw.events_of(key.team_id)[-1]
            assert r.status_code == 200 and (last["provider"], last["route_reason"]) == ("a", "fallback")
            assert last["fallback_used"] is True and last["attempts"] == 2
            assert Decimal(r.headers["x-tollway-cost-usd"]) == cost(r.json()["usage"], (Decimal(10), Decimal(10)))
            assert Decimal(last["quoted_cost_usd"]) == Decimal(r.headers["x-tollway-cost-usd"])


async def test_cheapest_weighs_the_requests_expected_output(bootstrap, tmp_path):
    # a: cheap input, dear output; b: the reverse. A short prompt with a large max_tokens is output-heavy.
    async with mock_upstream() as a, mock_upstream() as b:
        cfg = make_config({"a": a, "b": b}, [{"provider": "a", "prices": [{"input": "0.1", "output": "50"}]},
                                             {"provider": "b", "prices": [{"input": "40", "output": "1"}]}],
                          model_extra={"routing": "cheapest"})  # fmt: skip
        async with gateway(bootstrap, tmp_path, cfg) as gw:
            secret, key = gw.key()
            await gw.chat(secret, {**CHAT, "max_tokens": 4000})
            await gw.chat(secret, {**CHAT, "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 4000}]})
            assert [e["provider"] for e in gw.events_of(key.team_id)] == ["b", "a"]


async def test_fastest_explores_each_route_once_then_keeps_to_the_fastest(bootstrap, tmp_path):
    async with mock_upstream(mock_latency_ms=80) as slow, mock_upstream() as fast:
        cfg = make_config({"slow": slow, "fast": fast}, [{"provider": "slow", "weight": 10}, {"provider": "fast"}],
                          model_extra={"routing": "fastest"})  # fmt: skip
        async with gateway(bootstrap, tmp_path, cfg) as gw:
            secret, key = gw.key()
            for _ in range(12):
                assert (await gw.chat(secret)).status_code == 200
            events = gw.events_of(key.team_id)
            assert Counter(e["provider"] for e in events[:2]) == {"slow": 1, "fast": 1}  # unmeasured go first
            assert [e["provider"] for e in events[2:]] == ["fast"] * 10
            assert {e["route_reason"] for e in events} == {"fastest"}


async def test_weighted_stays_the_default_and_says_so(bootstrap, tmp_path):
    async with mock_upstream() as a, mock_upstream() as b:
        cfg = make_config({"a": a, "b": b}, [{"provider": "a", "prices": DEAR}, {"provider": "b", "prices": CHEAP}],
                          health={"latency_bias": 0})  # fmt: skip
        async with gateway(bootstrap, tmp_path, cfg) as gw:
            secret, key = gw.key()
            for _ in range(30):
                await gw.chat(secret)
            events = gw.events_of(key.team_id)
            assert {e["provider"] for e in events} == {"a", "b"}  # price plays no part
            assert {e["route_reason"] for e in events} == {"weighted"}


# ---- /v1/responses ----


async def test_a_responses_create_is_told_its_cost_and_a_cache_hit_zero(bootstrap, tmp_path):
    async with mock_upstream() as url:
        cfg = make_config({"a": url}, [{"provider": "a"}], model_extra={"prices": [
            {"input": "1", "output": "2", "cached_input": "0.5"}]})  # fmt: skip
        async with gateway(bootstrap, tmp_path, cfg, responses_id_secret="s3cret-for-the-cost-tests") as gw:
            secret, key = gw.key()
            body = {"model": "chat", "input": f"Hello {uuid.uuid4()}", "mock": {"cached_tokens": 6}}
            r = await gw.client.post("/v1/responses", json=body, headers={"authorization": f"Bearer {secret}"})
            assert r.status_code == 200, r.text
            u = r.json()["usage"]
            cached = u["input_tokens_details"]["cached_tokens"]
            want = ((u["input_tokens"] - cached) * 1 + cached * Decimal("0.5") + u["output_tokens"] * 2) / MILLION
            assert cached == 6 and Decimal(r.headers["x-tollway-cost-usd"]) == want
            assert r.headers["x-tollway-cost-status"] == "provisional"
            h = {"authorization": f"Bearer {secret}", "x-tollway-cache": "true"}
            unstored = {**body, "store": False}
            await gw.client.post("/v1/responses", json=unstored, headers=h)
            hit = await gw.client.post("/v1/responses", json=unstored, headers=h)
            assert hit.headers["x-tollway-cache"] == "hit"
            assert (hit.headers["x-tollway-cost-usd"], hit.headers["x-tollway-cost-status"]) == ("0", "cached")
            e, _, e_hit = gw.events_of(key.team_id)
            assert (e["endpoint"], e["quoted_cost_usd"], e["route_reason"]) == (
                "responses", r.headers["x-tollway-cost-usd"], "only_route")  # fmt: skip
            assert (e_hit["status"], e_hit["quoted_cost_usd"], e_hit["route_reason"]) == ("cached", "0", "cache")


# ---- /v1/messages ----


async def test_a_messages_answer_is_told_its_cost_as_the_meter_prices_it(bootstrap, tmp_path):
    async with mock_upstream() as url, gateway(bootstrap, tmp_path, messages_config(url)) as gw:
        secret, key = gw.key()
        r = await post(gw, secret, messages_body(mock={"cached_tokens": 4}))
        assert r.status_code == 200, r.text
        dims = messages_dims(r.json()["usage"])
        cached, prompt = dims["cached_tokens"], dims["prompt_tokens"]
        want = ((prompt - cached) * 3 + cached * Decimal("0.3") + dims["completion_tokens"] * 15) / MILLION
        assert cached == 4 and Decimal(r.headers["x-tollway-cost-usd"]) == want
        assert r.headers["x-tollway-cost-status"] == "provisional"
        assert r.headers["x-tollway-price-version"].startswith("claude/*@")
        (e,) = gw.events_of(key.team_id)
        assert (e["endpoint"], e["quoted_cost_usd"], e["route_reason"]) == (
            "messages", r.headers["x-tollway-cost-usd"], "only_route")  # fmt: skip
