"""The proxy on the real broker: keys from the control topic, calls to a real mock upstream, one usage
event per call on the usage topic."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from schemas.events import USAGE_TOPIC, UsageEvent
from services.proxy.app import create_app
from services.proxy.settings import ProxySettings
from tests.support.stack import gateway_config, mock_upstream, publish_key, wait_key_active
from tests.support.waiting import eventually


@pytest.fixture
async def proxy(bootstrap, tmp_path, unique):
    async with mock_upstream() as upstream_url:
        settings = ProxySettings(data_dir=tmp_path, proxy_instance=f"test-{unique}", max_body_bytes=64 * 1024)
        app = create_app(settings, gateway_config(upstream_url), bootstrap)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
                yield c


@pytest.fixture
async def usage_reader(bootstrap):
    """Everything on the usage topic from now on, decoded."""
    consumer = AIOKafkaConsumer(USAGE_TOPIC, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="latest")  # fmt: skip
    await consumer.start()
    await consumer.getmany(timeout_ms=100)  # fix positions at "now" before the test produces anything
    seen: list[UsageEvent] = []

    async def read(team: str) -> list[UsageEvent]:
        for records in (await consumer.getmany(timeout_ms=100)).values():
            seen.extend(UsageEvent.from_bytes(r.value) for r in records)
        return [e for e in seen if e.team_id == team]

    yield read
    await consumer.stop()


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


CHAT = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello there, how are you?"}]}


async def test_call_is_answered_and_emits_one_usage_event(bootstrap, proxy, usage_reader, unique):
    team = f"team_{unique}"
    secret, key = await publish_key(bootstrap, team)
    await wait_key_active(proxy, secret)

    r = await proxy.post("/v1/chat/completions", json=CHAT, headers={**auth(secret), "x-request-id": "rid-1"})

    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "rid-1"
    usage = r.json()["usage"]
    events = await eventually(lambda: usage_reader(team), lambda ev: len(ev) >= 1)
    assert len(events) == 1
    e = events[0]
    assert (e.key_id, e.request_id, e.requested_model, e.served_model, e.provider) == (
        key.key_id,
        "rid-1",
        "gpt-4",
        "gpt-4.1",
        "mock",
    )
    assert (e.prompt_tokens, e.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert e.status == "ok" and e.http_status == 200 and e.usage_source == "provider" and e.proxy_seq >= 1


async def test_unknown_revoked_and_expired_keys_get_401(bootstrap, proxy, unique):
    team = f"team_{unique}"
    live, _ = await publish_key(bootstrap, team)
    await wait_key_active(proxy, live)
    revoked_secret, state = await publish_key(bootstrap, team)
    await wait_key_active(proxy, revoked_secret)
    await publish_key(bootstrap, team, secret=revoked_secret, key_id=state.key_id, revoked=True)
    expired, _ = await publish_key(bootstrap, team, expires_at=datetime.now(UTC) - timedelta(seconds=1))

    async def status_of(secret: str) -> int:
        return (await proxy.post("/v1/chat/completions", json=CHAT, headers=auth(secret))).status_code

    await eventually(lambda: status_of(revoked_secret), lambda s: s == 401, timeout_s=5)
    for secret in ("tw-unknown", expired):
        r = await proxy.post("/v1/chat/completions", json=CHAT, headers=auth(secret))
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert secret not in r.text
    r = await proxy.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401
    assert (await proxy.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": live})).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request_error"),
        (b"[1, 2]", 400, "invalid_request_error"),
        (b'{"model": "gpt-4.1"}', 400, "invalid_messages"),
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found"),
        (
            b'{"model": "gpt-4.1", "messages": [{"role": "user", "content": "' + b"x" * 70_000 + b'"}]}',
            413,
            "request_too_large",
        ),
        (
            b'{"model": "text-embedding-3-small", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model_not_found",
        ),
    ],
)
async def test_bad_requests_get_openai_shaped_errors_and_are_still_metered(
    bootstrap, proxy, usage_reader, unique, body, status, code
):
    team = f"team_{unique}"
    secret, _ = await publish_key(bootstrap, team)
    await wait_key_active(proxy, secret)

    r = await proxy.post(
        "/v1/chat/completions", content=body, headers={**auth(secret), "content-type": "application/json"}
    )

    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    events = await eventually(lambda: usage_reader(team), lambda ev: len(ev) >= 1)
    assert events[0].status == "error" and events[0].http_status == status and events[0].error_code == code


async def test_upstream_failure_maps_to_gateway_error(bootstrap, proxy, unique):
    secret, _ = await publish_key(bootstrap, f"team_{unique}")
    await wait_key_active(proxy, secret)
    body = {**CHAT, "mock": {"status": 503}}
    r = await proxy.post("/v1/chat/completions", json=body, headers=auth(secret))
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "upstream_unavailable"


async def test_streamed_call_relays_chunks_and_meters_usage(bootstrap, proxy, usage_reader, unique):
    team = f"team_{unique}"
    secret, _ = await publish_key(bootstrap, team)
    await wait_key_active(proxy, secret)
    body = {**CHAT, "stream": True}  # the client did not ask for usage: the proxy still bills it

    async with proxy.stream("POST", "/v1/chat/completions", json=body, headers=auth(secret)) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[5:]) for line in lines[:-1]]
    assert all(c.get("usage") is None for c in chunks)  # usage chunk withheld: the client did not ask
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]).strip()

    events = await eventually(lambda: usage_reader(team), lambda ev: len(ev) >= 1)
    e = events[0]
    assert e.stream and e.status == "ok" and e.usage_source == "provider"
    assert e.completion_tokens == 16 and e.prompt_tokens > 0 and e.ttft_ms is not None


async def test_embeddings_are_metered_by_input_tokens(bootstrap, proxy, usage_reader, unique):
    team = f"team_{unique}"
    secret, _ = await publish_key(bootstrap, team)
    await wait_key_active(proxy, secret)
    r = await proxy.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["a b c", "d e"]},
                         headers=auth(secret))  # fmt: skip
    assert r.status_code == 200, r.text
    events = await eventually(lambda: usage_reader(team), lambda ev: len(ev) >= 1)
    assert events[0].prompt_tokens == r.json()["usage"]["prompt_tokens"] == 5
    assert events[0].completion_tokens == 0


async def test_models_lists_public_names_and_health_endpoints(bootstrap, proxy, unique):
    secret, _ = await publish_key(bootstrap, f"team_{unique}")
    await wait_key_active(proxy, secret)
    ids = [m["id"] for m in (await proxy.get("/v1/models", headers=auth(secret))).json()["data"]]
    assert ids == ["gpt-4.1", "text-embedding-3-small"]
    assert (await proxy.get("/healthz")).json() == {"status": "ok"}
    ready = await eventually(lambda: proxy.get("/readyz"), lambda r: r.status_code == 200)
    checks = ready.json()["checks"]
    assert checks["control_view"] is True and checks["usage_producer"] is True and all(checks.values())
    assert "tollway_requests_total" in (await proxy.get("/metrics")).text
    unknown = await proxy.get("/v1/nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"


async def test_sequence_numbers_are_dense_per_instance(bootstrap, proxy, usage_reader, unique):
    team = f"team_{unique}"
    secret, _ = await publish_key(bootstrap, team)
    await wait_key_active(proxy, secret)
    await asyncio.gather(*[proxy.post("/v1/chat/completions", json=CHAT, headers=auth(secret)) for _ in range(20)])
    events = await eventually(lambda: usage_reader(team), lambda ev: len(ev) >= 20)
    seqs = sorted(e.proxy_seq for e in events)
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    assert len({e.event_id for e in events}) == 20
