-- Read-only views for dashboards and ad-hoc SQL (Grafana, the built-in /dashboard, BI tools).
-- Every view is dedup-aware: it reads FINAL (or the rollup views of 005, which are built from FINAL),
-- so a redelivered or replayed event is never counted twice. Documented in docs/sql-views.md.
-- Spend, tokens and requests per hour/day: usage_hourly_v and usage_daily (005_usage_rollups.sql).

-- Teams by id with their names (for labels); the latest version of each row.
CREATE VIEW IF NOT EXISTS {db}.teams_v AS
SELECT team_id, name, plan, created_at
FROM {db}.teams FINAL;

-- Keys without their hashes: id, team, display prefix, label, state.
CREATE VIEW IF NOT EXISTS {db}.api_keys_v AS
SELECT key_id, team_id, prefix, name, plan, expires_at, revoked, created_at
FROM {db}.api_keys FINAL;

-- Cache hits per hour, team, key and model, and what they would have cost at the price in force
-- (a hit is billed zero but keeps its unit prices, so the saving is exact).
CREATE VIEW IF NOT EXISTS {db}.cache_savings_hourly AS
SELECT toStartOfHour(occurred_at) AS hour, team_id, key_id,
       {billed_model} AS model,
       count() AS cache_hits,
       sum(prompt_tokens) AS hit_prompt_tokens,
       sum(completion_tokens) AS hit_completion_tokens,
       sum((toDecimal128(prompt_tokens - least(cached_tokens, prompt_tokens), 0) * unit_input
            + toDecimal128(least(cached_tokens, prompt_tokens), 0) * unit_cached_input
            + toDecimal128(completion_tokens, 0) * unit_output) / 1000000) AS savings_usd
FROM {db}.usage_events FINAL
WHERE cache_hit
GROUP BY hour, team_id, key_id, model;

-- Events with tokens but no price in force: billed zero until a price exists and they are re-priced.
CREATE VIEW IF NOT EXISTS {db}.unpriced_events_v AS
SELECT event_id, occurred_at, team_id, key_id, requested_model, served_model, provider,
       prompt_tokens, completion_tokens, cached_tokens, ingested_at
FROM {db}.usage_events FINAL
WHERE NOT priced;
