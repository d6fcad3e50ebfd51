"""No input may produce a 500: property test over the request schema, straight into the ASGI app."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_proxy_gateway import gateway, make_config
from tests.support.stack import mock_upstream

ALLOWED = {200, 400, 401, 404, 413, 429, 502, 503, 504}

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | st.text(max_size=5) | json_values
content = (
    st.text(max_size=60)
    | st.none()
    | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}), max_size=3)
    | json_values
)
message = (
    st.fixed_dictionaries({"role": roles}, optional={"content": content, "name": st.text(max_size=10) | json_values})
    | json_values
)
models = st.sampled_from(["chat", "chat-alias", "embed", "other", "nope", ""]) | json_values
field_values = {
    "model": models,
    "messages": st.lists(message, max_size=3) | json_values,
    "input": st.text(max_size=30) | st.lists(st.text(max_size=10) | st.lists(st.integers(0, 100), max_size=4), max_size=3) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values}) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "max_tokens": st.integers(-5, 5000) | json_values,
    "n": st.integers(-1, 3) | json_values,
    "user": st.text(max_size=300) | json_values,
    "tools": json_values,
}  # fmt: skip
# stdlib json, not orjson: it writes what a careless client might send (integers past 64 bits, Infinity)
bodies = st.fixed_dictionaries({}, optional=field_values).map(lambda d: json.dumps(d).encode()) | \
    st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())  # fmt: skip
headers = st.fixed_dictionaries({}, optional={
    "x-tollway-cache": st.sampled_from(["true", "no-cache", "no-store", "garbage", ""]),
    "x-request-id": st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300),
    "content-type": st.sampled_from(["application/json", "text/plain"]),
})  # fmt: skip


@pytest.fixture(scope="module")
async def fuzz_gateway(bootstrap, tmp_path_factory):
    async with mock_upstream() as up:
        cfg = make_config({"a": up}, [{"provider": "a"}])
        async with gateway(bootstrap, tmp_path_factory.mktemp("fuzz"), cfg) as gw:
            gw.secret, _ = gw.key(team=f"fuzz_{uuid.uuid4().hex[:6]}")  # type: ignore[attr-defined]
            yield gw


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, extra=headers, path=st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]))
async def test_no_request_body_produces_a_500(fuzz_gateway, body, extra, path):
    gw = fuzz_gateway
    r = await gw.client.post(path, content=body, headers={"authorization": f"Bearer {gw.secret}", **extra})
    assert r.status_code in ALLOWED, (r.status_code, r.text[:300], body[:300])
    assert r.headers.get("x-request-id")
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["code"]


# ---- Anthropic's Messages API: the same promise, answered in Anthropic's shape ----

blocks = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "tool_use", "nope"]) | json_values},
                          optional={"text": st.text(max_size=20) | json_values,
                                    "cache_control": st.fixed_dictionaries({"type": st.just("ephemeral")},
                                                                           optional={"ttl": st.sampled_from(["5m", "1h", "9y"]) | json_values})}),
    max_size=3,
)  # fmt: skip
anthropic_message = (
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]) | roles},
                          optional={"content": st.text(max_size=40) | blocks | json_values})
    | json_values
)  # fmt: skip
messages_fields = {
    "model": st.sampled_from(["claude", "claude-alias", "gpt", "nope", ""]) | json_values,
    "messages": st.lists(anthropic_message, max_size=3) | json_values,
    "system": st.text(max_size=30) | blocks | json_values,
    "max_tokens": st.integers(-5, 5000) | json_values,
    "stream": st.booleans() | json_values,
    "tools": st.lists(st.fixed_dictionaries({"name": st.text(max_size=8)}), max_size=2) | json_values,
    "metadata": st.fixed_dictionaries({}, optional={"user_id": st.text(max_size=300) | json_values}) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_k": st.integers(-5, 500) | json_values,
    "thinking": st.fixed_dictionaries({"type": st.sampled_from(["enabled", "adaptive", "x"])},
                                      optional={"budget_tokens": st.integers(-1, 5000)}) | json_values,
}  # fmt: skip
messages_bodies = st.fixed_dictionaries({}, optional=messages_fields).map(lambda d: json.dumps(d).encode()) | \
    st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())  # fmt: skip
printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
messages_headers = st.fixed_dictionaries({}, optional={
    "anthropic-version": printable | st.just("x" * 100), "anthropic-beta": printable,
    "x-tollway-cache": st.sampled_from(["true", "no-store", ""]),
})  # fmt: skip


@pytest.fixture(scope="module")
async def fuzz_messages_gateway(bootstrap, tmp_path_factory):
    from tests.integration.test_proxy_messages import messages_config

    async with mock_upstream() as up:
        async with gateway(bootstrap, tmp_path_factory.mktemp("fuzz-messages"), messages_config(up)) as gw:
            gw.secret, _ = gw.key(team=f"fuzz_{uuid.uuid4().hex[:6]}")  # type: ignore[attr-defined]
            yield gw


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=messages_bodies, extra=messages_headers,
       path=st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]))  # fmt: skip
async def test_no_messages_body_produces_a_500_and_every_error_is_anthropic_shaped(fuzz_messages_gateway, body,
                                                                                   extra, path):  # fmt: skip
    gw = fuzz_messages_gateway
    r = await gw.client.post(path, content=body, headers={"x-api-key": gw.secret, **extra})
    assert r.status_code in ALLOWED, (r.status_code, r.text[:300], body[:300])
    assert r.headers.get("x-request-id")
    if r.status_code >= 400:
        data = r.json()
        assert data["type"] == "error" and data["error"]["type"] and data["error"]["message"], data
