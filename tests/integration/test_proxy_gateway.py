"""The gateway's behaviour against real mock upstreams (latency and failure injection): retries, fallbacks,
breakers, load balancing, cache, rate limits, streaming and hard edges. Events are read where the handler
hands them to the emitter, so each test sees exactly the events its calls produced."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from schemas.config import GatewayConfig, Limits, parse_config
from schemas.control import KeyState, TeamState
from schemas.keys import hash_key, new_secret
from services.proxy.app import create_app
from services.proxy.draft import UsageDraft
from services.proxy.settings import ProxySettings
from tests.support.stack import mock_upstream
from tests.support.waiting import eventually

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hello there, how are you?"}]}
FAST_RETRY = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


def make_config(providers: dict[str, str], routes: list[dict[str, Any]], **extra: Any) -> GatewayConfig:
    provider_extra = extra.pop("provider_extra", {})
    return parse_config({
        "providers": {n: {"base_url": url, "timeout_s": 5, **provider_extra.get(n, {})} for n, url in providers.items()},
        "models": {
            "chat": {"aliases": ["chat-alias"], "routes": routes, "prices": [{"input": "1", "output": "2"}],
                     **extra.pop("model_extra", {})},
            "other": {"routes": [{"provider": next(iter(providers))}]},
            "embed": {"kind": "embedding", "routes": [{"provider": next(iter(providers))}]},
        },
        "retry": {**FAST_RETRY, **extra.pop("retry", {})},
        **extra,
    })  # fmt: skip


@dataclass
class Gateway:
    app: Any
    client: httpx.AsyncClient
    events: list[dict[str, Any]] = field(default_factory=list)

    def key(self, team: str | None = None, *, limits: Limits | None = None, plan: str | None = None,
            team_limits: Limits | None = None) -> tuple[str, KeyState]:  # fmt: skip
        secret = new_secret()
        team = team or f"team_{uuid.uuid4().hex[:8]}"
        if team_limits is not None:
            self.app.state.proxy.control.apply(TeamState(team_id=team, name=team, limits=team_limits))
        state = KeyState(key_id=f"key_{uuid.uuid4().hex[:12]}", key_hash=hash_key(secret), prefix="tw-x",
                         team_id=team, plan=plan, limits=limits or Limits())  # fmt: skip
        self.app.state.proxy.control.apply(state)
        return secret, state

    async def chat(self, secret: str, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
        h = {"authorization": f"Bearer {secret}", **{k.replace("_", "-"): v for k, v in headers.items()}}
        return await self.client.post("/v1/chat/completions", json=body or CHAT, headers=h)

    def events_of(self, team: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("team_id") == team]


def record_events(gw: Gateway) -> None:
    """Keep a copy of every usage event the proxy emits (they still go on to the spool and broker)."""
    emitter = gw.app.state.proxy.emitter
    forward_emit = emitter.emit

    def capture(draft: UsageDraft) -> None:
        forward_emit(draft)
        gw.events.append(asdict(draft))  # a copy, as emitted

    emitter.emit = capture


@contextlib.asynccontextmanager
async def gateway(bootstrap: str, tmp: Path, config: GatewayConfig, **settings: Any) -> AsyncIterator[Gateway]:
    s = ProxySettings(data_dir=tmp, proxy_instance=f"t-{uuid.uuid4().hex[:8]}", max_body_bytes=64 * 1024, **settings)
    app = create_app(s, config, bootstrap)
    async with app.router.lifespan_context(app):
        gw = Gateway(app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy"))
        record_events(gw)
        try:
            yield gw
        finally:
            await gw.client.aclose()


async def served(url: str) -> int:
    async with httpx.AsyncClient() as c:
        return (await c.get(url.removesuffix("/v1") + "/mock/stats")).json()["requests_served"]


async def set_fault(url: str, status: int | None) -> None:
    async with httpx.AsyncClient() as c:
        base = url.removesuffix("/v1") + "/mock/fault"
        await (c.put(base, json={"status": status}) if status else c.delete(base))


@pytest.fixture
async def upstream():
    async with mock_upstream() as url:
        yield url


@pytest.fixture
async def single(bootstrap, tmp_path, upstream):
    async with gateway(bootstrap, tmp_path, make_config({"a": upstream}, [{"provider": "a"}],
                                                        retry={"retries_per_route": 2})) as gw:  # fmt: skip
        yield gw


# ---- retries, fallbacks, breakers ----


async def test_transient_failures_are_retried_on_the_same_route(single):
    secret, key = single.key()
    tag = uuid.uuid4().hex
    r = await single.chat(secret, {**CHAT, "mock": {"fail_times": 2, "fail_key": tag, "status": 503}})
    assert r.status_code == 200, r.text
    (e,) = single.events_of(key.team_id)
    assert e["attempts"] == 3 and e["fallback_used"] is False and e["status"] == "ok" and e["provider"] == "a"


async def test_upstream_retry_after_is_honoured(single):
    secret, key = single.key()
    tag = uuid.uuid4().hex
    t0 = time.perf_counter()
    r = await single.chat(
        secret, {**CHAT, "mock": {"fail_times": 1, "fail_key": tag, "status": 429, "retry_after": 0.4}}
    )
    assert r.status_code == 200 and time.perf_counter() - t0 >= 0.4
    assert single.events_of(key.team_id)[0]["attempts"] == 2


async def test_client_errors_are_not_retried_and_keep_their_status(single, upstream):
    secret, key = single.key()
    before = await served(upstream)
    r = await single.chat(secret, {**CHAT, "mock": {"status": 400}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "upstream_rejected"
    assert await served(upstream) == before + 1
    assert single.events_of(key.team_id)[0]["attempts"] == 1


async def test_provider_auth_failure_is_a_gateway_error_not_the_clients(single):
    secret, _ = single.key()
    r = await single.chat(secret, {**CHAT, "mock": {"status": 401}})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_rejected"


async def test_attempts_are_capped_and_the_last_failure_is_returned_openai_shaped(bootstrap, tmp_path, upstream):
    cfg = make_config({"a": upstream}, [{"provider": "a"}], retry={"max_attempts": 2, "retries_per_route": 5},
                      health={"failure_threshold": 100})  # fmt: skip
    async with gateway(bootstrap, tmp_path, cfg) as gw:
        secret, key = gw.key()
        before = await served(upstream)
        r = await gw.chat(secret, {**CHAT, "mock": {"status": 502}})
        assert r.status_code == 502 and set(r.json()["error"]) >= {"message", "type", "code"}
        assert await served(upstream) == before + 2
        (e,) = gw.events_of(key.team_id)
        assert e["attempts"] == 2 and e["status"] == "error" and e["http_status"] == 502


async def test_deadline_bounds_slow_upstreams_and_answers_504(bootstrap, tmp_path, upstream):
    cfg = make_config({"a": upstream}, [{"provider": "a"}], retry={"deadline_s": 0.6, "retries_per_route": 10},
                      provider_extra={"a": {"timeout_s": 0.25}}, health={"failure_threshold": 100})  # fmt: skip
    async with gateway(bootstrap, tmp_path, cfg) as gw:
        secret, key = gw.key()
        t0 = time.perf_counter()
        r = await gw.chat(secret, {**CHAT, "mock": {"latency_ms": 2000}})
        elapsed = time.perf_counter() - t0
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        assert elapsed < 1.5
        assert 2 <= gw.events_of(key.team_id)[0]["attempts"] <= 4


async def test_fallback_to_the_next_route_when_the_first_is_down(bootstrap, tmp_path):
    async with mock_upstream(mock_error_rate=1.0) as down, mock_upstream() as up:
        cfg = make_config({"down": down, "up": up}, [{"provider": "down"}, {"provider": "up", "priority": 1}])
        async with gateway(bootstrap, tmp_path, cfg) as gw:
            secret, key = gw.key()
            r = await gw.chat(secret)
            assert r.status_code == 200
            (e,) = gw.events_of(key.team_id)
            assert e["fallback_used"] is True and e["provider"] == "up" and e["served_model"] == "chat"
            assert e["attempts"] == 3  # two tries on "down" (retries_per_route=1), then "up"


async def test_breaker_opens_skips_the_route_and_recovers_through_a_half_open_probe(bootstrap, tmp_path):
    async with mock_upstream() as flaky, mock_upstream() as up:
        cfg = make_config({"flaky": flaky, "up": up}, [{"provider": "flaky"}, {"provider": "up", "priority": 1}],
                          health={"failure_threshold": 2, "cooldown_s": 1.5},
                          retry={"retries_per_route": 0})  # fmt: skip
        async with gateway(bootstrap, tmp_path, cfg) as gw:
            secret, key = gw.key()
            await set_fault(flaky, 503)
            for _ in range(2):
                assert (await gw.chat(secret)).status_code == 200
            ready = (await gw.client.get("/readyz")).json()
            flaky_route = next(r for r in ready["routes"] if r["model"] == "chat" and r["provider"] == "flaky")
            assert flaky_route["state"] == "open"
            metrics = (await gw.client.get("/metrics")).text
            assert 'tollway_route_breaker_state{model="chat",provider="flaky",route="0"} 2.0' in metrics
            before = await served(flaky)
            r = await gw.chat(secret)
            assert r.status_code == 200 and await served(flaky) == before  # open: not even tried
            assert gw.events_of(key.team_id)[-1]["attempts"] == 1

            await set_fault(flaky, None)
            await asyncio.sleep(1.55)  # the cooldown is the behaviour under test (long enough for a loaded box)
            await gw.chat(secret)
            e = gw.events_of(key.team_id)[-1]
            assert e["provider"] == "flaky" and e["fallback_used"] is False
            ready = (await gw.client.get("/readyz")).json()
            assert (
                next(r for r in ready["routes"] if r["provider"] == "flaky" and r["model"] == "chat")["state"]
                == "closed"
            )


async def test_all_routes_open_fails_fast_with_503_and_retry_after(bootstrap, tmp_path, upstream):
    cfg = make_config({"a": upstream}, [{"provider": "a"}], health={"failure_threshold": 1, "cooldown_s": 30},
                      retry={"retries_per_route": 0})  # fmt: skip
    async with gateway(bootstrap, tmp_path, cfg) as gw:
        secret, _ = gw.key()
        assert (await gw.chat(secret, {**CHAT, "mock": {"status": 500}})).status_code == 502
        t0 = time.perf_counter()
        r = await gw.chat(secret)
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
        assert 1 <= int(r.headers["retry-after"]) <= 30 and time.perf_counter() - t0 < 0.5
        assert "chat" in (await gw.client.get("/readyz")).json()["models_unavailable"]


async def test_active_probes_open_a_dead_providers_routes_before_users_find_out(bootstrap, tmp_path):
    async with mock_upstream() as probed:
        cfg = make_config({"a": probed}, [{"provider": "a"}],
                          provider_extra={"a": {"health_check_interval_s": 0.05}})  # fmt: skip
        async with gateway(bootstrap, tmp_path, cfg) as gw:

            async def state() -> str:
                ready = (await gw.client.get("/readyz")).json()
                return next(r["state"] for r in ready["routes"] if r["model"] == "chat")

            await set_fault(probed, 503)
            await eventually(state, lambda s: s == "open", timeout_s=5)
            await set_fault(probed, None)
            await eventually(state, lambda s: s == "half_open", timeout_s=5)
            secret, _ = gw.key()
            assert (await gw.chat(secret)).status_code == 200
            assert await state() == "closed"


async def test_weighted_routes_share_the_load(bootstrap, tmp_path):
    async with mock_upstream() as a, mock_upstream() as b:
        cfg = make_config({"a": a, "b": b}, [{"provider": "a", "weight": 3}, {"provider": "b", "weight": 1}],
                          health={"latency_bias": 0})  # fmt: skip
        async with gateway(bootstrap, tmp_path, cfg) as gw:
            secret, key = gw.key()
            for _ in range(60):
                assert (await gw.chat(secret)).status_code == 200
            by = Counter(e["provider"] for e in gw.events_of(key.team_id))
            assert by["a"] > by["b"] >= 5 and not any(e["fallback_used"] for e in gw.events_of(key.team_id))


async def test_latency_ewma_moves_load_to_the_faster_route(bootstrap, tmp_path):
    async with mock_upstream(mock_latency_ms=60) as slow, mock_upstream() as fast:
        cfg = make_config({"slow": slow, "fast": fast}, [{"provider": "slow"}, {"provider": "fast"}])
        async with gateway(bootstrap, tmp_path, cfg) as gw:
            secret, key = gw.key()
            for _ in range(40):
                await gw.chat(secret)
            later = Counter(e["provider"] for e in gw.events_of(key.team_id)[10:])
            assert later["fast"] > 2 * later["slow"]


# ---- cache ----


async def test_deterministic_request_is_served_from_cache_with_tokens_kept(single, upstream):
    secret, key = single.key()
    body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": f"cache me {uuid.uuid4()}"}]}
    first = await single.chat(secret, body)
    before = await served(upstream)
    second = await single.chat(secret, {**body, "model": "chat-alias", "user": "someone-else"})
    assert second.status_code == 200 and second.headers["x-tollway-cache"] == "hit"
    assert second.json() == first.json() and await served(upstream) == before
    miss, hit = single.events_of(key.team_id)
    assert miss["status"] == "ok" and not miss.get("cache_hit")
    assert hit["status"] == "cached" and hit["cache_hit"] is True and hit["attempts"] == 0
    assert (
        (hit["prompt_tokens"], hit["completion_tokens"]) == (miss["prompt_tokens"], miss["completion_tokens"]) != (0, 0)
    )
    assert 'tollway_cache_total{result="hit"}' in (await single.client.get("/metrics")).text


async def test_cache_is_per_team_and_respects_headers_and_temperature(single, upstream):
    secret, _ = single.key()
    other, _ = single.key()
    body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": f"q {uuid.uuid4()}"}]}
    await single.chat(secret, body)
    assert (await single.chat(other, body)).headers["x-tollway-cache"] == "miss"
    assert (await single.chat(secret, body, x_tollway_cache="no-cache")).headers.get("x-tollway-cache") != "hit"
    hot = {**body, "temperature": 0.9}
    await single.chat(secret, hot)
    assert "x-tollway-cache" not in (await single.chat(secret, hot)).headers
    await single.chat(secret, hot, x_tollway_cache="true")
    assert (await single.chat(secret, hot, x_tollway_cache="true")).headers["x-tollway-cache"] == "hit"


async def test_stream_request_is_replayed_from_cache_and_a_stream_fills_the_cache(single, upstream):
    secret, key = single.key()
    body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": f"s {uuid.uuid4()}"}]}
    plain = (await single.chat(secret, body)).json()
    before = await served(upstream)
    chunks = await sse(single.client, secret, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert await served(upstream) == before
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
        plain["choices"][0]["message"]["content"]  # fmt: skip
    # the replayed usage chunk is the plain answer's usage plus the cost told (a hit is billed 0: issue 16)
    assert chunks[-1]["usage"] == {**plain["usage"], "cost": 0}
    assert single.events_of(key.team_id)[-1]["status"] == "cached"

    body2 = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": f"s2 {uuid.uuid4()}"}]}
    streamed = await sse(single.client, secret, {**body2, "stream": True})
    r = await single.chat(secret, body2)
    assert r.headers["x-tollway-cache"] == "hit"
    assert r.json()["choices"][0]["message"]["content"] == "".join(
        c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"]
    )


# ---- rate limits ----


async def test_key_rpm_limit_answers_429_with_retry_after_and_headers_on_every_response(single):
    secret, key = single.key(limits=Limits(rpm=2))
    ok = [await single.chat(secret) for _ in range(2)]
    assert [r.headers["x-ratelimit-remaining"] for r in ok] == ["1", "0"]
    assert all(r.headers["x-ratelimit-limit"] == "2" and int(r.headers["x-ratelimit-reset"]) >= 1 for r in ok)
    r = await single.chat(secret)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining"] == "0"
    assert single.events_of(key.team_id)[-1]["status"] == "rejected"
    bad = await single.chat(secret, {**CHAT, "model": "nope"})
    assert bad.status_code == 429  # admission comes before routing


async def test_team_limit_is_shared_by_the_teams_keys(single):
    team = f"team_{uuid.uuid4().hex[:8]}"
    a, _ = single.key(team, team_limits=Limits(rpm=3))
    b, _ = single.key(team)
    statuses = [(await single.chat(s)).status_code for s in (a, b, a, b)]
    assert statuses == [200, 200, 200, 429]


async def test_tpm_counts_the_allowed_completion_up_front_and_settles_on_actual_usage(single):
    secret, _ = single.key(limits=Limits(tpm=400))
    r = await single.chat(secret, {**CHAT, "max_tokens": 1000})
    assert r.status_code == 429 and "tokens" in r.json()["error"]["message"]
    assert (await single.chat(secret, {**CHAT, "max_tokens": 300})).status_code == 200
    # 300 were reserved, ~30 used: the correction frees the rest
    assert (await single.chat(secret, {**CHAT, "max_tokens": 300})).status_code == 200


async def test_plan_limits_apply_and_the_plan_model_list_filters_models(bootstrap, tmp_path, upstream):
    cfg = make_config(
        {"a": upstream}, [{"provider": "a"}], plans={"default": {}, "tiny": {"rpm": 1, "models": ["chat-alias"]}}
    )
    async with gateway(bootstrap, tmp_path, cfg) as gw:
        secret, _ = gw.key(plan="tiny")
        ids = [
            m["id"]
            for m in (await gw.client.get("/v1/models", headers={"authorization": f"Bearer {secret}"})).json()["data"]
        ]
        assert ids == ["chat-alias"]  # the id this plan may call (the model by its own name it may not)
        auth = {"authorization": f"Bearer {secret}"}
        # retrieve follows the rule a call is resolved under: the listed alias, not the model's own name
        assert (await gw.client.get("/v1/models/chat-alias", headers=auth)).json()["id"] == "chat-alias"
        gone = await gw.client.get("/v1/models/chat", headers=auth)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert (await gw.chat(secret, {**CHAT, "model": "other"})).status_code == 404
        assert (await gw.chat(secret)).status_code == 429  # the 404 was admitted and counted


# ---- streaming ----


async def sse(client: httpx.AsyncClient, secret: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {secret}"}) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [orjson.loads(line[5:]) for line in lines[:-1]]


async def test_usage_chunk_is_forwarded_when_the_client_asks(single):
    secret, key = single.key()
    chunks = await sse(single.client, secret, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    e = single.events_of(key.team_id)[0]
    assert e["completion_tokens"] == 16 and e["usage_source"] == "provider" and e["ttft_ms"] > 0


async def test_stream_without_provider_usage_is_estimated_never_zero(single):
    secret, key = single.key()
    await sse(single.client, secret, {**CHAT, "stream": True, "mock": {"usage": False}})
    e = single.events_of(key.team_id)[0]
    assert e["usage_source"] == "estimated" and e["prompt_tokens"] > 0 and e["completion_tokens"] > 0


async def test_stream_is_retried_while_no_byte_reached_the_client(single):
    secret, key = single.key()
    tag = uuid.uuid4().hex
    chunks = await sse(single.client, secret, {**CHAT, "stream": True, "mock": {"fail_times": 1, "fail_key": tag}})
    assert chunks
    assert single.events_of(key.team_id)[0]["attempts"] == 2


async def test_upstream_breaking_mid_stream_tells_the_client_and_bills_what_was_sent(single, upstream):
    secret, key = single.key()
    before = await served(upstream)
    async with single.client.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                                    json={**CHAT, "stream": True, "mock": {"disconnect_after_chunks": 4}}) as r:  # fmt: skip
        lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
    assert await served(upstream) == before + 1  # bytes had reached the client: no retry
    assert orjson.loads(lines[-1][5:])["error"]["code"] == "upstream_stream_broken"
    e = single.events_of(key.team_id)[0]
    assert e["status"] == "error" and e["error_code"] == "upstream_stream_broken"
    assert e["usage_source"] == "estimated" and e["completion_tokens"] >= 4 and e["client_disconnected"] is False


# ---- hard edges ----


async def test_request_id_is_echoed_or_minted_on_every_response(single):
    secret, _ = single.key()
    assert (await single.chat(secret, x_request_id="abc-123")).headers["x-request-id"] == "abc-123"
    minted = (await single.chat(secret)).headers["x-request-id"]
    assert minted.startswith("req_")
    r = await single.client.post("/v1/chat/completions", content=b"{", headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 400 and r.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize("body", [
    {**CHAT, "temperature": "hot"}, {**CHAT, "stream": "yes"}, {**CHAT, "n": -1},
    {**CHAT, "stream_options": []}, {**CHAT, "messages": [{"content": "no role"}]},
])  # fmt: skip
async def test_schema_violations_are_400_invalid_request(single, body):
    secret, _ = single.key()
    r = await single.chat(secret, body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_embeddings_take_the_same_path_with_retries_and_cache(single, upstream):
    secret, key = single.key()
    tag = uuid.uuid4().hex
    body = {"model": "embed", "input": ["a b c"], "mock": {"fail_times": 1, "fail_key": tag}}
    h = {"authorization": f"Bearer {secret}", "x-tollway-cache": "true"}
    r = await single.client.post("/v1/embeddings", json=body, headers=h)
    assert r.status_code == 200
    r2 = await single.client.post("/v1/embeddings", json=body, headers=h)
    assert r2.headers["x-tollway-cache"] == "hit" and r2.json() == r.json()
    first, hit = single.events_of(key.team_id)
    assert first["attempts"] == 2 and first["prompt_tokens"] == 3 and first["completion_tokens"] == 0
    assert hit["status"] == "cached"


async def test_metrics_cover_requests_latency_tokens_and_events(single):
    secret, _ = single.key()
    await single.chat(secret)
    text = (await single.client.get("/metrics")).text
    for name in ("tollway_requests_total", "tollway_request_seconds_bucket", "tollway_upstream_seconds_bucket",
                 "tollway_proxy_added_seconds_bucket", "tollway_tokens_total", "tollway_route_breaker_state",
                 "tollway_usage_events_queued", "tollway_upstream_attempts_total"):  # fmt: skip
        assert name in text, name
