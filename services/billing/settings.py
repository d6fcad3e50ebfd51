"""Billing settings: the shared TOLLWAY_ environment plus the billing listener and its two service tokens."""

from __future__ import annotations

from schemas.settings import CommonSettings


class BillingSettings(CommonSettings):
    billing_host: str = "127.0.0.1"
    billing_port: int = 8090
    # Unset tokens grant nothing: with no admin token there is no admin access at all.
    admin_token: str | None = None
    finance_token: str | None = None
