"""Meter settings (env prefix TOLLWAY_)."""

from __future__ import annotations

from schemas.settings import CommonSettings


class MeterSettings(CommonSettings):
    meter_group: str = "tollway-meter"
    # ClickHouse likes few big inserts: up to this many rows, or whatever arrived within the wait.
    batch_max_rows: int = 20_000
    batch_max_wait_ms: int = 200
    insert_backoff_max_s: float = 10.0
