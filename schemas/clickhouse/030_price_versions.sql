-- The price version in force for each (model, provider, effective_from), as the meter or billing put it in force
-- (schemas/price_versions.py): recorded at each start for the config's entries with effective_from <= today, and
-- by the meter's periodic pass for entries that come into force while it runs. A start whose config holds other
-- unit prices for a recorded entry that has priced usage is refused: a price in force is never edited in place
-- (docs/metering.md section 4). The latest record of a key wins (a correction of a price that priced nothing).
CREATE TABLE IF NOT EXISTS {db}.price_versions
(
    model              String,
    provider           String,
    effective_from     String,
    version            String,
    unit_input         Decimal(38, 12),
    unit_output        Decimal(38, 12),
    unit_cached_input  Decimal(38, 12),
    recorded_at        DateTime64(3, 'UTC'),
    recorded_by        LowCardinality(String)
)
ENGINE = ReplacingMergeTree(recorded_at)
ORDER BY (model, provider, effective_from);
