#!/bin/bash
# First start of the ClickHouse container: a read-only user for Grafana (dashboards never write).
# readonly = 2 still lets the Grafana plugin set per-query settings such as max_execution_time.
set -euo pipefail
clickhouse client --user "$CLICKHOUSE_USER" --password "$CLICKHOUSE_PASSWORD" --multiquery <<SQL
CREATE USER IF NOT EXISTS grafana IDENTIFIED WITH sha256_password BY '${GRAFANA_CLICKHOUSE_PASSWORD}'
    SETTINGS readonly = 2;
GRANT SELECT ON tollway.* TO grafana;
SQL
