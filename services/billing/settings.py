"""Billing settings: the shared TOLLWAY_ environment plus the billing listener and its two service tokens."""

from __future__ import annotations

from pydantic import Field

from schemas.clock import FUTURE_TOLERANCE_S
from schemas.settings import CommonSettings


class BillingSettings(CommonSettings):
    billing_host: str = "127.0.0.1"
    billing_port: int = 8090
    # Unset tokens grant nothing: with no admin token there is no admin access at all.
    admin_token: str | None = None
    finance_token: str | None = None
    # Budget alerts: thresholds in percent of a monthly limit, and an optional webhook.
    alert_thresholds: list[int] = [50, 80, 100]
    alert_webhook_url: str | None = None
    alert_webhook_attempts: int = 5
    # Quota loop: usage updates go to proxies for entities at or past this share of a limit, at most
    # once per interval each; offsets are committed only for records older than the commit delay.
    quota_group: str = "tollway-billing-quota"
    quota_watch_ratio: float = 0.5
    quota_update_interval_ms: int = 100
    quota_commit_delay_s: float = 60.0
    # Quota = ledger: every `quota_converge_s` the month-to-date totals are recomputed from the ledger for rows
    # ingested up to now - `quota_settle_s`, plus what the stream counted that the ledger did not hold then; a
    # counted event the meter has not written `quota_tail_max_s` into its later writes is taken as never coming.
    quota_converge_s: float = Field(default=30.0, gt=0)
    quota_settle_s: float = Field(default=5.0, ge=0)
    quota_tail_max_s: float = Field(default=300.0, gt=0)
    # Acknowledgements (the event ids counted) to the proxies for entities not near a limit, at most this often.
    quota_ack_interval_ms: int = Field(default=1000, ge=0)
    # An event dated further than this ahead of billing's clock is clock-skewed: not counted, never rolls a month.
    # One rule with the meter's (same env var TOLLWAY_FUTURE_TOLERANCE_S): see schemas/clock.py.
    future_tolerance_s: float = Field(default=FUTURE_TOLERANCE_S, ge=0)
    # Invoices: a month can be finalized this long after it ended (late events: spool replay, meter lag).
    invoice_grace_s: float = Field(default=3600.0, ge=0)
    # Billing API limits (docs/operations.md states the budget). Bodies: capped before they are read, and
    # read only for a known caller. Requests: one token bucket per team (all its keys) and one per service
    # token. Reports: a bounded number in flight per caller, and ClickHouse limits on every report query.
    api_max_body_bytes: int = Field(default=1_048_576, ge=1024)
    api_team_rate_per_s: float = Field(default=20.0, gt=0)
    api_team_burst: int = Field(default=100, ge=1)
    api_staff_rate_per_s: float = Field(default=100.0, gt=0)
    api_staff_burst: int = Field(default=500, ge=1)
    api_reports_in_flight: int = Field(default=2, ge=1)
    report_max_execution_s: float = Field(default=5.0, gt=0)
    report_max_memory_bytes: int = Field(default=1_073_741_824, ge=1_048_576)
    report_max_threads: int = Field(default=1, ge=1)
    # How long an admin write waits for the broker's ack before it answers 202 (the outbox keeps trying).
    control_publish_wait_s: float = Field(default=2.0, gt=0)
