-- Billing's durable state beyond accounts: the budget-alert outbox and finalized invoices.
--
-- quota_alerts: one row per (period, scope, entity, metric, threshold), claimed before the alert is sent,
-- so a restart never sends a threshold twice; `delivered` flips (a newer version) once the topic and the
-- webhook have it, and undelivered rows are retried on start.
CREATE TABLE IF NOT EXISTS {db}.quota_alerts
(
    period       String,
    scope        LowCardinality(String),
    entity_id    String,
    metric       LowCardinality(String),
    threshold    UInt16,
    alert_id     String,
    team_id      String,
    used         Decimal(38, 18),
    limit_value  Decimal(38, 18),
    crossed_at   DateTime64(3, 'UTC'),
    delivered    Bool,
    version      UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (period, scope, entity_id, metric, threshold);

-- (No longer written: superseded by 031_invoice_lifecycle.sql's invoice_documents, which copies these rows.)
-- invoices: finalized invoices only (drafts are computed live). Written once, never updated: the
-- application refuses a second finalization of a (team, period), and `content` carries its own hash.
CREATE TABLE IF NOT EXISTS {db}.invoices
(
    invoice_id    String,
    number        String,
    seq           UInt64,
    team_id       String,
    period        String,
    total_usd     Decimal(38, 2),
    content       String,
    content_hash  String,
    finalized_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (team_id, period);
