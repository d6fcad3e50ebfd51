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
