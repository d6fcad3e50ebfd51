"""Spend by who it was for: an end user or a tag's value (the usage event's `end_user` and `metadata`).

  * `dimension("end_user" | "tag:<name>")`: the label expression over the ledger's effective row `x`;
    calls without an end user, or without the tag, are one group labelled `(none)`;
  * `breakdown`: an invoice's usage amount split by a dimension so that it foots to the cent. Rounding:
    each usage line's rounded amount (the invoice's own, `invoice_lines`) is shared among the labels by
    largest remainder: every label gets its exact share floored to the cent, and the cents left (fewer than
    the number of labels) go one each to the largest remainders (ties: label order). So per line, and hence
    in total, the labels' amounts add up to the invoice exactly; a label's amount is within a cent per line
    of its exact share (`exact_usd`, unrounded, is shown beside it);
  * `chargeback_csv`: that breakdown as CSV with a TOTAL row equal to the invoice's `usage_usd`.
Only the period's usage lines are split: plan fees and adjustment lines of closed periods belong to the team.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from schemas.clickhouse import Store
from schemas.money import cents, plain, usd
from schemas.periods import bounds
from schemas.tags import MAX_END_USER_CHARS, MAX_VALUE_CHARS, NONE_LABEL, key_problem
from services.billing import ledger
from services.billing.errors import Conflict, InvalidRequest
from services.billing.invoice_lines import ItemKey, exact_amount, item_key, items_of

CENT = Decimal("0.01")
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Dimension:
    name: str  # "end_user" or "tag:<name>", as asked
    field: str  # the label's field in a report group
    sql: str  # over the effective row x; fixed text, inputs bound as `params`
    params: dict[str, object]


def dimension(value: str, what: str = "group_by") -> Dimension:
    if value == "end_user":
        return Dimension(value, "end_user", "if(x.end_user = '', {none_label:String}, x.end_user)",
                         {"none_label": NONE_LABEL})  # fmt: skip
    name = value.removeprefix("tag:")
    if not value.startswith("tag:") or key_problem(name) is not None:
        raise InvalidRequest(f"{what}: expected end_user or tag:<name> (a tag name is 1 to 64 characters of "
                             f"A-Za-z0-9_.:-), got {value[:80]!r}")  # fmt: skip
    sql = "if(mapContains(x.metadata, {tag:String}), x.metadata[{tag:String}], {none_label:String})"
    return Dimension(value, "tag_value", sql, {"tag": name, "none_label": NONE_LABEL})


@dataclass(frozen=True, slots=True)
class Filter:
    """Calls of one end user and/or one tag value, as a condition over the effective row x."""

    sql: str
    params: dict[str, object]
    shown: dict[str, str]


def filter_of(end_user: str | None, tag: str | None) -> Filter | None:
    """`end_user=<id>` (`(none)`: calls without one) and `tag=<name>=<value>`; None when neither is given."""
    parts, params, shown = [], {}, {}
    if end_user:
        parts.append("x.end_user = {f_end_user:String}")
        params["f_end_user"] = "" if end_user == NONE_LABEL else end_user[:MAX_END_USER_CHARS]
        shown["end_user"] = end_user[:MAX_END_USER_CHARS]
    if tag:
        name, eq, value = tag.partition("=")
        if not eq or key_problem(name) is not None:
            raise InvalidRequest(f"tag: expected <name>=<value> with a tag name of 1 to 64 characters of "
                                 f"A-Za-z0-9_.:-, got {tag[:80]!r}")  # fmt: skip
        if value == NONE_LABEL:
            parts.append("NOT mapContains(x.metadata, {f_tag:String})")
        else:
            parts.append("mapContains(x.metadata, {f_tag:String}) AND x.metadata[{f_tag:String}] = {f_value:String}")
            params["f_value"] = value[:MAX_VALUE_CHARS]
        params["f_tag"] = name
        shown["tag"] = f"{name}={value[:MAX_VALUE_CHARS]}"
    if not parts:
        return None
    return Filter("(" + " AND ".join(parts) + ")", params, shown)


def share(amount: Decimal, exact: dict[str, Decimal]) -> dict[str, Decimal]:
    """`amount` (whole cents, the rounded total of `exact`) split by largest remainder over the labels."""
    floors = {label: v.quantize(CENT, rounding=ROUND_FLOOR) for label, v in exact.items()}
    left = int((amount - sum(floors.values(), ZERO)) / CENT)
    order = sorted(exact, key=lambda label: (-(exact[label] - floors[label]), label))
    for label in order[:left]:
        floors[label] += CENT
    return floors


async def breakdown(store: Store, invoice: dict[str, Any], dim: Dimension) -> dict[str, Any]:
    """The invoice's usage lines split by `dim`, from the same ledger rows (events ingested by the invoice's
    `as_of`: its finalization, or the draft's generation time)."""
    start, end = bounds(invoice["period"])
    as_of = datetime.fromisoformat(invoice.get("finalized_at") or invoice["generated_at"])
    by_label = await ledger.groups_by_label(store, start, end, dim.sql, dim.params, invoice["team_id"], as_of)
    items = {label: items_of([line for g in gs for line in g.lines()]) for label, gs in by_label.items()}
    amounts = dict.fromkeys(items, ZERO)
    exact = dict.fromkeys(items, ZERO)
    requests = {label: sum(g.requests for g in gs) for label, gs in by_label.items()}
    for line in invoice["lines"]:
        if line["type"] != "usage":
            continue
        key: ItemKey = item_key(line)
        qty = {label: it[key][0] for label, it in items.items() if key in it}
        if sum(qty.values()) != line["quantity"]:  # cannot happen for one as_of; refuse rather than not foot
            raise Conflict(f"the ledger rows of invoice line {line['line']} changed while reading; retry")
        shares = {label: exact_amount(q, key) for label, q in qty.items()}
        for label, amount in share(Decimal(line["amount_usd"]), shares).items():
            amounts[label] += amount
            exact[label] += shares[label]
    rows = [{dim.field: label, "requests": requests[label], "exact_usd": plain(exact[label]),
             "amount_usd": usd(amounts[label])} for label in sorted(items)]  # fmt: skip
    return {"by": dim.name, "rows": rows, "total_usd": usd(sum(amounts.values(), ZERO)),
            "rounding": "each usage line's amount shared by largest remainder, to the cent"}  # fmt: skip


def chargeback_csv(parts: list[tuple[dict[str, Any], dict[str, Any]]], by: str, grand_total: bool = False) -> str:
    """One row per (team, label) and a TOTAL row per team equal to its invoice's usage amount; with
    `grand_total` (the whole organisation's month) a last `ALL` row sums the teams' totals."""
    field = "end_user" if by == "end_user" else "tag_value"
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["team_id", "period", "invoice", by, "requests", "exact_usd", "amount_usd"])
    all_requests, all_usd, period = 0, ZERO, ""
    for invoice, section in parts:
        ref = invoice.get("number") or invoice["invoice_id"]
        period = invoice["period"]
        for r in section["rows"]:
            w.writerow([invoice["team_id"], period, ref, r[field], r["requests"], r["exact_usd"],
                        r["amount_usd"]])  # fmt: skip
        total = cents(sum((Decimal(r["amount_usd"]) for r in section["rows"]), ZERO))
        requests = sum(r["requests"] for r in section["rows"])
        w.writerow([invoice["team_id"], period, ref, "TOTAL", requests, "", usd(total)])
        all_requests, all_usd = all_requests + requests, all_usd + total
    if grand_total:
        w.writerow(["ALL", period, "", "TOTAL", all_requests, "", usd(all_usd)])
    return out.getvalue()
