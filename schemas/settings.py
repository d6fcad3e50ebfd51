"""Environment settings every service shares (prefix TOLLWAY_); each service subclasses this once."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLWAY_", frozen=True, extra="ignore")

    kafka_bootstrap: str | None = None  # None -> `tollway up` starts the bundled broker
    clickhouse_url: str | None = None  # None -> chdb://<data_dir>/clickhouse (embedded engine)
    clickhouse_database: str = "tollway"
    data_dir: Path = Path("./data")
    config: Path = Path("tollway.yaml")
    log_level: str = "info"
    log_format: str = "auto"  # json | console | auto (console on a TTY)
    usage_partitions: int = 4

    def resolved_clickhouse_url(self) -> str:
        if self.clickhouse_url:
            return self.clickhouse_url
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
