"""Budget alerts: exactly one per (scope, entity, period, metric, threshold), durable across restarts.

A crossing is first claimed in `quota_alerts` (the outbox), then sent to `tollway.alerts.v1` (retried with
backoff while the broker is away: billing need not restart for it) and, when TOLLWAY_ALERT_WEBHOOK_URL is
set, POSTed with retries; only then is the row marked delivered. A restart skips claimed thresholds and
re-sends the undelivered ones, so no alert is lost and none is sent twice (short of a crash between the send
and the mark, which re-sends that one alert; its alert_id is stable so a receiver can drop it).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import orjson
import structlog
from aiokafka import AIOKafkaProducer

from schemas.budgets import describe
from schemas.clickhouse import Store
from schemas.control import ALERTS_TOPIC, BudgetAlert
from services.billing import metrics
from services.billing.producers import started_producer

log = structlog.get_logger("tollway.billing.alerts")

COLUMNS = ("period", "scope", "entity_id", "metric", "threshold", "alert_id", "team_id", "used", "limit_value",
           "crossed_at", "delivered", "version")  # fmt: skip
AlertKey = tuple[str, str, str, str, int]  # period, scope, entity_id, metric, threshold
SEND_RETRY_MAX_S = 30.0


def alert_id(key: AlertKey) -> str:
    return "alert_" + hashlib.sha256("|".join(map(str, key)).encode()).hexdigest()[:20]


class Alerts:
    def __init__(self, store: Store, bootstrap: str, webhook_url: str | None = None, webhook_attempts: int = 5,
                 webhook_backoff_s: float = 0.5) -> None:  # fmt: skip
        self._store = store
        self._bootstrap = bootstrap
        self._webhook_url = webhook_url
        self._attempts = webhook_attempts
        self._backoff = webhook_backoff_s
        self._claimed: set[AlertKey] = set()
        self._producer: AIOKafkaProducer | None = None
        self._http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connecting = asyncio.Lock()

    async def start(self, period: str) -> None:
        """The broker need not be up: the producer connects at the first alert, retrying."""
        self._http = httpx.AsyncClient(timeout=5.0)
        await self.load(period)

    async def _connect(self) -> AIOKafkaProducer:
        async with self._connecting:
            if self._producer is None:
                producer = await started_producer(self._bootstrap)
                self._producer = producer
            return self._producer

    async def _send(self, alert: BudgetAlert, body: bytes) -> None:
        """To the alerts topic, retried with backoff (0.5 s doubling to 30 s) until the broker takes it."""
        delay = self._backoff
        while True:
            try:
                producer = await self._connect()
                await producer.send_and_wait(ALERTS_TOPIC, body, key=f"{alert.scope}:{alert.id}".encode())
                return
            except Exception as err:
                log.warning("budget_alert_send_retry", alert_id=alert.alert_id, error=type(err).__name__,
                            retry_in_s=delay)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, SEND_RETRY_MAX_S)

    async def load(self, period: str) -> None:
        rows = await self._store.query_dicts(
            # the month's alerts and its days' (daily spend alerts are keyed by the day, YYYY-MM-DD)
            f"SELECT {', '.join(COLUMNS)} FROM {{db}}.quota_alerts FINAL WHERE startsWith(period, {{p:String}})",
            parameters={"p": period},
        )
        self._claimed = {(r["period"], r["scope"], r["entity_id"], r["metric"], int(r["threshold"])) for r in rows}
        for r in rows:
            if not r["delivered"]:
                self._spawn(self._alert_from_row(r))

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        for t in self._tasks:
            t.cancel()
        if self._producer is not None:
            await self._producer.stop()
        if self._http is not None:
            await self._http.aclose()

    def claimed(self, key: AlertKey) -> bool:
        return key in self._claimed

    async def raise_alert(self, key: AlertKey, team_id: str, used: Decimal, limit: Decimal,
                          **named: str) -> BudgetAlert | None:  # fmt: skip
        """Claim (durably) and send; None when this threshold was already alerted this period. `named`: a
        budget's entity for people (end_user, or tag and value; schemas.budgets.describe)."""
        if key in self._claimed:
            return None
        self._claimed.add(key)
        period, scope, entity_id, metric, threshold = key
        alert = BudgetAlert(alert_id=alert_id(key), scope=scope, id=entity_id, team_id=team_id, period=period,  # type: ignore[arg-type]
                            metric=metric, threshold_pct=threshold, used=used, limit=limit,  # type: ignore[arg-type]
                            crossed_at=datetime.now(UTC), **named)  # fmt: skip
        await self._write(alert, delivered=False)
        self._spawn(alert)
        return alert

    def _spawn(self, alert: BudgetAlert) -> None:
        task = asyncio.create_task(self._deliver(alert), name=f"alert-{alert.alert_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, alert: BudgetAlert) -> None:
        body = orjson.dumps(alert.model_dump(mode="json"))
        try:
            await self._send(alert, body)
            if self._webhook_url:
                await self._post(body)
            await self._write(alert, delivered=True)
            metrics.ALERTS.labels(metric=alert.metric, threshold=str(alert.threshold_pct)).inc()
            log.info("budget_alert_sent", alert_id=alert.alert_id, scope=alert.scope, id=alert.id,
                     metric=alert.metric, threshold=alert.threshold_pct)  # fmt: skip
        except Exception as err:  # left undelivered: the next start re-sends it
            log.warning("budget_alert_delivery_failed", alert_id=alert.alert_id, error=str(err)[:200])

    async def _post(self, body: bytes) -> None:
        assert self._http is not None and self._webhook_url is not None
        for attempt in range(1, self._attempts + 1):
            try:
                r = await self._http.post(self._webhook_url, content=body, headers={"content-type": "application/json"})
                if r.status_code < 500 and r.status_code != 429:
                    if r.is_success:
                        return
                    raise RuntimeError(f"webhook refused the alert: HTTP {r.status_code}")
            except httpx.HTTPError as err:
                log.warning("budget_alert_webhook_retry", attempt=attempt, error=str(err)[:200])
            if attempt == self._attempts:
                raise RuntimeError(f"webhook failed after {attempt} attempts")
            await asyncio.sleep(self._backoff * 2 ** (attempt - 1))

    async def _write(self, alert: BudgetAlert, delivered: bool) -> None:
        row = [alert.period, alert.scope, alert.id, alert.metric, alert.threshold_pct, alert.alert_id, alert.team_id,
               alert.used, alert.limit, alert.crossed_at, delivered, time.time_ns()]  # fmt: skip
        await self._store.insert_rows("quota_alerts", [row], COLUMNS)

    @staticmethod
    def _alert_from_row(r: dict) -> BudgetAlert:
        return BudgetAlert(alert_id=r["alert_id"], scope=r["scope"], id=r["entity_id"], team_id=r["team_id"],
                           period=r["period"], metric=r["metric"], threshold_pct=int(r["threshold"]), used=r["used"],
                           limit=r["limit_value"], crossed_at=r["crossed_at"].replace(tzinfo=UTC),
                           **describe((r["scope"], r["entity_id"])))  # fmt: skip
