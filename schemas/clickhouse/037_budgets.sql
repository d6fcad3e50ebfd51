-- End-user and tag budgets (issue 16; schemas/budgets.py): one row per (team, scope, tag, value), rewritten
-- whole on change, the latest version wins (ReplacingMergeTree(version) + FINAL, like teams and keys). A delete
-- writes a newer row with deleted = true. `value` '' with scope end_user is the team's default for every end
-- user (a real end user is never '': the event stores "no end user" as ''); `tag` is '' unless scope = tag.
CREATE TABLE IF NOT EXISTS {db}.budgets
(
    team_id               String,
    scope                 LowCardinality(String),
    tag                   String,
    value                 String,
    tokens_per_month      Nullable(UInt64),
    budget_usd_per_month  Nullable(Decimal(38, 18)),
    daily_alert_usd       Nullable(Decimal(38, 18)),
    deleted               Bool,
    updated_at            DateTime64(3, 'UTC'),
    version               UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, scope, tag, value);
