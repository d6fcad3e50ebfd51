-- Dead letters, also kept in ClickHouse so reconciliation can count them per period, team and model.
-- dead_id = sha256 of the record's bytes (services/meter/dead_letters.py DeadLetter.dead_id), never its offset: a replay,
-- a fresh broker or a re-feed of the same bytes is the same dead letter. (Until 2026-12 it also hashed topic,
-- partition and offset; rows written then keep those ids.)
-- team_id / model are best effort (whatever could be read from the bad record), '' when unknown.
CREATE TABLE IF NOT EXISTS {db}.usage_dead_letters
(
    dead_id     String,
    dead_at     DateTime64(3, 'UTC'),
    reason      String,
    topic       LowCardinality(String),
    partition   UInt32,
    offset      UInt64,
    team_id     LowCardinality(String),
    model       LowCardinality(String),
    event_id    String,
    key         String,
    value       String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(dead_at)
ORDER BY dead_id;
