-- A price version read back whole (issue 15 item 5, issue 16): 030 recorded the three base unit prices only, so
-- a version's cache write, fee, long-context and service-tier prices could not be read from the record. Every
-- unit price of the entry now joins its record (schemas/price_versions.py): the base set's other dimensions in
-- columns; the other rate sets (long context above its threshold, each service tier, each tier's own long
-- context) as exact decimal text in `rate_sets` (JSON); `identity`, the text the version hashes
-- (schemas/prices.price_identity), so the hash in `version` can be checked against the record. `whole` = 1 for
-- a record written with all of these; a record written before reads 0 (its new columns are defaults, not the
-- price) and is written again, whole, at the next start (the same version: no price changes). Idempotent.
ALTER TABLE {db}.price_versions ADD COLUMN IF NOT EXISTS unit_cache_write Decimal(38, 12);
ALTER TABLE {db}.price_versions ADD COLUMN IF NOT EXISTS unit_cache_write_1h Decimal(38, 12);
ALTER TABLE {db}.price_versions ADD COLUMN IF NOT EXISTS unit_request Decimal(38, 12);
ALTER TABLE {db}.price_versions ADD COLUMN IF NOT EXISTS unit_web_search Decimal(38, 12);
ALTER TABLE {db}.price_versions ADD COLUMN IF NOT EXISTS long_context_above_prompt_tokens UInt64;
ALTER TABLE {db}.price_versions ADD COLUMN IF NOT EXISTS rate_sets String;
ALTER TABLE {db}.price_versions ADD COLUMN IF NOT EXISTS identity String;
ALTER TABLE {db}.price_versions ADD COLUMN IF NOT EXISTS whole UInt8;
