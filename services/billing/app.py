"""The billing FastAPI app: `create_app` wires settings, config and the store; the lifespan owns the rest.

Start: load accounts from ClickHouse, start the control publisher, republish the full state (the broker
may be a fresh in-memory one). Stop: stop the publisher. The store belongs to the caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from schemas.clickhouse import Store
from schemas.config import GatewayConfig
from services.billing.accounts import Accounts
from services.billing.api import admin, health, usage
from services.billing.control import ControlPublisher
from services.billing.errors import install_error_handlers
from services.billing.settings import BillingSettings

log = structlog.get_logger("tollway.billing")


def create_app(settings: BillingSettings, config: GatewayConfig, store: Store, bootstrap: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        accounts = Accounts(store, config)
        await accounts.load()
        publisher = ControlPublisher(bootstrap)
        await publisher.start()
        try:
            app.state.accounts = accounts
            app.state.publisher = publisher
            await publisher.publish_full_state(accounts)
            log.info("billing_started", database=store.db, admin_token_set=settings.admin_token is not None)
            yield
        finally:
            await publisher.stop()
            log.info("billing_stopped")

    app = FastAPI(title="Tollway billing", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.config = config
    app.state.store = store
    install_error_handlers(app)
    app.include_router(admin.router)
    app.include_router(usage.router)
    app.include_router(health.router)
    return app
