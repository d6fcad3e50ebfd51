-- The invoice lifecycle (issue 13): documents that two billing replicas can never duplicate or replace,
-- numbers that two replicas can never give to two documents, and the plan history the fee is prorated by.
-- 010's `invoices` table (ReplacingMergeTree with no version, keyed by team and period) is no longer
-- written; its rows are copied here once, so existing databases keep their invoices and numbers.
--
-- invoice_documents: finalized invoices and credit notes, one per (team, period). invoice_id is derived
-- from (team, period), so every replica names a period's document alike; each is inserted with
-- insert_deduplication_token = its id (kept for the last 1000 inserts), so a second replica's insert is
-- dropped by the server and its read-back returns the first. version = 2^64-1 - finalized_at in ms:
-- should two rows ever coexist, FINAL keeps the FIRST written, never the last.
CREATE TABLE IF NOT EXISTS {db}.invoice_documents
(
    invoice_id    String,
    kind          LowCardinality(String),
    number        String,
    seq           UInt64,
    team_id       String,
    period        String,
    total_usd     Decimal(38, 2),
    content       String,
    content_hash  String,
    finalized_at  DateTime64(3, 'UTC'),
    version       UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY invoice_id
SETTINGS non_replicated_deduplication_window = 1000;

-- invoice_numbers: one claim row per number (one counter for invoices and credit notes), inserted with
-- insert_deduplication_token = the number: of two replicas claiming one number only the first row lands,
-- and each reads the claim back (the loser claims the next one).
CREATE TABLE IF NOT EXISTS {db}.invoice_numbers
(
    seq         UInt64,
    invoice_id  String,
    claimed_at  DateTime64(3, 'UTC'),
    version     UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY seq
SETTINGS non_replicated_deduplication_window = 1000;

-- plan_changes: every plan a team (scope 'team') or key (scope 'key') has had, from when. teams/api_keys
-- keep only the latest row; the plan fee is prorated over this history.
CREATE TABLE IF NOT EXISTS {db}.plan_changes
(
    scope         LowCardinality(String),
    entity_id     String,
    team_id       String,
    plan          String,
    effective_at  DateTime64(3, 'UTC'),
    version       UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, scope, entity_id, effective_at);

-- Re-running any of these copies is harmless: the copies collapse on their keys.
INSERT INTO {db}.invoice_documents
SELECT invoice_id, 'invoice', number, seq, team_id, period, total_usd, content, content_hash, finalized_at,
       toUInt64(18446744073709551615) - toUInt64(toUnixTimestamp64Milli(finalized_at))
FROM {db}.invoices FINAL;

INSERT INTO {db}.invoice_numbers
SELECT seq, invoice_id, finalized_at, toUInt64(18446744073709551615) - toUInt64(toUnixTimestamp64Milli(finalized_at))
FROM {db}.invoices FINAL;

-- Teams from before this table: the plan they have now, from their creation (the history that was lost).
INSERT INTO {db}.plan_changes
SELECT 'team', team_id, team_id, ifNull(plan, ''), created_at, 0 FROM {db}.teams FINAL;
