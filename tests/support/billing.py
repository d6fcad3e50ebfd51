"""The billing app in-process for integration tests, with known admin and finance tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from schemas.clickhouse import Store
from schemas.config import GatewayConfig, load_config
from services.billing.app import create_app
from services.billing.settings import BillingSettings

ADMIN_TOKEN = "admin-token-for-tests"
FINANCE_TOKEN = "finance-token-for-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FINANCE = {"Authorization": f"Bearer {FINANCE_TOKEN}"}


@asynccontextmanager
async def running_billing(store: Store, bootstrap: str, *, config: GatewayConfig | None = None,
                          wait_quota: bool = False, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:  # fmt: skip
    """Billing with its lifespan run (accounts loaded, full state published); an ASGI client to it."""
    s = BillingSettings(admin_token=ADMIN_TOKEN, finance_token=FINANCE_TOKEN, **settings)
    app = create_app(s, config or load_config("tollway.yaml"), store, bootstrap)
    async with app.router.lifespan_context(app):
        if wait_quota:  # month-to-date totals seeded and the usage stream followed
            await asyncio.wait_for(app.state.quota.ready.wait(), 10)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://billing") as client:
            yield client
