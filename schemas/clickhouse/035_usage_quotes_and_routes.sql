-- The proxy's provisional cost as told to the caller (x-tollway-cost-usd / stream usage.cost) and its price
-- version, beside the meter's billed cost; and why the answering route was chosen (issue 16). Optional event
-- fields with defaults (schemas/usage_row.py), so UsageEvent stays schema_version 1; older rows read as ''
-- (nothing told). The quote is exact decimal text; the usage API reads it with toDecimal128. Idempotent.
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS quoted_cost_usd String;
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS quoted_price_version LowCardinality(String);
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS route_reason LowCardinality(String);
