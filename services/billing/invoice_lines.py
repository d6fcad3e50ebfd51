"""Invoice lines, pure: usage, plan fee and adjustment lines, the document around them, its hash and CSV.

Rounding rule (stated once, applied everywhere): every line amount is computed exactly in Decimal from its
quantity and unit price, then rounded ONCE to whole cents with ROUND_HALF_EVEN; subtotal, adjustments and
total are plain sums of rounded lines, so the lines always add up to the total exactly.

Items. A usage line is one item of a period: (model, price version, component, unit price). The unit
price is part of the key, so an in-place price edit under one version string gives two lines, never one.
Components are the ledger's (input, cached input, cache write 5m, cache write 1h, output, requests, web
search); a line exists only where its quantity is not zero. amount = round(quantity x unit / PER), PER being
1M for tokens (`unit_price_usd_per_1m`), 1 for requests (`unit_price_usd_per_request`), 1,000 for web searches
(`unit_price_usd_per_1k`); `price_basis` names it.

Plan fee. The fee runs from the team's creation (nothing before it) and follows its plan history: one line
per span of one plan, amount = round(monthly fee x seconds of the span / seconds of the month), exact
Decimal before that one rounding; spans are bounded to the whole second. `quantity` keeps its meaning of
months (1 for a whole month, as before proration existed; else the span's fraction of the month to 6 places,
for reading); the exact basis is `seconds` of `month_seconds`.

Adjustments. Once a period is closed (finalized, or older than a finalized one), later changes to it are
billed on the next open invoice. Per item, with B = everything billed so far for it (its usage line and
earlier adjustment lines), T = its quantity now and K = its quantity counting only events ingested before
the period was last billed (the latest finalization at or after it):
  * "late usage": quantity T - K (events that arrived after that), amount round((T - K) x unit);
  * "re-rating": quantity K - B (events already billed that a price change / rerate moved between items),
    amount round((K - B) x unit);
  * "rounding": quantity 0, the cent(s) that keep the item's cumulative amount equal to round(T x unit),
    i.e. round(T x unit) - billed - late - re-rating; every item is thus rounded once over its whole life.
Each names what it adjusts (`adjusts`: invoice_id, invoice_number, period, model, price_version, component;
invoice_id/number are null for a period that was never finalized because a later one closed it).

Kind. A document whose total is negative is a credit note (`kind` "credit_note", `credit_usd` the amount
credited, `credits` the invoices its adjustment lines credit, with their sums), never a negative invoice.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import defaultdict
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import orjson

from schemas.clock import iso
from schemas.money import cents, plain, usd
from schemas.periods import bounds
from schemas.prices import PER
from services.billing.ledger import COMPONENTS, LedgerLine
from services.billing.plan_history import PlanSpan

ZERO = Decimal(0)
ROUNDING_RULE = "each line: exact Decimal amount rounded once to 0.01 USD (ROUND_HALF_EVEN); totals = sums of lines"
ItemKey = tuple[str, str, str, Decimal]  # model, price_version, component, unit price per 1M
Items = dict[ItemKey, tuple[int, int]]  # -> (quantity, requests)
Billed = dict[ItemKey, tuple[int, Decimal]]  # -> (quantity, amount)
NUMBER_PREFIX = {"invoice": "TW", "credit_note": "CN"}


# Per-call fees a price may not have: without one (unit 0) they are no item, so an invoice has no line of them.
_FEES = frozenset({"request", "web_search"})


def items_of(lines: list[LedgerLine]) -> Items:
    out: dict[ItemKey, tuple[int, int]] = {}
    for line in lines:
        if line.component in _FEES and not line.unit_usd_per_1m:
            continue
        key = (line.model, line.price_version, line.component, line.unit_usd_per_1m)
        qty, requests = out.get(key, (0, 0))
        out[key] = (qty + line.quantity, requests + line.requests)
    return out


# Per component (the ledger's COMPONENTS): what a line says it counts, the field its unit price is in, and the
# basis of that price. The token components keep the fields they always had.
_TOKENS = ("tokens", "unit_price_usd_per_1m", "1M tokens")
SHAPE: dict[str, tuple[str, str, str, str]] = {  # component -> (described as, unit, price field, price basis)
    "input": ("input tokens", *_TOKENS), "cached_input": ("cached input tokens", *_TOKENS),
    "cache_write": ("cache write 5m tokens", *_TOKENS), "cache_write_1h": ("cache write 1h tokens", *_TOKENS),
    "output": ("output tokens", *_TOKENS),
    "request": ("requests", "requests", "unit_price_usd_per_request", "request"),
    "web_search": ("web searches", "web searches", "unit_price_usd_per_1k", "1K web searches"),
}  # fmt: skip
assert set(SHAPE) == set(COMPONENTS)


def _exact(qty: int, unit: Decimal, comp: str) -> Decimal:
    return Decimal(qty) * unit / PER[comp]


def exact_amount(qty: int, key: ItemKey) -> Decimal:
    """The exact amount of `qty` units of an item (its price's basis: per 1M tokens, per request, per 1K)."""
    return _exact(qty, key[3], key[2])


def item_key(line: dict[str, Any]) -> ItemKey:
    """The item a usage line bills (its own fields; an adjustment's item is `_key_of(line, line["adjusts"])`)."""
    return _key_of(line, line)


def _priced_as(comp: str, unit: Decimal) -> dict[str, Any]:
    _, counted, price_field, basis = SHAPE[comp]
    return {"unit": counted, price_field: plain(unit), "price_basis": basis}


def usage_lines(items: Items) -> list[dict[str, Any]]:
    """One line per (model, price version, component, unit price) with a non-zero quantity."""
    lines = []
    for (model, version, comp, unit), (qty, requests) in sorted(items.items()):
        if qty == 0:
            continue
        exact = _exact(qty, unit, comp)
        lines.append({
            "type": "usage", "model": model, "price_version": version, "component": comp,
            "description": f"{model} {SHAPE[comp][0]}", "requests": requests, "quantity": qty,
            **_priced_as(comp, unit), "exact_amount_usd": plain(exact), "amount_usd": usd(cents(exact)),
        })  # fmt: skip
    return lines


def month_fraction(seconds: int, month: int) -> Decimal:
    """A span's share of its month, for display only: amounts are computed from the seconds."""
    return (Decimal(seconds) / month).quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)


def plan_fee_lines(period: str, spans: list[PlanSpan], fees: dict[str, Decimal]) -> list[dict[str, Any]]:
    start, end = bounds(period)
    month = int((end - start).total_seconds())
    lines = []
    for s in spans:
        fee = fees.get(s.plan, ZERO)
        if fee == 0:
            continue
        # Decimal's 28 digits round this quotient to cents exactly: a fraction over <= 31 days of seconds is
        # either on a half cent or at least 1e-9 away from one.
        exact = fee * s.seconds / month
        whole = s.seconds == month
        lines.append({
            "type": "plan_fee", "plan": s.plan,
            "description": f"plan {s.plan}: monthly fee" + ("" if whole else f", {iso(s.start)} to {iso(s.end)}"),
            "from": iso(s.start), "to": iso(s.end), "quantity": 1 if whole else plain(month_fraction(s.seconds, month)),
            "unit": "month", "seconds": s.seconds, "month_seconds": month,
            "unit_price_usd": usd(fee), "exact_amount_usd": plain(exact), "amount_usd": usd(cents(exact)),
        })  # fmt: skip
    return lines


def _key_of(line: dict[str, Any], source: dict[str, Any]) -> ItemKey:
    comp = source["component"]
    return (source["model"], source["price_version"], comp, Decimal(line[SHAPE[comp][2]]))


def billed_items(period: str, finalized: dict[str, dict[str, Any]]) -> Billed:
    """What finalized documents have billed so far for a period's items: its own usage lines plus every
    adjustment line (on any later document) that adjusts it."""
    out: dict[ItemKey, tuple[int, Decimal]] = {}

    def add(key: ItemKey, qty: int, amount: Decimal) -> None:
        q, a = out.get(key, (0, ZERO))
        out[key] = (q + qty, a + amount)

    own = finalized.get(period)
    for line in own["lines"] if own is not None else []:
        if line["type"] == "usage":
            add(_key_of(line, line), line["quantity"], Decimal(line["amount_usd"]))
    for doc in finalized.values():
        for line in doc["lines"]:
            if line["type"] == "adjustment" and line["adjusts"]["period"] == period:
                add(_key_of(line, line["adjusts"]), line["quantity"], Decimal(line["amount_usd"]))
    return out


def adjustment_lines(period: str, invoice: dict[str, Any] | None, now: Items, known: Items,
                     billed: Billed) -> list[dict[str, Any]]:  # fmt: skip
    """Lines that bring closed `period` (its invoice, or None if it never had one) up to `now`."""
    lines = []
    for key in sorted(set(now) | set(known) | set(billed)):
        model, version, comp, unit = key
        t, k = now.get(key, (0, 0))[0], known.get(key, (0, 0))[0]
        b_qty, b_amount = billed.get(key, (0, ZERO))
        late, rerate = t - k, k - b_qty
        late_usd = cents(_exact(late, unit, comp))
        rerate_usd = cents(_exact(rerate, unit, comp))
        rounding_usd = cents(_exact(t, unit, comp)) - b_amount - late_usd - rerate_usd
        for reason, qty, amount in (("late usage", late, late_usd), ("re-rating", rerate, rerate_usd),
                                    ("rounding", 0, rounding_usd)):  # fmt: skip
            if qty == 0 and amount == 0:
                continue
            number = invoice["number"] if invoice is not None else None
            lines.append({
                "type": "adjustment", "reason": reason,
                "description": f"{reason}: {period}" + (f" invoice {number}" if number else "")
                               + f" {model} {SHAPE[comp][0]} at {version} ({plain(unit)}/{_per_text(comp)})",
                "adjusts": {"invoice_id": invoice["invoice_id"] if invoice is not None else None,
                            "invoice_number": number, "period": period, "model": model, "price_version": version,
                            "component": comp},
                "quantity": qty, **_priced_as(comp, unit), "amount_usd": usd(amount),
            })  # fmt: skip
    return lines


def _per_text(comp: str) -> str:
    """How an adjustment's description names the price basis ('1M' as it always did for tokens)."""
    return {"1M tokens": "1M", "request": "request", "1K web searches": "1K searches"}[SHAPE[comp][3]]


def _sum(lines: list[dict[str, Any]], kind: str) -> Decimal:
    return sum((Decimal(x["amount_usd"]) for x in lines if x["type"] == kind), ZERO)


def credits_of(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The invoices a document's adjustment lines credit (or charge), with the sum against each."""
    sums: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for line in lines:
        a = line.get("adjusts") or {}
        if line["type"] == "adjustment" and a.get("invoice_id"):
            sums[(a["period"], a["invoice_id"], a["invoice_number"])] += Decimal(line["amount_usd"])
    return [{"invoice_id": i, "invoice_number": n, "period": p, "amount_usd": usd(amount)}
            for (p, i, n), amount in sorted(sums.items())]  # fmt: skip


def assemble(team_id: str, team_name: str, plan: str | None, period: str, usage: list[dict[str, Any]],
             fees: list[dict[str, Any]], adjustments: list[dict[str, Any]], unpriced: int,
             now: datetime) -> dict[str, Any]:  # fmt: skip
    lines = [*usage, *fees, *adjustments]
    for i, line in enumerate(lines, start=1):
        line["line"] = i
    usage_total, fee_total, adj_total = _sum(lines, "usage"), _sum(lines, "plan_fee"), _sum(lines, "adjustment")
    total = usage_total + fee_total + adj_total
    kind = "credit_note" if total < 0 else "invoice"
    start, end = bounds(period)
    doc = {
        "object": kind, "kind": kind, "invoice_id": f"draft_{team_id}_{period}", "number": None, "status": "draft",
        "team_id": team_id, "team_name": team_name, "plan": plan, "period": period,
        "period_start": iso(start), "period_end": iso(end), "currency": "USD", "lines": lines,
        "usage_usd": usd(usage_total), "plan_fee_usd": usd(fee_total), "subtotal_usd": usd(usage_total + fee_total),
        "adjustments_usd": usd(adj_total), "total_usd": usd(total),
        "rounding": ROUNDING_RULE, "unpriced_events": unpriced, "generated_at": iso(now),
        "finalized_at": None, "content_hash": None,
    }  # fmt: skip
    if kind == "credit_note":
        doc["credit_usd"] = usd(-total)
        doc["credits"] = credits_of(lines)
    return doc


def content_hash(invoice: dict[str, Any]) -> str:
    """sha256 over the canonical JSON (sorted keys) of everything but the hash itself."""
    body = {k: v for k, v in invoice.items() if k != "content_hash"}
    return "sha256:" + hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


CSV_COLUMNS = ("invoice_id", "number", "status", "team_id", "period", "currency", "line", "type", "model",
               "price_version", "component", "description", "quantity", "unit", "unit_price_usd_per_1m",
               "amount_usd", "adjusts_invoice", "adjusts_period", "kind", "reason", "month_seconds",
               "price_basis")  # fmt: skip
# The CSV's one price column holds each line's price in its basis (`price_basis`): per 1M tokens, per request,
# per 1K web searches, or a plan fee's per month.
_PRICE_FIELDS = ("unit_price_usd_per_1m", "unit_price_usd_per_request", "unit_price_usd_per_1k", "unit_price_usd")


def to_csv(invoices: list[dict[str, Any]]) -> str:
    """One row per line; for a credit note one `credits` row per invoice it credits; then subtotal,
    adjustments and total rows per document (type names the row). The same lines as the JSON."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for inv in invoices:
        kind = inv.get("kind", "invoice")
        head = [inv["invoice_id"], inv["number"] or "", inv["status"], inv["team_id"], inv["period"], inv["currency"]]
        for line in inv["lines"]:
            adj = line.get("adjusts") or {}
            w.writerow([*head, line["line"], line["type"], line.get("model", ""),
                        line.get("price_version", ""), line.get("component", ""), line["description"],
                        line["quantity"], line["unit"],
                        next((line[f] for f in _PRICE_FIELDS if f in line), ""), line["amount_usd"],
                        adj.get("invoice_number") or "", adj.get("period", ""), kind, line.get("reason", ""),
                        line.get("month_seconds", ""), line.get("price_basis", "month" if line["type"] == "plan_fee"
                                                                 else "")])  # fmt: skip
        for c in inv.get("credits") or []:
            w.writerow([*head, "", "credits", "", "", "", f"credits invoice {c['invoice_number']}", "", "", "",
                        c["amount_usd"], c["invoice_number"], c["period"], kind, "", "", ""])  # fmt: skip
        for total in ("subtotal", "adjustments", "total"):
            w.writerow([*head, "", total, "", "", "", total, "", "", "", inv[f"{total}_usd"], "", "", kind, "", "", ""])
    return buf.getvalue()
