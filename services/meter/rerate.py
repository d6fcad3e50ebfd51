"""Pricing after the fact, never by mutation.

* `price_held`: events stored unpriced (no price in force when metered) get a priced copy written once a
  price exists; the priced copy's row_version beats the unpriced one, so FINAL shows the priced row.
* `rerate_period`: when the catalog changed for a past period, write signed adjustment rows (delta =
  catalog cost - effective cost) that name the event, the price version they correct and the one they apply.
  A second run finds nothing to correct: it is idempotent.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import structlog

from schemas.billed import billed_model
from schemas.clickhouse import Store
from schemas.events import UsageEvent
from schemas.periods import bounds, checked_period
from schemas.prices import DIMENSIONS, PriceBook, price
from schemas.usage_row import EVENT
from services.meter import metrics
from services.meter.reference import priced_row
from services.meter.row import COLUMNS, row_version

log = structlog.get_logger("tollway.meter.rerate")

# The dimensions in their column order (the adjustment's unit_<d> and delta_<d>, the event's cost_<d>).
_UNIT_DIMS = ("input", "output", "cached_input", "cache_write", "cache_write_1h", "request", "web_search")
_DELTA_DIMS = ("input", "cached_input", "output", "cache_write", "cache_write_1h", "request", "web_search")
assert set(_UNIT_DIMS) == set(_DELTA_DIMS) == set(DIMENSIONS)
ADJ_COLUMNS = (
    "adjustment_id", "event_id", "seq", "occurred_at", "team_id", "key_id", "model", "provider",
    "corrects_price_version", "price_version", "price_tier", *(f"unit_{d}" for d in _UNIT_DIMS),
    *(f"delta_{d}" for d in _DELTA_DIMS), "delta_total", "reason", "run_id", "created_at",
)  # fmt: skip
_EVENT_FIELDS = set(UsageEvent.model_fields)
_NONE_STORED = {f.name: f.stored_none for f in EVENT if f.stored_none is not None}  # stored "" means None


def _event(row: dict[str, Any]) -> UsageEvent:
    fields = {k: v for k, v in row.items() if k in _EVENT_FIELDS}
    fields["event_id"] = str(fields["event_id"])
    for name, stored in _NONE_STORED.items():
        if fields.get(name) == stored:
            fields[name] = None
    fields["occurred_at"] = _utc(fields["occurred_at"])
    return UsageEvent.model_validate(fields)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


async def price_held(store: Store, book: PriceBook, limit: int = 50_000) -> tuple[int, int]:
    """Price stored-unpriced events that now have a price. Returns (priced now, still held)."""
    rows = await store.query_dicts(
        "SELECT * FROM {db}.usage_events FINAL WHERE NOT priced "
        "AND event_id IN (SELECT event_id FROM {db}.usage_events WHERE NOT priced) LIMIT {n:UInt64}",
        {"n": limit},
    )
    priced: list[tuple] = []
    now = datetime.now(UTC)
    version = row_version(True, int(now.timestamp() * 1000))
    held = 0
    for row in rows:
        e = _event(row)
        p = price(e, book)
        if p.unit is None:
            held += 1
            continue
        priced.append(priced_row(e, p, row["kafka_partition"], row["kafka_offset"], now, version))
    if priced:
        await store.insert_rows("usage_events", priced, COLUMNS)
        metrics.REPRICED.inc(len(priced))
        log.info("held_events_priced", rows=len(priced), still_held=held)
    metrics.UNPRICED_HELD.set(held)
    return len(priced), held


# The event's counts and stored costs, and the sum of its adjustments per dimension (a.d_<dim>).
_COUNTS = ("status", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
           "cache_write_1h_tokens", "web_search_requests", "service_tier")  # fmt: skip
_RERATE_SQL = f"""
SELECT e.event_id AS event_id, e.occurred_at AS occurred_at, e.team_id AS team_id, e.key_id AS key_id,
       e.requested_model AS requested_model, e.served_model AS served_model, e.provider AS provider,
       {", ".join(f"e.{c} AS {c}" for c in _COUNTS)}, e.price_version AS price_version,
       {", ".join(f"e.cost_{d} AS cost_{d}" for d in _DELTA_DIMS)},
       a.n AS n, a.v AS a_version, {", ".join(f"a.d_{d} AS d_{d}" for d in _DELTA_DIMS)}
FROM (
    SELECT * FROM {{db}}.usage_events FINAL
    WHERE occurred_at >= {{start:DateTime64(3, 'UTC')}} AND occurred_at < {{end:DateTime64(3, 'UTC')}} AND priced
) AS e
LEFT JOIN (
    SELECT event_id, count() AS n, argMax(price_version, seq) AS v,
           {", ".join(f"sum(delta_{d}) AS d_{d}" for d in _DELTA_DIMS)}
    FROM {{db}}.usage_adjustments FINAL
    WHERE occurred_at >= {{start:DateTime64(3, 'UTC')}} AND occurred_at < {{end:DateTime64(3, 'UTC')}}
    GROUP BY event_id
) AS a ON e.event_id = a.event_id
"""


@dataclass
class RerateResult:
    period: str
    run_id: str
    examined: int = 0
    adjusted: int = 0
    held_priced: int = 0
    still_held: int = 0
    delta_total: Decimal = Decimal(0)
    by_version: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"period": self.period, "run_id": self.run_id, "examined": self.examined, "adjusted": self.adjusted,
                "held_priced": self.held_priced, "still_held": self.still_held,
                "delta_total_usd": format(self.delta_total.normalize(), "f") if self.delta_total else "0",
                "adjustments_by_price_version": self.by_version}  # fmt: skip


async def rerate_period(store: Store, book: PriceBook, period: str) -> RerateResult:
    start, end = bounds(checked_period(period))
    result = RerateResult(period=period, run_id=str(uuid.uuid4()))
    result.held_priced, result.still_held = await price_held(store, book)
    rows = await store.query_dicts(_RERATE_SQL, {"start": start, "end": end})
    now = datetime.now(UTC)
    out: list[list[Any]] = []
    for r in rows:
        r["occurred_at"] = _utc(r["occurred_at"])
        result.examined += 1
        adjusted = r["n"] > 0
        version = r["a_version"] if adjusted else r["price_version"]
        cur = tuple(r[f"cost_{d}"] + (r[f"d_{d}"] if adjusted else 0) for d in _DELTA_DIMS)
        ev = UsageEvent.model_construct(**{k: r[k] for k in ("occurred_at", "requested_model", "served_model",
                                                             "provider", *_COUNTS)})  # fmt: skip
        p = price(ev, book)
        if p.unit is None:
            continue  # the price was removed from the catalog: leave the billed amount alone
        new_units = tuple(p.unit.of(d) for d in _UNIT_DIMS)
        new_cost = tuple(getattr(p.cost, d) for d in _DELTA_DIMS)
        if new_cost == cur:
            continue  # no money moves (same price, or nothing billable at either price): nothing to correct
        seq = int(r["n"]) + 1
        d = [n - c for n, c in zip(new_cost, cur, strict=True)]
        # Named by everything the row says: the event, its place in the event's chain (seq: a price that goes
        # A -> B -> A -> B writes three rows, not one), the version it moves from and the one it moves to with
        # the money moved. A re-run from the same state writes the same id (collapsed: idempotent); two rows can
        # share an id only if they are the same correction, so a collapse can never drop a different one.
        # (The first three unit prices and deltas alone for an older price's adjustment: its id is unchanged.)
        u = p.unit
        older = not u.tier and u.cache_write == u.cache_write_1h == u.input and not u.request and not u.web_search
        named = (*new_units[:3], *d[:3]) if older and not any(d[3:]) else (*new_units, *d)
        ident = "|".join([str(r["event_id"]), str(seq), version, p.unit.version,
                          *(format(x.normalize(), "f") for x in named)])  # fmt: skip
        model = billed_model(r["served_model"], r["requested_model"])
        out.append([hashlib.sha256(ident.encode()).hexdigest(), r["event_id"], seq, r["occurred_at"], r["team_id"],
                    r["key_id"], model, r["provider"], version, p.unit.version, p.unit.tier, *new_units, *d, sum(d),
                    f"rerate {period}", result.run_id, now])  # fmt: skip
        result.adjusted += 1
        result.delta_total += sum(d)
        result.by_version[p.unit.version] = result.by_version.get(p.unit.version, 0) + 1
    for i in range(0, len(out), 20_000):
        await store.insert_rows("usage_adjustments", out[i : i + 20_000], ADJ_COLUMNS)
    log.info("rerate_done", **{k: v for k, v in result.as_dict().items() if k != "adjustments_by_price_version"})
    return result
