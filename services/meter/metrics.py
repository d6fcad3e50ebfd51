"""Meter metrics, defined once per process."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("tollway_meter_events_total", "Usage events processed", ["outcome"])  # written|dead|unpriced
BATCH_ROWS = Histogram(
    "tollway_meter_batch_rows",
    "Rows per ClickHouse insert",
    buckets=(1, 10, 100, 1_000, 5_000, 10_000, 20_000, 50_000),
)
INSERT_SECONDS = Histogram("tollway_meter_insert_seconds", "ClickHouse insert latency")
INSERT_FAILURES = Counter("tollway_meter_insert_failures_total", "Failed ClickHouse insert attempts", ["table"])
COMMIT_FAILURES = Counter("tollway_meter_commit_failures_total", "Offset commits that failed (rebalance)")
POSITIONS_REWOUND = Counter(
    "tollway_meter_positions_rewound_total",
    "Partitions sought back to the broker's committed offset instead of committing a batch past it",
    ["reason"],  # broker_behind (it forgot: restart, reset) | not_contiguous (batch read before that)
)
LAG = Gauge("tollway_meter_consumer_lag", "High watermark minus position", ["partition"])
DEAD_LETTERS = Counter("tollway_meter_dead_letters_total", "Records sent to the DLQ")
FUTURE_EVENTS = Counter(
    "tollway_meter_future_events_total",
    "Events held as dead letters because occurred_at was beyond the meter's clock plus future_tolerance_s",
)
UNPRICED_HELD = Gauge("tollway_meter_unpriced_held", "Stored events still waiting for a price (last pass)")
REPRICED = Counter("tollway_meter_repriced_total", "Held (unpriced) events priced once a price appeared")
ROLLUP_SECONDS = Histogram("tollway_meter_rollup_seconds", "Rollup refresh pass latency")
ROLLUP_FAILURES = Counter("tollway_meter_rollup_failures_total", "Rollup refresh passes that failed")
