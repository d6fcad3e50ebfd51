-- Prices for every dimension (issue 15): each row keeps the unit prices it used and its cost per dimension
-- (schemas/prices.py), and which rates priced it (price_tier: '' the base rates, 'long_context', or the
-- service tier's name). cost_total stays the sum of every cost_ column, so the rollups and every ledger sum
-- that read cost_total already include the new dimensions. Rows written before this read as 0 / '' (they
-- were priced with cache writes inside cost_input at the input price, which is what the new default is).
-- The cache write unit prices of an older row read as its unit_input (DEFAULT unit_input): what its cache
-- writes, inside its input, were priced at, so quantity x unit still foots to its cost_total.
-- Adjustments (rerate) carry the same unit prices and a delta per dimension. Idempotent.
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS price_tier LowCardinality(String);
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS unit_cache_write Decimal(38, 12) DEFAULT unit_input;
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS unit_cache_write_1h Decimal(38, 12) DEFAULT unit_input;
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS unit_request Decimal(38, 12);
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS unit_web_search Decimal(38, 12);
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS cost_cache_write Decimal(38, 18);
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS cost_cache_write_1h Decimal(38, 18);
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS cost_request Decimal(38, 18);
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS cost_web_search Decimal(38, 18);
ALTER TABLE {db}.usage_adjustments ADD COLUMN IF NOT EXISTS price_tier LowCardinality(String);
ALTER TABLE {db}.usage_adjustments ADD COLUMN IF NOT EXISTS unit_cache_write Decimal(38, 12) DEFAULT unit_input;
ALTER TABLE {db}.usage_adjustments ADD COLUMN IF NOT EXISTS unit_cache_write_1h Decimal(38, 12) DEFAULT unit_input;
ALTER TABLE {db}.usage_adjustments ADD COLUMN IF NOT EXISTS unit_request Decimal(38, 12);
ALTER TABLE {db}.usage_adjustments ADD COLUMN IF NOT EXISTS unit_web_search Decimal(38, 12);
ALTER TABLE {db}.usage_adjustments ADD COLUMN IF NOT EXISTS delta_cache_write Decimal(38, 18);
ALTER TABLE {db}.usage_adjustments ADD COLUMN IF NOT EXISTS delta_cache_write_1h Decimal(38, 18);
ALTER TABLE {db}.usage_adjustments ADD COLUMN IF NOT EXISTS delta_request Decimal(38, 18);
ALTER TABLE {db}.usage_adjustments ADD COLUMN IF NOT EXISTS delta_web_search Decimal(38, 18);

-- Cache hits' savings (020_dashboard_views.sql) in every dimension: what the hit would have cost at the rates
-- it was priced at (a hit keeps its unit prices), the input parts clipped as schemas/prices.py carves them.
CREATE OR REPLACE VIEW {db}.cache_savings_hourly AS
SELECT toStartOfHour(occurred_at) AS hour, team_id, key_id,
       {billed_model} AS model,
       count() AS cache_hits,
       sum(prompt_tokens) AS hit_prompt_tokens,
       sum(completion_tokens) AS hit_completion_tokens,
       sum((toDecimal128(prompt_tokens - cached - cw - cw1h, 0) * unit_input
            + toDecimal128(cached, 0) * unit_cached_input
            + toDecimal128(cw, 0) * unit_cache_write
            + toDecimal128(cw1h, 0) * unit_cache_write_1h
            + toDecimal128(completion_tokens, 0) * unit_output
            + toDecimal128(toUInt8(prompt_tokens > 0 OR completion_tokens > 0), 0) * unit_request * 1000000
            + toDecimal128(web_search_requests, 0) * unit_web_search * 1000) / 1000000) AS savings_usd
FROM (
    SELECT *, least(cached_tokens, prompt_tokens) AS cached, least(cache_write_tokens, prompt_tokens - cached) AS cw,
           least(cache_write_1h_tokens, prompt_tokens - cached - cw) AS cw1h
    FROM {db}.usage_events FINAL
    WHERE cache_hit
)
GROUP BY hour, team_id, key_id, model;
