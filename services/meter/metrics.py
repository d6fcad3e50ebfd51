"""Meter metrics, defined once per process."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("tollway_meter_events_total", "Usage events processed", ["outcome"])  # written|dead|unpriced
BATCH_ROWS = Histogram(
    "tollway_meter_batch_rows",
    "Rows per ClickHouse insert",
    buckets=(1, 10, 100, 1_000, 5_000, 10_000, 20_000, 50_000),
)
INSERT_SECONDS = Histogram("tollway_meter_insert_seconds", "ClickHouse insert latency")
INSERT_FAILURES = Counter("tollway_meter_insert_failures_total", "Failed ClickHouse insert attempts")
COMMIT_FAILURES = Counter("tollway_meter_commit_failures_total", "Offset commits that failed (rebalance)")
LAG = Gauge("tollway_meter_consumer_lag", "High watermark minus position", ["partition"])
