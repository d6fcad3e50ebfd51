"""In-process pieces for integration tests: a real mock upstream server and a proxy app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

from schemas.config import GatewayConfig, parse_config
from schemas.control import CONTROL_TOPIC, KeyState, encode, message_key
from schemas.keys import display_prefix, hash_key, new_id, new_secret
from services.mock_upstream.app import create_app as mock_app
from services.mock_upstream.settings import MockSettings
from tollway.servers import serving


@contextlib.asynccontextmanager
async def mock_upstream(**settings: object) -> AsyncIterator[str]:
    """A real uvicorn mock upstream on a free port; yields its /v1 base URL."""
    async with serving(mock_app(MockSettings(**settings)), "mock-upstream") as url:
        yield f"{url}/v1"


def gateway_config(upstream_url: str) -> GatewayConfig:
    return parse_config({
        "providers": {"mock": {"base_url": upstream_url, "timeout_s": 5}},
        "models": {
            "gpt-4.1": {"aliases": ["gpt-4"], "routes": [{"provider": "mock"}],
                        "prices": [{"effective_from": "2025-04-14", "input": "2.00", "output": "8.00",
                                    "cached_input": "0.50"}]},
            "text-embedding-3-small": {"kind": "embedding", "routes": [{"provider": "mock"}],
                                       "prices": [{"input": "0.02"}]},
        },
        "plans": {"default": {}},
        "default_plan": "default",
    })  # fmt: skip


MOCK_PROVIDER_KEY = "mock-provider-key"  # the mock's Messages API wants a key, as Anthropic's does


def messages_gateway_config(upstream_url: str) -> GatewayConfig:
    """gateway_config plus claude-sonnet-4.5 served natively on /v1/messages (priced as in tollway.yaml)."""
    base = gateway_config(upstream_url)
    extra = parse_config({
        "providers": {"anthropic": {"base_url": upstream_url, "api": "anthropic", "timeout_s": 5,
                                    "headers": {"x-api-key": MOCK_PROVIDER_KEY}}},
        "models": {"claude-sonnet-4.5": {"routes": [{"provider": "anthropic", "model": "claude-sonnet-4-5"}],
                                         "prices": [{"effective_from": "2025-09-29", "input": "3.00",
                                                     "output": "15.00", "cached_input": "0.30"}]}},
    })  # fmt: skip
    return base.model_copy(update={"providers": {**base.providers, **extra.providers},
                                   "models": {**base.models, **extra.models}})  # fmt: skip


async def publish_key(bootstrap: str, team_id: str, *, revoked: bool = False, expires_at: datetime | None = None,
                      secret: str | None = None, key_id: str | None = None) -> tuple[str, KeyState]:  # fmt: skip
    """Do what billing does for a new key: put its state (hash only) on the control topic."""
    secret = secret or new_secret()
    state = KeyState(key_id=key_id or new_id("key"), key_hash=hash_key(secret), prefix=display_prefix(secret),
                     team_id=team_id, revoked=revoked, expires_at=expires_at)  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(CONTROL_TOPIC, encode(state), key=message_key(state))
    finally:
        await producer.stop()
    return secret, state


async def wait_key_active(client: httpx.AsyncClient, secret: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        r = await client.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
        if r.status_code == 200:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"key never became active: {r.status_code} {r.text}")
        await asyncio.sleep(0.02)


def data_dir(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp
