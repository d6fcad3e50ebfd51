"""Monthly invoices per team: live drafts, immutable finalized invoices, adjustments for closed periods.

Rounding rule (stated once, applied everywhere): every line amount is computed exactly in Decimal from
its quantity and unit price, then rounded ONCE to whole cents with ROUND_HALF_EVEN; subtotal, adjustments
and total are plain sums of rounded lines, so the lines always add up to the total exactly.

A usage line is one (model, price version, component) of a period: component `input` (uncached prompt
tokens), `cached_input` or `output`; amount = round(tokens * unit price per 1M / 1M). Quantities come from
`usage_events FINAL` (billable rows: status ok or error, priced), with re-rated events taking the price
version of their latest `usage_adjustments` row, so every line can be recomputed from stored rows.

An adjustment line brings a finalized period up to date (late events, re-rating): for each item of that
period, amount = round(current total quantity * unit price) - everything already billed for that item.
It names the invoice, period, model, price version and component it adjusts, and lands on the first
period after it that is not finalized. A finalized invoice is stored once, with a content hash.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import orjson
import structlog

from schemas.clickhouse import Store
from schemas.config import GatewayConfig
from schemas.control import TeamState
from schemas.keys import new_id
from schemas.prices import MILLION
from services.billing import ledger, metrics
from services.billing.errors import Conflict, InvalidRequest, NotFound
from services.billing.periods import bounds, iso, next_period, period_of

log = structlog.get_logger("tollway.billing.invoices")

CENT = Decimal("0.01")
ROUNDING_RULE = "each line: exact Decimal amount rounded once to 0.01 USD (ROUND_HALF_EVEN); totals = sums of lines"
COMPONENTS = ("input", "cached_input", "output")
ItemKey = tuple[str, str, str]  # model, price_version, component


def round_line(exact: Decimal) -> Decimal:
    return exact.quantize(CENT, rounding=ROUND_HALF_EVEN)


def usd(value: Decimal) -> str:
    return str(value.quantize(CENT, rounding=ROUND_HALF_EVEN))


def plain(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """Billable usage of one model at one price version in a period (sums over stored rows)."""

    model: str
    price_version: str
    unit_input: Decimal
    unit_output: Decimal
    unit_cached_input: Decimal
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int

    def components(self) -> list[tuple[str, int, Decimal]]:
        return [("input", self.input_tokens, self.unit_input), ("cached_input", self.cached_tokens,
                self.unit_cached_input), ("output", self.output_tokens, self.unit_output)]  # fmt: skip


def items_of(groups: list[UsageGroup]) -> dict[ItemKey, tuple[int, Decimal, int]]:
    """(model, version, component) -> (quantity, unit price per 1M, requests)."""
    out: dict[ItemKey, tuple[int, Decimal, int]] = {}
    for g in groups:
        for comp, qty, unit in g.components():
            out[(g.model, g.price_version, comp)] = (qty, unit, g.requests)
    return out


def usage_lines(groups: list[UsageGroup]) -> list[dict[str, Any]]:
    lines = []
    for (model, version, comp), (qty, unit, requests) in sorted(items_of(groups).items()):
        if qty == 0:
            continue
        exact = Decimal(qty) * unit / MILLION
        lines.append({
            "type": "usage", "model": model, "price_version": version, "component": comp,
            "description": f"{model} {comp.replace('_', ' ')} tokens", "requests": requests,
            "quantity": qty, "unit": "tokens", "unit_price_usd_per_1m": plain(unit),
            "exact_amount_usd": plain(exact), "amount_usd": usd(round_line(exact)),
        })  # fmt: skip
    return lines


def billed_items(period: str, finalized: dict[str, dict[str, Any]]) -> dict[ItemKey, tuple[int, Decimal]]:
    """What finalized invoices have billed so far for a period's items: its own usage lines plus every
    adjustment line (on any later invoice) that adjusts it. (quantity, amount)."""
    out: dict[ItemKey, tuple[int, Decimal]] = {}

    def add(key: ItemKey, qty: int, amount: Decimal) -> None:
        q, a = out.get(key, (0, Decimal(0)))
        out[key] = (q + qty, a + amount)

    own = finalized.get(period)
    if own is not None:
        for line in own["lines"]:
            if line["type"] == "usage":
                add((line["model"], line["price_version"], line["component"]), line["quantity"],
                    Decimal(line["amount_usd"]))  # fmt: skip
    for inv in finalized.values():
        for line in inv["lines"]:
            if line["type"] == "adjustment" and line["adjusts"]["period"] == period:
                a = line["adjusts"]
                add((a["model"], a["price_version"], a["component"]), line["quantity"], Decimal(line["amount_usd"]))
    return out


def adjustment_lines(period: str, invoice: dict[str, Any], truth: list[UsageGroup],
                     billed: dict[ItemKey, tuple[int, Decimal]]) -> list[dict[str, Any]]:  # fmt: skip
    """Lines that bring finalized `period` (invoice `invoice`) up to the truth now in storage."""
    now = items_of(truth)
    lines = []
    for key in sorted(set(now) | set(billed)):
        qty, unit, _ = now.get(key, (0, Decimal(0), 0))
        if key not in now:  # the item vanished (every event re-rated away): use the unit it was billed at
            unit = next((Decimal(line["unit_price_usd_per_1m"]) for line in invoice["lines"]
                         if line["type"] == "usage" and (line["model"], line["price_version"], line["component"]) == key),
                        Decimal(0))  # fmt: skip
        target = round_line(Decimal(qty) * unit / MILLION)
        b_qty, b_amount = billed.get(key, (0, Decimal(0)))
        if qty == b_qty and target == b_amount:
            continue
        model, version, comp = key
        if qty > b_qty and key in billed:
            reason = "late usage"
        elif qty != b_qty:
            reason = "re-rating"  # usage moved between price versions (or a new version appeared)
        else:
            reason = "rounding correction"
        lines.append({
            "type": "adjustment", "reason": reason,
            "description": f"{reason}: invoice {invoice['number']} ({period}) {model} {comp.replace('_', ' ')} "
                           f"tokens at {version}",
            "adjusts": {"invoice_id": invoice["invoice_id"], "invoice_number": invoice["number"], "period": period,
                        "model": model, "price_version": version, "component": comp},
            "quantity": qty - b_qty, "unit": "tokens", "unit_price_usd_per_1m": plain(unit),
            "amount_usd": usd(target - b_amount),
        })  # fmt: skip
    return lines


def assemble(team: TeamState, period: str, plan_fee: Decimal, usage: list[dict[str, Any]],
             adjustments: list[dict[str, Any]], unpriced: int, now: datetime) -> dict[str, Any]:  # fmt: skip
    lines = list(usage)
    if plan_fee > 0:
        lines.append({"type": "plan_fee", "description": f"plan {team.plan}: monthly fee", "quantity": 1,
                      "unit": "month", "unit_price_usd": usd(plan_fee), "amount_usd": usd(round_line(plan_fee))})  # fmt: skip
    lines += adjustments
    for i, line in enumerate(lines, start=1):
        line["line"] = i
    usage_total = sum((Decimal(x["amount_usd"]) for x in lines if x["type"] == "usage"), Decimal(0))
    fee_total = sum((Decimal(x["amount_usd"]) for x in lines if x["type"] == "plan_fee"), Decimal(0))
    adj_total = sum((Decimal(x["amount_usd"]) for x in lines if x["type"] == "adjustment"), Decimal(0))
    start, end = bounds(period)
    return {
        "object": "invoice", "invoice_id": f"draft_{team.team_id}_{period}", "number": None, "status": "draft",
        "team_id": team.team_id, "team_name": team.name, "plan": team.plan, "period": period,
        "period_start": iso(start), "period_end": iso(end), "currency": "USD", "lines": lines,
        "usage_usd": usd(usage_total), "plan_fee_usd": usd(fee_total), "subtotal_usd": usd(usage_total + fee_total),
        "adjustments_usd": usd(adj_total), "total_usd": usd(usage_total + fee_total + adj_total),
        "rounding": ROUNDING_RULE, "unpriced_events": unpriced, "generated_at": iso(now),
        "finalized_at": None, "content_hash": None,
    }  # fmt: skip


def content_hash(invoice: dict[str, Any]) -> str:
    """sha256 over the canonical JSON (sorted keys) of everything but the hash itself."""
    body = {k: v for k, v in invoice.items() if k != "content_hash"}
    return "sha256:" + hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


CSV_COLUMNS = ("invoice_id", "number", "status", "team_id", "period", "currency", "line", "type", "model",
               "price_version", "component", "description", "quantity", "unit", "unit_price_usd_per_1m",
               "amount_usd", "adjusts_invoice", "adjusts_period")  # fmt: skip


def to_csv(invoices: list[dict[str, Any]]) -> str:
    """One row per line, then subtotal/adjustments/total rows per invoice (type names the row)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for inv in invoices:
        head = [inv["invoice_id"], inv["number"] or "", inv["status"], inv["team_id"], inv["period"], inv["currency"]]
        for line in inv["lines"]:
            adj = line.get("adjusts") or {}
            w.writerow([*head, line["line"], line["type"], line.get("model", ""), line.get("price_version", ""),
                        line.get("component", ""), line["description"], line["quantity"], line["unit"],
                        line.get("unit_price_usd_per_1m", line.get("unit_price_usd", "")), line["amount_usd"],
                        adj.get("invoice_number", ""), adj.get("period", "")])  # fmt: skip
        for kind in ("subtotal", "adjustments", "total"):
            w.writerow([*head, "", kind, "", "", "", kind, "", "", "", inv[f"{kind}_usd"], "", ""])
    return buf.getvalue()


# -- storage ---------------------------------------------------------------------------------------------


class Invoices:
    def __init__(self, store: Store, config: GatewayConfig) -> None:
        self.store = store
        self.config = config
        self._lock = asyncio.Lock()

    async def usage_groups(self, team_id: str, period: str) -> tuple[list[UsageGroup], int]:
        """The period's billable usage as the ledger defines it (events FINAL + adjustments FINAL)."""
        tm = await ledger.team_month(self.store, team_id, period)
        groups = [UsageGroup(g.model, g.price_version, g.unit_input, g.unit_output, g.unit_cached_input, g.requests,
                             g.input_tokens, g.cached_tokens, g.output_tokens) for g in tm.groups]  # fmt: skip
        return groups, tm.unpriced

    async def finalized(self, team_id: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        where, params = ("WHERE team_id = {team:String}", {"team": team_id}) if team_id else ("", {})
        rows = await self.store.query(f"SELECT team_id, period, content FROM {{db}}.invoices FINAL {where}",
                                      parameters=params)  # fmt: skip
        return {(r[0], r[1]): orjson.loads(r[2]) for r in rows}

    async def by_id(self, invoice_id: str) -> dict[str, Any] | None:
        rows = await self.store.query("SELECT content FROM {db}.invoices FINAL WHERE invoice_id = {i:String}",
                                      parameters={"i": invoice_id})  # fmt: skip
        return orjson.loads(rows[0][0]) if rows else None

    async def draft(self, team: TeamState, period: str, now: datetime | None = None) -> dict[str, Any]:
        """The invoice as it stands: usage, plan fee, and adjustments for earlier finalized periods."""
        now = now or datetime.now(UTC)
        fin = {p: inv for (_, p), inv in (await self.finalized(team.team_id)).items()}
        groups, unpriced = await self.usage_groups(team.team_id, period)
        adjustments: list[dict[str, Any]] = []
        for closed in sorted(p for p in fin if p < period):
            target = next_period(closed)
            while target in fin:
                target = next_period(target)
            if target != period:
                continue
            truth, _ = await self.usage_groups(team.team_id, closed)
            adjustments += adjustment_lines(closed, fin[closed], truth, billed_items(closed, fin))
        plan = self.config.plans.get(team.plan or self.config.default_plan)
        fee = plan.fee_usd_per_month if plan is not None else Decimal(0)
        return assemble(team, period, fee, usage_lines(groups), adjustments, unpriced, now)

    async def get(self, team: TeamState, period: str) -> dict[str, Any]:
        """The finalized invoice of a period if there is one, else the live draft."""
        found = (await self.finalized(team.team_id)).get((team.team_id, period))
        return found if found is not None else await self.draft(team, period)

    async def finalize(self, team: TeamState, period: str) -> tuple[dict[str, Any], bool]:
        """(invoice, created). Finalizing twice returns the stored invoice unchanged."""
        now = datetime.now(UTC)
        if period > period_of(now):
            raise InvalidRequest(f"period: {period} has not started yet")
        async with self._lock:
            existing = (await self.finalized(team.team_id)).get((team.team_id, period))
            if existing is not None:
                return existing, False
            later = [p for (_, p) in await self.finalized(team.team_id) if p > period]
            if later:
                raise Conflict(f"period {period} cannot be finalized after a later one ({min(later)})")
            inv = await self.draft(team, period, now)
            rows = await self.store.query("SELECT max(seq) FROM {db}.invoices")
            seq = int(rows[0][0] or 0) + 1
            inv.update(invoice_id=new_id("inv"), number=f"TW-{seq:06d}", status="finalized", finalized_at=iso(now))
            inv["content_hash"] = content_hash(inv)
            await self.store.insert_rows(
                "invoices",
                [
                    [
                        inv["invoice_id"],
                        inv["number"],
                        seq,
                        team.team_id,
                        period,
                        Decimal(inv["total_usd"]),
                        orjson.dumps(inv).decode(),
                        inv["content_hash"],
                        now,
                    ]
                ],
                (
                    "invoice_id",
                    "number",
                    "seq",
                    "team_id",
                    "period",
                    "total_usd",
                    "content",
                    "content_hash",
                    "finalized_at",
                ),
            )
        metrics.INVOICES_FINALIZED.inc()
        log.info("invoice_finalized", team_id=team.team_id, period=period, number=inv["number"],
                 total_usd=inv["total_usd"])  # fmt: skip
        return inv, True


def not_found(invoice_id: str) -> NotFound:
    return NotFound(f"no invoice with id {invoice_id!r}")
