-- Hourly rollups per team, key and model, recomputed (not incremented) by the meter from deduplicated
-- data: usage_events FINAL plus usage_adjustments FINAL, for every (team, hour) that received rows since the
-- last pass. Recomputing a bucket replaces its row (ReplacingMergeTree(version)), so a duplicate, a replay or
-- an adjustment can never be counted twice; an incremental materialized view would add duplicates instead.
-- Latency quantiles are kept as mergeable states so the daily view merges hours exactly.
-- Dashboards read the views: usage_hourly_v and usage_daily (both FINAL-based, both dedup-aware).
CREATE TABLE IF NOT EXISTS {db}.usage_hourly
(
    hour                DateTime('UTC'),
    team_id             LowCardinality(String),
    key_id              LowCardinality(String),
    model               LowCardinality(String),
    requests            UInt64,
    errors              UInt64,
    cache_hits          UInt64,
    unpriced            UInt64,
    prompt_tokens       UInt64,
    completion_tokens   UInt64,
    cached_tokens       UInt64,
    cost                Decimal(38, 18),
    adjustments         Decimal(38, 18),
    latency_state       AggregateFunction(quantiles(0.5, 0.95, 0.99), Float64),
    refreshed_at        DateTime64(3, 'UTC'),
    version             UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(hour)
ORDER BY (team_id, hour, key_id, model);

CREATE VIEW IF NOT EXISTS {db}.usage_hourly_v AS
SELECT hour, team_id, key_id, model, requests, errors, cache_hits, unpriced, prompt_tokens, completion_tokens,
       cached_tokens, c + adjustments AS cost, adjustments,
       finalizeAggregation(latency_state) AS latency_ms_p50_p95_p99
FROM (SELECT *, cost AS c FROM {db}.usage_hourly FINAL);

CREATE VIEW IF NOT EXISTS {db}.usage_daily AS
SELECT toDate(hour) AS day, team_id, key_id, model,
       sum(requests) AS requests, sum(errors) AS errors, sum(cache_hits) AS cache_hits, sum(unpriced) AS unpriced,
       sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
       sum(cached_tokens) AS cached_tokens, sum(c + adj) AS cost, sum(adj) AS adjustments,
       quantilesMerge(0.5, 0.95, 0.99)(latency_state) AS latency_ms_p50_p95_p99
FROM (SELECT *, cost AS c, adjustments AS adj FROM {db}.usage_hourly FINAL)
GROUP BY day, team_id, key_id, model;
