-- One row per usage event, priced. Exactly-once rests on two layers:
--  * ReplacingMergeTree keyed by event_id (inside ORDER BY) + FINAL in every query: redelivered, replayed or
--    re-inserted events collapse to one row whatever batch they arrived in;
--  * insert_deduplication_token per batch, named by its content (each row's event_id, price_version, cost_total;
--    never offsets, which a fresh broker reuses), with non_replicated_deduplication_window (without it the token
--    does nothing on a non-replicated table): a retried insert of the same rows is dropped before it is stored.
-- row_version lets a later write of the same event (e.g. an unpriced event priced once its price exists)
-- replace the earlier one.
CREATE TABLE IF NOT EXISTS {db}.usage_events
(
    event_id            UUID,
    occurred_at         DateTime64(3, 'UTC'),
    request_id          String,
    team_id             LowCardinality(String),
    key_id              LowCardinality(String),
    end_user            String,
    metadata            Map(String, String),
    endpoint            LowCardinality(String),
    requested_model     LowCardinality(String),
    served_model        LowCardinality(String),
    provider            LowCardinality(String),
    stream              Bool,
    status              LowCardinality(String),
    http_status         UInt16,
    error_code          LowCardinality(String),
    prompt_tokens       UInt64,
    completion_tokens   UInt64,
    cached_tokens       UInt64,
    latency_ms          Float64,
    ttft_ms             Nullable(Float64),
    attempts            UInt16,
    fallback_used       Bool,
    cache_hit           Bool,
    client_disconnected Bool,
    proxy_instance      LowCardinality(String),
    proxy_seq           UInt64,
    usage_source        LowCardinality(String),
    schema_version      UInt16,
    priced              Bool,
    price_version       LowCardinality(String),
    unit_input          Decimal(38, 12),
    unit_output         Decimal(38, 12),
    unit_cached_input   Decimal(38, 12),
    cost_input          Decimal(38, 18),
    cost_cached_input   Decimal(38, 18),
    cost_output         Decimal(38, 18),
    cost_total          Decimal(38, 18),
    kafka_partition     UInt32,
    kafka_offset        UInt64,
    ingested_at         DateTime64(3, 'UTC'),
    row_version         UInt64
)
ENGINE = ReplacingMergeTree(row_version)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (team_id, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
