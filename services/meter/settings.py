"""Meter settings (env prefix TOLLWAY_)."""

from __future__ import annotations

from pydantic import Field

from schemas.clock import FUTURE_TOLERANCE_S
from schemas.events import USAGE_TOPIC
from schemas.settings import CommonSettings


class MeterSettings(CommonSettings):
    meter_group: str = "tollway-meter"
    usage_topic: str = USAGE_TOPIC  # tests and benchmarks point a meter at a topic of their own
    # ClickHouse likes few big inserts: up to this many rows, or whatever arrived within the wait (so the cap
    # matters only with a backlog). 50k over 20k: fewer parts to merge, ~1.3x events/s in bench/meter_throughput.
    batch_max_rows: int = 50_000
    batch_max_wait_ms: int = 200
    # Priced batches waiting for the writer. 3 measured no faster than 2 (bench/README.md, round 4); under a
    # backlog the meter's RSS grows ~300 MB at 20k rows and ~600 MB at 50k, mostly batches in flight.
    pipeline_depth: int = 2
    # Threads pricing batches. The JSON parse (most of a batch's CPU) runs off the GIL, so two threads keep both
    # cores of a small box busy while this thread fetches; batches still commit in fetch order.
    decode_threads: int = 2
    insert_backoff_max_s: float = 10.0
    # How far ahead of this meter's clock an occurred_at may be: beyond it the event is a dead letter (reason
    # "occurred_at ... is in the future", metric tollway_meter_future_events_total), never usage that opens a
    # later month. Covers clock skew between proxy and meter hosts.
    future_tolerance_s: float = Field(default=FUTURE_TOLERANCE_S, ge=0)
    # Held (unpriced) events are re-priced at start and then this often; a new price needs a restart anyway.
    reprice_interval_s: float = 60.0
    rollup_interval_s: float = 5.0
    rollup_catchup_s: float = 86_400.0
    # A SIGKILLed member holds its partitions until its session expires: lower means faster takeover.
    meter_session_timeout_ms: int = 10_000
    # `tollway meter` alone serves /metrics, /healthz and /readyz here (services/meter/health.py). Off unless a
    # port is set: meters sharing a host (tests, benchmarks, a laptop) would otherwise fight over one port.
    meter_http_host: str = "0.0.0.0"
    meter_http_port: int | None = None
    meter_metrics_port: int | None = None  # the old name of meter_http_port, still honoured

    @property
    def http_port(self) -> int | None:
        return self.meter_http_port if self.meter_http_port is not None else self.meter_metrics_port
