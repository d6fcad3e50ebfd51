"""Billing's Prometheus metrics, defined once per process (creating the app twice must not re-register)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ADMIN_WRITES = Counter("tollway_billing_admin_writes_total", "Admin writes applied, by operation", ["operation"])
CONTROL_MESSAGES = Counter(
    "tollway_billing_control_messages_total", "Control messages acknowledged by the broker, by kind", ["kind"]
)
CONTROL_OUTBOX = Gauge("tollway_billing_control_outbox", "Control messages queued and not yet acknowledged")
CONTROL_PUBLISH_FAILURES = Counter(
    "tollway_billing_control_publish_failures_total", "Control outbox send attempts that failed (then retried)"
)
CONTROL_UNENCODABLE = Counter(
    "tollway_billing_control_unencodable_total", "Control messages left out because they cannot be encoded", ["kind"]
)
STORED_UNUSABLE = Counter(
    "tollway_billing_stored_unusable_total",
    "Stored account rows or fields billing could not use at start (logged, skipped), by table and field",
    ["table", "field"],
)
API_REFUSED = Counter(
    "tollway_billing_api_refused_total",
    "Requests refused before the handler ran, by reason (body_too_large, unauthenticated_body, rate_limited)",
    ["reason"],
)
AUTH_FAILURES = Counter(
    "tollway_billing_auth_failures_total", "Requests refused by billing auth, by reason", ["reason"]
)
USAGE_QUERIES = Counter("tollway_billing_usage_queries_total", "Usage reports served, by group_by", ["group_by"])
USAGE_QUERY_SECONDS = Histogram(
    "tollway_billing_usage_query_seconds",
    "Time spent in ClickHouse for one usage report",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# -- quotas, alerts, invoices ----------------------------------------------------------------------------
QUOTA_EVENTS = Counter(
    "tollway_billing_quota_events_total", "Usage events seen by the quota loop, by outcome", ["outcome"]
)
QUOTA_CONVERGE_SECONDS = Histogram(
    "tollway_billing_quota_converge_seconds",
    "One convergence of month-to-date quota on the ledger (its ClickHouse queries)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUOTA_TAIL_DROPPED = Counter(
    "tollway_billing_quota_tail_dropped_total",
    "Events the quota stream counted that the meter never wrote (dropped or dead-lettered), no longer counted",
)
QUOTA_SIGNALS = Counter("tollway_billing_quota_signals_total", "Quota signals published, by kind", ["kind"])
QUOTA_DETECT_SECONDS = Histogram(
    "tollway_billing_quota_detect_seconds",
    "From the end of the call that crossed a limit to billing's exhausted signal being acknowledged",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUOTA_OVERSHOOT_TOKENS = Counter(
    "tollway_billing_quota_overshoot_tokens_total", "Tokens counted beyond a monthly token limit", ["scope"]
)
QUOTA_OVERSHOOT_USD = Counter(
    "tollway_billing_quota_overshoot_usd_total", "Spend (USD) counted beyond a monthly budget", ["scope"]
)
ALERTS = Counter("tollway_billing_alerts_sent_total", "Budget alerts delivered", ["metric", "threshold"])
INVOICES_FINALIZED = Counter("tollway_billing_invoices_finalized_total", "Invoices finalized")
