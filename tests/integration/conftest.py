"""Fixtures shared by integration tests (the engines themselves are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from schemas.clickhouse import Store
from tests.support.billing import running_billing


@pytest.fixture
async def billing(store: Store, bootstrap: str, unique: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running_billing(store, bootstrap, quota_group=f"q-{unique}") as client:
        yield client
