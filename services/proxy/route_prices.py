"""What each route of a model costs today, for the `cheapest` routing strategy: the book's unit prices per
route (a route's own prices override the model's, per provider: schemas/prices.py catalog), looked up once
per UTC day for every route, so ordering a request's routes is two multiplications per candidate.

Floats on purpose: they only order routes (equal Decimal prices give equal floats, so a tie stays a tie);
no amount anyone is billed or told comes from here (that is services/proxy/cost.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.prices import PriceBook
from services.proxy.routing import ModelRoute, Target
from services.proxy.tokens import CHARS_PER_TOKEN

Units = tuple[float, float] | None  # (input, output) USD per 1M tokens; None: no price in force


class RoutePrices:
    def __init__(self, book: PriceBook, targets: Mapping[str, tuple[Target, ...]],
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.book = book
        self.targets = targets
        self.clock = clock
        self._units: dict[str, tuple[Units, ...]] = {}
        self._until = float("-inf")  # the end of the UTC day the table was built for

    def units(self, model: str) -> tuple[Units, ...]:
        """Per route of the model (by its index in the model's route list), today's unit prices."""
        now = self.clock()
        if now >= self._until:
            self._rebuild(now)
        return self._units[model]

    def _rebuild(self, now: float) -> None:
        day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        table = {}
        for model, targets in self.targets.items():
            row = []
            for t in targets:
                unit = self.book.at(model, t.provider, day)
                row.append(None if unit is None else (float(unit.input), float(unit.output)))
            table[model] = tuple(row)
        self._units = table
        self._until = (day + timedelta(days=1)).timestamp()

    def expected(self, model: str, mix: tuple[int, int]) -> tuple[float | None, ...]:
        """Per route, the expected cost of a call of `mix` = (prompt tokens, output tokens), none cached
        (in USD x 1M: only the order matters)."""
        prompt, output = mix
        return tuple(None if u is None else prompt * u[0] + output * u[1] for u in self.units(model))


def expected_mix(body: dict[str, Any], body_bytes: int, route: ModelRoute) -> tuple[int, int]:
    """The token mix a request is expected to bill: the prompt from the body's size (as tpm admission counts
    it, no serialization), the output its cap allows (max_completion_tokens, max_tokens, or the Responses
    API's max_output_tokens) for each of its `n` choices, or the model's `typical_output_tokens` when it sets
    no cap; an embedding has no output."""
    prompt = max(1, body_bytes // CHARS_PER_TOKEN)
    if route.kind == "embedding":
        return prompt, 0
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    out = cap if isinstance(cap, int) and not isinstance(cap, bool) else route.typical_output_tokens
    n = body.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return prompt, out * n
