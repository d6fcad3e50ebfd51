"""The quota loop: month-to-date totals that converge to the ledger, advanced from `tollway.usage.v1` in
between, turned into quota signals for the proxies (exhausted / restored / usage updates with the ids counted)
and budget alerts.

Month-to-date = ledger(rows ingested up to a settled cutoff) + tail (events the stream counted since that the
ledger did not hold at the cutoff). Every `quota_converge_s` the cutoff moves to now - `quota_settle_s`:
  * the ledger totals are recomputed (so a call the meter priced later, a re-rating adjustment, or a call
    the meter never wrote are what the ledger says, not what the stream saw);
  * tail events the ledger now holds (ingested between the previous cutoff, less the settle, and this one)
    leave the tail; tail events the meter has not written `quota_tail_max_s` into its later writes are
    dropped (dropped or dead-lettered: never billed). While the meter writes nothing, nothing is dropped.
Exactly-once between the two, without a shared transaction between ClickHouse and Kafka:
  * the stream counts an event unless the ledger holds it at the current cutoff (checked in ClickHouse, for
    events old enough to be there) or the stream did (a bounded id set per period);
  * offsets are committed only for records older than `quota_commit_delay_s`, so a restart replays at
    least that much: everything ingested after the first cutoff comes back through the stream.
Clocks: the month rolls on billing's clock, never on an event's. An event dated more than
`future_tolerance_s` (schemas/clock.py, the meter's rule too) ahead of billing's clock is clock-skewed: counted by a metric, logged, not counted
(the meter holds it as a dead letter); one dated in the next month within the tolerance waits for the roll.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from schemas.budgets import Budget, describe, team_of
from schemas.clickhouse import Store
from schemas.clock import future_cutoff, utc
from schemas.config import GatewayConfig, Limits
from schemas.control import KeyState, QuotaSignal, monthly_limits
from schemas.events import USAGE_TOPIC, UsageEvent
from schemas.periods import bounds, period_of
from schemas.prices import PriceBook, price
from schemas.quota import has_monthly_limit, quota_tokens
from schemas.reconnect import partitions_of, reconnecting
from services.billing import budget_ledger, ledger, metrics
from services.billing.accounts import Accounts
from services.billing.alerts import Alerts
from services.billing.budgets import Budgets
from services.billing.control import ControlPublisher
from services.billing.quota import DailySpend, Entity, QuotaBook, Usage, crossed_thresholds, exhausted_by, near_limit
from services.billing.settings import BillingSettings

log = structlog.get_logger("tollway.billing.quota")

CLOCK_SKEW = timedelta(seconds=5)  # how far a row's occurred_at may lead the meter's ingested_at
CONVERGE_DUTY = 10  # wait at least this many times the last convergence took before the next one
ACK_CHUNK = 2000  # event ids per acknowledgement message (~80 KB)
SKEW_LOG_EVERY_S = 60.0  # one clock_skewed log line per proxy instance per minute (the metric counts all)


async def ledger_month_to_date(store: Store, period: str, ingested_before: datetime) -> dict[Entity, Usage]:
    """Per team and per key: the ledger's month-to-date (billable tokens, exact cost incl. adjustments)."""
    out: dict[Entity, Usage] = {}
    for r in await ledger.month_to_date(store, period, ingested_before):
        for entity in (("team", r.team_id), ("key", r.key_id)):
            u = out.setdefault(entity, Usage())  # type: ignore[arg-type]
            u.tokens, u.usd = u.tokens + r.tokens, u.usd + r.usd
            if r.last_at is not None and (u.last_at is None or r.last_at > u.last_at):
                u.last_at = r.last_at
    return out


async def ingested_between(store: Store, period: str, after: datetime,
                           until: datetime) -> tuple[set[str], datetime | None]:  # fmt: skip
    """Ids of the period's rows ingested in (after, until], and the latest such ingested_at (the meter's
    progress). Any copy counts: a row is in the ledger from its first write."""
    start, end = bounds(period)
    rows = await store.query(
        """SELECT toString(event_id), ingested_at FROM {db}.usage_events
           WHERE occurred_at >= {start:DateTime64(3, 'UTC')} AND occurred_at < {end:DateTime64(3, 'UTC')}
             AND ingested_at > {after:DateTime64(3, 'UTC')} AND ingested_at <= {until:DateTime64(3, 'UTC')}""",
        parameters={"start": start, "end": end, "after": after, "until": until},
    )
    progress = max((r[1] for r in rows), default=None)
    return {r[0] for r in rows}, None if progress is None else utc(progress)


class QuotaService:
    def __init__(self, settings: BillingSettings, config: GatewayConfig, store: Store, accounts: Accounts,
                 publisher: ControlPublisher, alerts: Alerts, bootstrap: str,
                 budgets: Budgets | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.config = config
        self.store = store
        self.accounts = accounts
        self.publisher = publisher
        self.alerts = alerts
        self.bootstrap = bootstrap
        self.budgets = budgets or Budgets(store, accounts)  # end-user and tag budgets (schemas/budgets.py)
        self.book_ = PriceBook(config)
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # billing's clock: the period rolls on it
        self.book = QuotaBook(period_of(self.clock()))
        self.daily = DailySpend(self.clock().date().isoformat())  # entities with a daily_alert_usd
        self.states: dict[Entity, QuotaSignal] = {}  # last exhausted/restored signal per entity
        self.counted: dict[Entity, list[str]] = {}  # ids counted since the entity's last acknowledgement
        self.last_update: dict[Entity, float] = {}
        self.dirty: set[Entity] = set()
        self.overshoot: dict[Entity, tuple[int, Decimal]] = {}
        self.expiry_announced: set[str] = set()
        self.settle = timedelta(seconds=settings.quota_settle_s)
        self.cutoff = self.clock() - self.settle
        self.meter_progress: datetime | None = None  # the latest ingested_at the ledger has shown
        self.early: list[UsageEvent] = []  # next month's events within the clock tolerance: wait for the roll
        self.ready = asyncio.Event()  # the consumer has its partitions
        self._book_lock = asyncio.Lock()  # an ingest's ledger check and a convergence never interleave
        self._converge_due = asyncio.Event()
        self._converge_took = 0.0
        self._skew_logged: dict[str, float] = {}
        self._uncommitted: dict[TopicPartition, deque[tuple[int, int]]] = {}
        self._last_commit = 0.0
        self._alert_tasks: set[asyncio.Task[None]] = set()

    # -- limits and state ---------------------------------------------------------------------------

    def limits(self, entity: Entity) -> Limits | None:
        scope, entity_id = entity
        if scope == "team":
            team = self.accounts.find_team(entity_id)
            return None if team is None else monthly_limits(self.config, "team", team.plan, team.limits)
        if scope == "key":
            key = self.accounts.get_key(entity_id)
            return None if key is None else monthly_limits(self.config, "key", key.plan, key.limits)
        budget = self.budgets.index.get(entity)
        return None if budget is None else budget.limits

    def daily_alert(self, entity: Entity) -> Decimal | None:
        """The entity's daily spend alert threshold: a team's from its limits (plan, own), a budget's own."""
        if entity[0] == "team":
            limits = self.limits(entity)
            return None if limits is None else limits.daily_alert_usd
        if entity[0] == "key":
            return None
        budget = self.budgets.index.get(entity)
        return None if budget is None else budget.daily_alert_usd

    def team_of(self, entity: Entity) -> str:
        if entity[0] == "team":
            return entity[1]
        if entity[0] == "key":
            return getattr(self.accounts.get_key(entity[1]), "team_id", "")
        return team_of(entity[1])

    def state_of(self, entity: Entity) -> tuple[str, str | None]:
        sig = self.states.get(entity)
        if sig is not None and sig.state == "exhausted" and sig.period == self.book.period:
            return "exhausted", sig.reason
        return "ok", None

    def _signal(self, entity: Entity, state: str, reason: str | None = None, **extra: Any) -> QuotaSignal:
        usage, limits = self.book.get(entity), self.limits(entity) or Limits()
        return QuotaSignal(scope=entity[0], id=entity[1], state=state, reason=reason, period=self.book.period,  # type: ignore[arg-type]
                           used_tokens=usage.tokens, used_usd=usage.usd, limit_tokens=limits.tokens_per_month,
                           limit_usd=limits.budget_usd_per_month, as_of=datetime.now(UTC), **extra)  # fmt: skip

    # -- the ledger -----------------------------------------------------------------------------------

    async def seed(self) -> None:
        """Month-to-date totals from the ledger at start (exhausted states are republished with the full
        state, not signalled one by one)."""
        await self.converge(publish=False)
        for entity in list(self.book.usage):
            limits = self.limits(entity)
            reason = exhausted_by(self.book.get(entity), limits) if limits else None
            if reason:
                self.states[entity] = self._signal(entity, "exhausted", reason)
        for key in self.accounts.keys():
            if key.expires_at is not None and key.expires_at <= datetime.now(UTC):
                self.expiry_announced.add(key.key_id)
        log.info("quota_seeded", period=self.book.period, entities=len(self.book.usage), exhausted=len(self.states))

    async def converge(self, publish: bool = True) -> None:
        """Move the cutoff: ledger totals as of it, minus from the tail what the ledger now holds."""
        period, previous = self.book.period, self.cutoff
        cutoff = self.clock() - self.settle
        t0 = time.perf_counter()
        settled = await ledger_month_to_date(self.store, period, cutoff)
        if len(self.budgets.index):
            start, end = bounds(period)
            settled.update(await budget_ledger.budget_spend(self.store, self.budgets.index, start, end, cutoff))
        # From the previous cutoff less the settle: a row stamped just before it may have become visible after.
        in_ledger, progress = await ingested_between(self.store, period, previous - self.settle, cutoff)
        # The day's spend converges the same way, when some team or budget has a daily alert threshold.
        now = self.clock()
        daily = await self._daily_ledger(now, cutoff) if self._wants_daily() else None
        self._converge_took = time.perf_counter() - t0
        metrics.QUOTA_CONVERGE_SECONDS.observe(self._converge_took)
        async with self._book_lock:
            if period != self.book.period:
                return  # the month rolled meanwhile: the next convergence is for the new one
            self.cutoff = cutoff
            if progress is not None and (self.meter_progress is None or progress > self.meter_progress):
                self.meter_progress = progress
            done = self.book.converge(settled, in_ledger, self.meter_progress,
                                      timedelta(seconds=self.settings.quota_tail_max_s))  # fmt: skip
            if daily is not None and now.date().isoformat() >= self.daily.day:
                self.daily = self._daily_from(now.date().isoformat(), daily)
        metrics.QUOTA_TAIL_DROPPED.inc(done.dropped)
        if done.changed or done.dropped:
            log.info("quota_converged", period=period, cutoff=cutoff.isoformat(), changed=len(done.changed),
                     tail=len(self.book.tail), absorbed=done.absorbed, dropped=done.dropped)  # fmt: skip
        if publish:
            for entity in done.changed:
                await self.evaluate(entity)
                self._spawn_alerts(entity)
            for entity in set(self.daily.usd) - done.changed:  # a daily threshold set, or crossed by the ledger
                self._spawn_alerts(entity)

    def _wants_daily(self) -> bool:
        return any(b.daily_alert_usd is not None for b in self.budgets.index) or any(
            self.daily_alert(("team", t.team_id)) is not None for t in self.accounts.teams()
        )

    async def _daily_ledger(self, now: datetime, cutoff: datetime) -> dict[Entity, Decimal]:
        """Today's (UTC, billing's clock) spend per team and budgeted entity in the ledger as of `cutoff`."""
        start = datetime(now.year, now.month, now.day, tzinfo=UTC)
        end = start + timedelta(days=1)
        spend = await budget_ledger.team_spend(self.store, start, end, cutoff)
        if len(self.budgets.index):
            found = await budget_ledger.budget_spend(self.store, self.budgets.index, start, end, cutoff)
            spend.update({entity: u.usd for entity, u in found.items()})
        return spend

    def _daily_from(self, day: str, spend: dict[Entity, Decimal]) -> DailySpend:
        """The day's spend the way month-to-date is made: the ledger's plus the stream's tail of that day."""
        for c in self.book.tail.values():
            if c.at.date().isoformat() == day:
                for entity in (("team", c.team_id), *c.budgets):
                    spend[entity] = spend.get(entity, Decimal(0)) + c.usd  # type: ignore[index]
        return DailySpend(day, {e: usd for e, usd in spend.items() if self.daily_alert(e) is not None})

    async def _converge_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                # A month's ledger query grows with the month (0.3-0.7 s for 200k rows on embedded chdb, which
                # shares one ClickHouse thread with the meter): keep it under ~10% of that thread.
                wait_s = max(self.settings.quota_converge_s, CONVERGE_DUTY * self._converge_took)
                await asyncio.wait_for(self._converge_due.wait(), timeout=wait_s)
            except TimeoutError:
                pass
            self._converge_due.clear()
            if stop.is_set():
                return
            try:
                await self.converge()
            except Exception as err:  # ClickHouse trouble: keep the totals, try again next round
                log.warning("quota_converge_failed", error=str(err)[:300])

    def full_state(self) -> list[Budget | QuotaSignal]:
        """Current quota states for the full-state republish: every budget, every exhausted entity, and a
        usage update for every entity near a limit."""
        out: list[Budget | QuotaSignal] = list(self.budgets.index)
        out += [s for s in self.states.values() if s.state == "exhausted" and s.period == self.book.period]
        for entity, usage in self.book.usage.items():
            limits = self.limits(entity)
            if entity not in self.states and limits and has_monthly_limit(limits):
                if near_limit(usage, limits, self.settings.quota_watch_ratio):
                    out.append(self._signal(entity, "ok"))
        return out

    # -- the loop -------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        converging = asyncio.create_task(self._converge_loop(stop), name="billing-quota-converge")
        await reconnecting(lambda: self._consume(stop), stop, log, "quota_loop_error")  # the totals stay
        self._converge_due.set()
        await converging
        if self._alert_tasks:
            await asyncio.wait(list(self._alert_tasks), timeout=5)

    async def _consume(self, stop: asyncio.Event) -> None:
        # Every partition, assigned by hand: a billing instance needs whole-team totals, and a group join
        # (seconds on tansu) would delay the first signal. The group id only names where offsets are kept.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.settings.quota_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
        )
        await consumer.start()
        try:
            parts = await partitions_of(consumer, USAGE_TOPIC, stop)
            consumer.assign([TopicPartition(USAGE_TOPIC, p) for p in sorted(parts)])
            self.ready.set()
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=50, max_records=5000)
                records = [r for part in batch.values() for r in part]
                if records:
                    await self.ingest(records)
                    for r in records:
                        tp = TopicPartition(r.topic, r.partition)
                        self._uncommitted.setdefault(tp, deque()).append((r.timestamp, r.offset))
                await self.tick()
                await self._commit(consumer)
        finally:
            await consumer.stop()

    async def ingest(self, records: list[Any]) -> None:
        events: list[UsageEvent] = []
        for r in records:
            try:
                events.append(UsageEvent.model_validate_json(r.value))
            except (ValidationError, ValueError, TypeError):
                metrics.QUOTA_EVENTS.labels(outcome="invalid").inc()
        await self.ingest_events(events)

    async def ingest_events(self, events: list[UsageEvent]) -> None:
        async with self._book_lock:
            touched = await self._count(self._current(events))
        # Signals first (they are what bites), alerts after, off the hot path.
        for entity, finished in touched.items():
            await self.evaluate(entity, finished)
        for entity in touched:
            self._spawn_alerts(entity)

    def _current(self, events: list[UsageEvent]) -> list[UsageEvent]:
        """This period's events. The month never rolls here: billing's clock rolls it (`tick`)."""
        now = self.clock()
        _, future = future_cutoff(now, self.settings.future_tolerance_s)
        current: list[UsageEvent] = []
        for e in events:
            p = period_of(e.occurred_at)
            if e.occurred_at >= future:
                self._clock_skewed(e, now)
            elif p == self.book.period:
                current.append(e)
            elif p > self.book.period:
                self.early.append(e)  # bounded: the tolerance's worth of traffic at a month's edge
                metrics.QUOTA_EVENTS.labels(outcome="next_period").inc()
            else:
                metrics.QUOTA_EVENTS.labels(outcome="past_period").inc()
        return current

    def _clock_skewed(self, e: UsageEvent, now: datetime) -> None:
        metrics.QUOTA_EVENTS.labels(outcome="clock_skewed").inc()
        mono = time.monotonic()
        if mono - self._skew_logged.get(e.proxy_instance, -SKEW_LOG_EVERY_S) >= SKEW_LOG_EVERY_S:
            self._skew_logged[e.proxy_instance] = mono
            log.warning("quota_event_clock_skewed", proxy_instance=e.proxy_instance, event_id=e.event_id,
                        team_id=e.team_id, occurred_at=e.occurred_at.isoformat(),
                        ahead_s=round((e.occurred_at - now).total_seconds(), 3))  # fmt: skip

    async def _count(self, current: list[UsageEvent]) -> dict[Entity, datetime]:
        seeded = await self._already_seeded(current)
        touched: dict[Entity, datetime] = {}
        gated: dict[Entity, bool] = {}
        counted_at = self.clock()
        today = self.daily.day
        index = self.budgets.index
        for e in current:
            budgets: tuple[Entity, ...] = ()
            if index.has_team(e.team_id):
                budgets = tuple(entity for entity, _ in index.entities(e.team_id, e.end_user, e.metadata))
            entities: tuple[Entity, ...] = (("team", e.team_id), ("key", e.key_id), *budgets)
            if e.event_id in seeded:
                metrics.QUOTA_EVENTS.labels(outcome="seeded").inc()
                self._acknowledge(entities, e.event_id, gated)  # in billing's total: a proxy may forget it
                continue
            priced = price(e, self.book_)
            tokens = quota_tokens(e.status, e.prompt_tokens, e.completion_tokens)
            if not self.book.add(e.event_id, e.team_id, e.key_id, tokens, priced.cost.total, e.occurred_at,
                                 counted_at, budgets):  # fmt: skip
                metrics.QUOTA_EVENTS.labels(outcome="duplicate").inc()
                self._acknowledge(entities, e.event_id, gated)
                continue
            metrics.QUOTA_EVENTS.labels(outcome="counted").inc()
            self._acknowledge(entities, e.event_id, gated)
            finished = e.occurred_at + timedelta(milliseconds=e.latency_ms)
            same_day = e.occurred_at.date().isoformat() == today
            for entity in entities:
                touched[entity] = finished
                if same_day and self.daily_alert(entity) is not None:
                    self.daily.add(entity, priced.cost.total)
        return touched

    def _acknowledge(self, entities: tuple[Entity, ...], event_id: str, gated: dict[Entity, bool]) -> None:
        """Queue the id for the proxies' not-yet-counted ledgers (only entities they gate have one).
        `gated` caches the limit lookup for one batch."""
        for entity in entities:
            hit = gated.get(entity)
            if hit is None:
                limits = self.limits(entity)
                hit = gated[entity] = limits is not None and has_monthly_limit(limits)
            if hit:
                self.counted.setdefault(entity, []).append(event_id)

    async def _already_seeded(self, events: list[UsageEvent]) -> set[str]:
        """Ids of events the seed counted. Only events old enough to predate the cutoff can be among them."""
        limit = self.cutoff + CLOCK_SKEW
        ids = [e.event_id for e in events if e.occurred_at <= limit and not self.book.seen(e.event_id)]
        # (an event ingested after the cutoff is not there yet: the next convergence takes it off the tail)
        if not ids:
            return set()
        start, end = bounds(self.book.period)
        rows = await self.store.query(
            """SELECT toString(event_id) FROM {db}.usage_events FINAL
               WHERE occurred_at >= {start:DateTime64(3, 'UTC')} AND occurred_at < {end:DateTime64(3, 'UTC')}
                 AND has({ids:Array(String)}, toString(event_id)) AND ingested_at <= {cutoff:DateTime64(3, 'UTC')}""",
            parameters={"start": start, "end": end, "ids": ids, "cutoff": self.cutoff},
        )
        return {r[0] for r in rows}

    async def evaluate(self, entity: Entity, crossed_at: datetime | None = None) -> None:
        """Publish exhausted on a crossing and ok on a recovery (a raised limit); track overshoot."""
        limits = self.limits(entity)
        usage = self.book.get(entity)
        reason = exhausted_by(usage, limits) if limits else None
        was, _ = self.state_of(entity)
        if limits is not None:
            self._track_overshoot(entity, limits)
        if reason and was != "exhausted":
            sig = self._signal(entity, "exhausted", reason, crossed_at=crossed_at or datetime.now(UTC))
            self.states[entity] = sig
            await self.publisher.publish(sig)
            metrics.QUOTA_SIGNALS.labels(kind="exhausted").inc()
            if crossed_at is not None:
                metrics.QUOTA_DETECT_SECONDS.observe(max(0.0, (datetime.now(UTC) - crossed_at).total_seconds()))
            log.info("quota_exhausted", scope=entity[0], id=entity[1], reason=reason, period=self.book.period)
        elif not reason and was == "exhausted":
            sig = self._signal(entity, "ok", "restored")
            self.states[entity] = sig
            await self.publisher.publish(sig)
            metrics.QUOTA_SIGNALS.labels(kind="restored").inc()
            log.info("quota_restored", scope=entity[0], id=entity[1], period=self.book.period)
        elif not reason and limits is not None and near_limit(usage, limits, self.settings.quota_watch_ratio):
            self.dirty.add(entity)

    def _track_overshoot(self, entity: Entity, limits: Limits) -> None:
        usage = self.book.get(entity)
        over_t = max(0, usage.tokens - limits.tokens_per_month) if limits.tokens_per_month is not None else 0
        over_u = (max(Decimal(0), usage.usd - limits.budget_usd_per_month)
                  if limits.budget_usd_per_month is not None else Decimal(0))  # fmt: skip
        prev_t, prev_u = self.overshoot.get(entity, (0, Decimal(0)))
        if over_t > prev_t:
            metrics.QUOTA_OVERSHOOT_TOKENS.labels(scope=entity[0]).inc(over_t - prev_t)
        if over_u > prev_u:
            metrics.QUOTA_OVERSHOOT_USD.labels(scope=entity[0]).inc(float(over_u - prev_u))
        self.overshoot[entity] = (max(over_t, prev_t), max(over_u, prev_u))

    def _spawn_alerts(self, entity: Entity) -> None:
        limits = self.limits(entity)
        if limits is None:
            return
        todo: list[tuple[tuple[str, str, str, str, int], Decimal, Decimal]] = []
        for metric, pct, used, limit in crossed_thresholds(
            self.book.get(entity), limits, self.settings.alert_thresholds
        ):
            todo.append(((self.book.period, entity[0], entity[1], metric, pct), used, limit))
        daily = self.daily_alert(entity)
        if daily is not None and self.daily.get(entity) >= daily:
            todo.append(((self.daily.day, entity[0], entity[1], "daily_usd", 100), self.daily.get(entity), daily))
        todo = [t for t in todo if not self.alerts.claimed(t[0])]
        if not todo:
            return
        team_id, named = self.team_of(entity), describe(entity)

        async def send() -> None:
            for key, used, limit in todo:
                try:
                    await self.alerts.raise_alert(key, team_id, used, limit, **named)
                except Exception as err:
                    log.warning("budget_alert_claim_failed", error=str(err)[:200])

        task = asyncio.create_task(send())
        self._alert_tasks.add(task)
        task.add_done_callback(self._alert_tasks.discard)

    async def tick(self) -> None:
        """Month rollover on billing's clock, throttled usage updates (near a limit) and acknowledgements
        (every gated entity), expiry announcements."""
        now = self.clock()
        if period_of(now) > self.book.period:
            await self.rollover(period_of(now))
        if now.date().isoformat() > self.daily.day:
            self.daily = DailySpend(now.date().isoformat())  # a new UTC day: nothing spent in it yet
        mono = time.monotonic()
        near_s = self.settings.quota_update_interval_ms / 1000
        ack_s = self.settings.quota_ack_interval_ms / 1000
        for entity in list(self.dirty | self.counted.keys()):
            if self.state_of(entity)[0] == "exhausted":
                self.dirty.discard(entity)
                continue  # the proxies refuse it anyway; its ids are acknowledged once it is restored
            if mono - self.last_update.get(entity, 0.0) < (near_s if entity in self.dirty else ack_s):
                continue
            self.dirty.discard(entity)
            self.last_update[entity] = mono
            ids = self.counted.pop(entity, [])
            for i in range(0, max(len(ids), 1), ACK_CHUNK):
                await self.publisher.publish(self._signal(entity, "ok", counted=ids[i : i + ACK_CHUNK]))
            metrics.QUOTA_SIGNALS.labels(kind="usage").inc()
        for key in self.accounts.keys():
            if key.expires_at is not None and key.expires_at <= now and key.key_id not in self.expiry_announced:
                self.expiry_announced.add(key.key_id)
                await self.publisher.publish(key.model_copy(update={"expired": True}))
                log.info("key_expired", key_id=key.key_id, team_id=key.team_id)

    async def rollover(self, period: str) -> None:
        """A new month on billing's clock: totals restart from the new month's ledger and every exhausted
        entity is restored."""
        if period <= self.book.period:
            return
        old = [e for e, s in self.states.items() if s.state == "exhausted"]
        log.info("quota_period_rollover", old=self.book.period, new=period, restored=len(old))
        async with self._book_lock:
            self.book = QuotaBook(period)
        self.states.clear()
        self.overshoot.clear()
        self.counted.clear()
        self.dirty.clear()
        for entity in old:
            sig = self._signal(entity, "ok", "new_period")
            self.states[entity] = sig
            await self.publisher.publish(sig)
            metrics.QUOTA_SIGNALS.labels(kind="restored").inc()
        await self.alerts.load(period)
        early, self.early = self.early, []
        await self.ingest_events(early)
        self._converge_due.set()

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        mono = time.monotonic()
        if mono - self._last_commit < 1.0:
            return
        self._last_commit = mono
        old_ms = (time.time() - self.settings.quota_commit_delay_s) * 1000
        offsets: dict[TopicPartition, int] = {}
        for tp, q in self._uncommitted.items():
            last = None
            while q and q[0][0] <= old_ms:
                last = q.popleft()[1]
            if last is not None:
                offsets[tp] = last + 1
        if offsets:
            try:
                await consumer.commit(offsets)
            except (KafkaError, AssertionError) as err:
                log.warning("quota_commit_failed", error=str(err)[:200])

    async def on_account_change(self, entity: Entity) -> None:
        """A changed plan or limit can exhaust or restore an entity right away."""
        if entity[0] == "team" and self.daily_alert(entity) is not None and entity not in self.daily.usd:
            self._converge_due.set()  # a daily threshold just set: today's spend so far, from the ledger
        await self.evaluate(entity)
        self._spawn_alerts(entity)

    async def on_budget_change(self, budget: Budget) -> None:
        """A budget was set or deleted: judge its entities on what is counted now (a deleted one is restored);
        a new one's month-to-date (and day's spend) comes from the ledger, at a convergence started right away."""
        entity = budget.entity()
        if entity is not None:
            entities = [entity]
        else:  # a team default: every end user of the team billing is counting
            entities = [e for e in self.book.usage if e[0] == "end_user" and team_of(e[1]) == budget.team_id]
        for e in entities:
            await self.on_account_change(e)
        self._converge_due.set()

    def key_state(self, key: KeyState) -> KeyState:
        return key.model_copy(update={"expired": True}) if key.key_id in self.expiry_announced else key
