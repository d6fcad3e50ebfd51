-- Token details and service tier of a call (issue 14, for issue 15's agent traffic): reported, not yet priced.
-- Optional event fields with defaults (schemas/usage_row.py), so UsageEvent stays schema_version 1 and rows
-- written before this read as 0 / ''. Idempotent: IF NOT EXISTS makes a rerun change nothing.
--  * reasoning_tokens: inside completion_tokens (OpenAI completion_tokens_details.reasoning_tokens);
--  * cache_write_tokens / cache_write_1h_tokens: prompt tokens written to the provider's cache with the
--    5-minute / 1-hour TTL, inside prompt_tokens (Anthropic cache_creation_input_tokens, split 5m / 1h);
--  * service_tier: the provider's tier for the call, '' when not reported.
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS reasoning_tokens UInt64;
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS cache_write_tokens UInt64;
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS cache_write_1h_tokens UInt64;
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS service_tier LowCardinality(String);
