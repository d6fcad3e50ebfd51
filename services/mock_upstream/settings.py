"""Settings of the mock upstream (env prefix ``TOLLWAY_``)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class MockSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLWAY_", frozen=True, extra="ignore")

    mock_host: str = "127.0.0.1"
    mock_port: int = 9100
    mock_latency_ms: float = 0  # slept before every response unless a request sets its own latency
    mock_error_rate: float = 0  # 0..1 probability of a 503, drawn from random.Random(mock_seed)
    mock_seed: int = 0
    mock_stream_chunk_delay_ms: float = 0
