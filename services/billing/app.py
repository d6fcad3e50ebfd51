"""The billing FastAPI app: `create_app` wires settings, config and the store; the lifespan owns the rest.

Start: load accounts, seed month-to-date quota totals from ClickHouse, start the control publisher and
republish the full state (teams, keys, current quota states; the broker may be a fresh in-memory one),
then run the quota loop on the usage stream. Stop in reverse. The store belongs to the caller. The broker
need not be up: the publisher, the alerts and the quota loop connect in the background and retry, so
billing serves reads and saves admin writes through an outage (`/readyz` says what is not connected).
A stored row billing cannot use is logged and counted, never a reason not to start (accounts.load).
Every request passes `Admission` first (caller from headers, body cap, rate limits); report endpoints
read through `ReportStore` (ClickHouse time and memory limits per query).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from schemas.clickhouse import Store
from schemas.config import GatewayConfig
from services.billing import dashboard
from services.billing.accounts import Accounts
from services.billing.admission import Admission
from services.billing.alerts import Alerts
from services.billing.api import admin, health, invoices, quota, reports, usage
from services.billing.api import budgets as budgets_api
from services.billing.api import reconcile as reconcile_api
from services.billing.budgets import Budgets
from services.billing.control import ControlPublisher
from services.billing.errors import install_error_handlers
from services.billing.invoices import Invoices
from services.billing.quota_stream import QuotaService
from services.billing.report_budget import ReportStore
from services.billing.settings import BillingSettings

log = structlog.get_logger("tollway.billing")


def create_app(settings: BillingSettings, config: GatewayConfig, store: Store, bootstrap: str,
               prepare_broker: Callable[[], Awaitable[None]] | None = None) -> FastAPI:  # fmt: skip
    """`prepare_broker`: run before the first connection to the broker (creating the topics), retried with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        accounts = Accounts(store, config)
        await accounts.load()
        budgets = Budgets(store, accounts)
        await budgets.load()
        publisher = ControlPublisher(bootstrap, wait_s=settings.control_publish_wait_s, prepare=prepare_broker)
        await publisher.start()
        alerts = Alerts(store, bootstrap, settings.alert_webhook_url, settings.alert_webhook_attempts)
        quota_service = QuotaService(settings, config, store, accounts, publisher, alerts, bootstrap, budgets)
        stop = asyncio.Event()
        task: asyncio.Task[None] | None = None
        try:
            await quota_service.seed()
            await alerts.start(quota_service.book.period)
            app.state.accounts = accounts
            app.state.publisher = publisher
            app.state.budgets = budgets
            app.state.quota = quota_service
            app.state.alerts = alerts
            app.state.invoices = Invoices(app.state.store, config, grace_s=settings.invoice_grace_s)
            # After a broker outage the outbox republishes the full state too (the broker may be empty).
            publisher.full_state = lambda: (accounts, quota_service.full_state(), quota_service.key_state)
            await publisher.publish_full_state(accounts, quota_service.full_state(), quota_service.key_state)
            task = asyncio.create_task(quota_service.run(stop), name="billing-quota")
            log.info("billing_started", database=store.db, admin_token_set=settings.admin_token is not None)
            yield
        finally:
            stop.set()
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
            await alerts.stop()
            await publisher.stop()
            log.info("billing_stopped")

    # no /docs or /redoc: both load Swagger UI / ReDoc from a CDN (nothing offline); /openapi.json stays
    app = FastAPI(title="Tollway billing", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.config = config
    app.state.store = ReportStore(store, settings)  # what request handlers read through
    install_error_handlers(app)
    app.add_middleware(Admission, settings=settings)
    app.include_router(admin.router)
    app.include_router(budgets_api.router)
    app.include_router(usage.router)
    app.include_router(quota.router)
    app.include_router(invoices.router)
    app.include_router(reports.router)
    app.include_router(health.router)
    app.include_router(reconcile_api.router)
    app.include_router(dashboard.router)
    return app
