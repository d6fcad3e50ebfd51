-- Re-rating writes signed adjustment rows; usage_events rows are never mutated.
-- Each row points at the event it corrects, the price version (and unit prices) it moves away from, and the
-- one it moves to. `seq` is the event's n-th adjustment; adjustment_id = sha256(event_id, seq, the version it
-- corrects, the new version, new units and the deltas) (services/meter/rerate.py), so a re-run (or a crashed
-- run re-run) writes identical ids that ReplacingMergeTree collapses: rerate is idempotent; two different
-- corrections never share an id.
-- Effective cost of an event = usage_events FINAL cost_total + sum(delta_total) of its adjustments FINAL.
CREATE TABLE IF NOT EXISTS {db}.usage_adjustments
(
    adjustment_id           String,
    event_id                UUID,
    seq                     UInt32,
    occurred_at             DateTime64(3, 'UTC'),
    team_id                 LowCardinality(String),
    key_id                  LowCardinality(String),
    model                   LowCardinality(String),
    provider                LowCardinality(String),
    corrects_price_version  LowCardinality(String),
    price_version           LowCardinality(String),
    unit_input              Decimal(38, 12),
    unit_output             Decimal(38, 12),
    unit_cached_input       Decimal(38, 12),
    delta_input             Decimal(38, 18),
    delta_cached_input      Decimal(38, 18),
    delta_output            Decimal(38, 18),
    delta_total             Decimal(38, 18),
    reason                  String,
    run_id                  String,
    created_at              DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (team_id, occurred_at, adjustment_id);
