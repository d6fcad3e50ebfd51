"""The provisional cost of an answered call, told to the caller: `x-tollway-cost-usd` (+ the price version and
a status) on a plain response, `usage.cost` in a stream's usage chunk (OpenRouter's shape, a JSON number).

The ledger stays the truth: the meter prices the event again from its own copy of the book, and the event
keeps what the caller was told (`quoted_cost_usd`, `quoted_price_version`), so the usage API shows where the
two differ. Pricing goes through ONE function, `provisional_cost`, over the book's pure pricing rules
(schemas/prices.py): no pricing rule is restated here.

`x-tollway-cost-status` says how far the amount can be trusted:
  provisional  the provider's reported usage at the price in force when the call was made: what the meter
               bills, unless the book changes before it prices the event (a later re-rate is an adjustment)
  estimated    the provider reported no usage: the amount prices the proxy's token estimate, which is also
               what is billed (usage_source = estimated)
  cached       answered from the gateway's cache: billed 0 (the price version is still named)
  unpriced     no price in force for the model on the route that answered: no amount is sent (the call is
               held unpriced, billed 0 until `tollway rerate` prices it)
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, NamedTuple

import orjson

from schemas.config import GatewayConfig
from schemas.money import plain
from schemas.prices import PriceBook, PriceSet, price_usage
from services.proxy.tokens import TokenUsage

COST_HEADER = "x-tollway-cost-usd"
VERSION_HEADER = "x-tollway-price-version"
STATUS_HEADER = "x-tollway-cost-status"

_MEMO_MAX = 4096  # (model, provider, day) triples: a handful per model and day; the bound only guards memory


class QuoteBook(PriceBook):
    """The proxy's copy of the price book, built once at start: the per-(model, provider, day) lookup is
    remembered, so pricing a call does no search of the effective-dated list."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__(config)
        self._memo: dict[tuple[str, str, date], PriceSet | None] = {}

    def at(self, model: str, provider: str, when: datetime) -> PriceSet | None:
        key = (model, provider, when.date())
        try:
            return self._memo[key]
        except KeyError:
            pass
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        unit = self._memo[key] = super().at(model, provider, when)
        return unit


# THE pricing call of the proxy: the meter's own function (schemas.prices.price_usage), itself, not a wrapper
# (one call less on every answered call), on the call's values in every dimension (cache reads and writes, output,
# request fee, web searches; long-context and service-tier prices):
# provisional_cost(book, model, provider, when, status, usage: TokenUsage, service_tier='') -> Priced
provisional_cost = price_usage


class Quote(NamedTuple):  # a tuple: a frozen dataclass costs ~1 us more to build, on every answered call
    status: str  # provisional | estimated | cached | unpriced
    usd: str  # exact plain decimal text, no exponent ('0.000123'); '' when unpriced
    version: str  # the price version that priced it; '' when unpriced

    def headers(self) -> dict[str, str]:
        if not self.usd:
            return {STATUS_HEADER: self.status}
        return {COST_HEADER: self.usd, VERSION_HEADER: self.version, STATUS_HEADER: self.status}


UNPRICED = Quote("unpriced", "", "")


def quote(book: PriceBook, model: str, provider: str, when: datetime, status: str, usage: TokenUsage,
          usage_source: str = "provider", service_tier: str = "") -> Quote:  # fmt: skip
    unit, cost = provisional_cost(book, model, provider, when, status, usage, service_tier)
    if unit is None:
        return UNPRICED
    told = "cached" if status == "cached" else "estimated" if usage_source == "estimated" else "provisional"
    return Quote(told, plain(cost.total), unit.version)


def usage_with_cost(chunk: dict[str, Any], usage: dict[str, Any], usd: str) -> bytes:
    """A stream chunk re-serialized with `usage.cost` = the exact amount as a JSON number (orjson writes no
    Decimal, and a float would round it): usage goes last, as OpenAI's chunks have it. An upstream's own
    `cost` (another gateway's, in its own credits) is replaced by the gateway's price."""
    head = orjson.dumps({k: v for k, v in chunk.items() if k != "usage"})
    u = orjson.dumps({k: v for k, v in usage.items() if k != "cost"})
    u = u[:-1] + (b"," if len(u) > 2 else b"") + b'"cost":' + usd.encode() + b"}"
    return head[:-1] + (b"," if len(head) > 2 else b"") + b'"usage":' + u + b"}"


def nested_usage_with_cost(event: dict[str, Any], key: str, usd: str) -> bytes:
    """A stream event whose `key` object carries the usage (the Responses API's `response.usage`), re-serialized
    with `usage.cost` as usage_with_cost writes it; the object goes last."""
    inner = event[key]
    body = usage_with_cost(inner, inner["usage"], usd)
    head = orjson.dumps({k: v for k, v in event.items() if k != key})
    return head[:-1] + (b"," if len(head) > 2 else b"") + orjson.dumps(key) + b":" + body + b"}"
