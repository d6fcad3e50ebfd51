-- Every price version the meter or billing has put in force (schemas/price_versions.py): recorded at each start
-- for the config's entries with effective_from <= today, and by the meter's periodic pass for entries that
-- come into force while it runs. A start whose config holds another unit price for a recorded (model,
-- provider, effective_from) is refused: a price in force is never edited in place (docs/metering.md section 4).
CREATE TABLE IF NOT EXISTS {db}.price_versions
(
    version            String,
    model              String,
    provider           String,
    effective_from     String,
    unit_input         Decimal(38, 12),
    unit_output        Decimal(38, 12),
    unit_cached_input  Decimal(38, 12),
    recorded_at        DateTime64(3, 'UTC'),
    recorded_by        LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (model, provider, effective_from, version);
