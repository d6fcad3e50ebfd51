-- Server-side tool calls a provider bills per request (issue 15): Anthropic's
-- usage.server_tool_use.web_search_requests, OpenAI's web_search_call output items. An optional event field with
-- a default (schemas/usage_row.py), so UsageEvent stays schema_version 1; older rows read as 0. Idempotent.
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS web_search_requests UInt32;
