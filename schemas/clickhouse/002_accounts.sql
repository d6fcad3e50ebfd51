-- Teams and keys: the durable account store. Small tables, rewritten whole on change; the latest
-- version of each row wins (ReplacingMergeTree(version) + FINAL). Only the SHA-256 of a key is stored.
CREATE TABLE IF NOT EXISTS {db}.teams
(
    team_id     String,
    name        String,
    plan        Nullable(String),
    limits      String,
    created_at  DateTime64(3, 'UTC'),
    version     UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY team_id;

CREATE TABLE IF NOT EXISTS {db}.api_keys
(
    key_id      String,
    key_hash    String,
    prefix      String,
    team_id     String,
    name        Nullable(String),
    plan        Nullable(String),
    limits      String,
    metadata    Map(String, String),
    expires_at  Nullable(DateTime64(3, 'UTC')),
    revoked     Bool,
    created_at  DateTime64(3, 'UTC'),
    version     UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY key_id;
