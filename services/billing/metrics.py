"""Billing's Prometheus metrics, defined once per process (creating the app twice must not re-register)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ADMIN_WRITES = Counter("tollway_billing_admin_writes_total", "Admin writes applied, by operation", ["operation"])
CONTROL_MESSAGES = Counter(
    "tollway_billing_control_messages_total", "Control messages acknowledged by the broker, by kind", ["kind"]
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
