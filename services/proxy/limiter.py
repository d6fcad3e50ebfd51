"""Where rate-limit counts live: process memory by default, Redis (one atomic Lua call) when shared.

Both stores answer `admit` with the same pure verdict from limits.py; only where the counts live differs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from services.proxy import metrics
from services.proxy.limits import Rule, Verdict, exceeds, verdict, window_position

log = structlog.get_logger("tollway.proxy.limiter")


@dataclass(frozen=True, slots=True)
class Ticket:
    """What admission counted, so actual usage can correct it later (tpm counts an estimate up front)."""

    rules: tuple[Rule, ...]
    windows: tuple[int, ...]


ALLOW_ALL = Verdict(True, None, 0.0, {})


class MemoryLimiter:
    """Counts in this process: exact for one replica; N replicas would each allow the full limit."""

    def __init__(self) -> None:
        self._buckets: dict[str, list[float]] = {}  # bucket -> [window index, curr, prev]

    def _counts(self, rule: Rule, idx: int) -> list[float]:
        b = self._buckets.get(rule.bucket)
        if b is None:
            b = self._buckets[rule.bucket] = [idx, 0.0, 0.0]
        elif b[0] != idx:
            b[2] = b[1] if b[0] == idx - 1 else 0.0
            b[1], b[0] = 0.0, idx
        return b

    async def admit(
        self, rules: Sequence[Rule], costs: Sequence[int], now: float | None = None
    ) -> tuple[Verdict, Ticket]:
        now = time.time() if now is None else now
        # one pass: window, counts and the limit check per rule (the common case is far below every cap)
        windows: list[int] = []
        buckets: list[list[float]] = []
        counts: list[tuple[float, float]] = []
        fracs: list[float] = []
        rejected: int | None = None
        for i, rule in enumerate(rules):
            idx, frac = window_position(now, rule.window_s)
            b = self._counts(rule, idx)
            windows.append(idx)
            buckets.append(b)
            counts.append((b[1], b[2]))
            fracs.append(frac)
            if rejected is None and exceeds(rule, costs[i], b[1], b[2], frac):
                rejected = i
        if rejected is None:
            for b, cost in zip(buckets, costs, strict=True):
                b[1] += cost
        return verdict(rules, costs, counts, fracs, rejected), Ticket(tuple(rules), tuple(windows))

    def correct(self, ticket: Ticket, deltas: Sequence[int]) -> None:
        """Replace an admission-time estimate by the actual count (tpm), in the window it was counted in."""
        for rule, idx, delta in zip(ticket.rules, ticket.windows, deltas, strict=True):
            b = self._buckets.get(rule.bucket)
            if not delta or b is None:
                continue
            if b[0] == idx:
                b[1] = max(0.0, b[1] + delta)
            elif b[0] == idx + 1:
                b[2] = max(0.0, b[2] + delta)

    async def close(self) -> None:
        pass


# Check every limit, then count all or nothing: a request rejected by its team's limit must not use up
# its key's. KEYS: (current, previous) window per rule. ARGV: per rule limit, cost, elapsed fraction, ttl ms.
_ADMIT = """
local n = #KEYS / 2
local out = {0}
local rejected = 0
for i = 1, n do
  local limit = tonumber(ARGV[4 * i - 3])
  local cost = tonumber(ARGV[4 * i - 2])
  local frac = tonumber(ARGV[4 * i - 1])
  local curr = math.max(0, tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0'))
  local prev = math.max(0, tonumber(redis.call('GET', KEYS[2 * i]) or '0'))
  out[2 * i] = curr
  out[2 * i + 1] = prev
  if rejected == 0 and cost > 0 and prev * (1 - frac) + curr + cost > limit then
    rejected = i
  end
end
if rejected == 0 then
  for i = 1, n do
    local cost = tonumber(ARGV[4 * i - 2])
    if cost > 0 then
      redis.call('INCRBY', KEYS[2 * i - 1], cost)
      redis.call('PEXPIRE', KEYS[2 * i - 1], tonumber(ARGV[4 * i]))
    end
  end
end
out[1] = rejected
return out
"""


class RedisLimiter:
    """Counts shared by every replica. If Redis is unreachable the request is admitted (fail open) and
    counted in tollway_ratelimit_errors_total: a limiter outage must not become a gateway outage."""

    def __init__(self, url: str, prefix: str = "tw:rl:") -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script = self._redis.register_script(_ADMIT)
        self._prefix = prefix
        self._pending: set[asyncio.Task[None]] = set()

    def _key(self, rule: Rule, idx: int) -> str:
        return f"{self._prefix}{rule.bucket}:{idx}"

    async def admit(
        self, rules: Sequence[Rule], costs: Sequence[int], now: float | None = None
    ) -> tuple[Verdict, Ticket]:
        now = time.time() if now is None else now
        positions = [window_position(now, r.window_s) for r in rules]
        ticket = Ticket(tuple(rules), tuple(i for i, _ in positions))
        keys: list[str] = []
        args: list[float | int] = []
        for rule, cost, (idx, frac) in zip(rules, costs, positions, strict=True):
            keys += [self._key(rule, idx), self._key(rule, idx - 1)]
            args += [rule.limit, cost, frac, int(rule.window_s * 2000)]
        try:
            out = await self._script(keys=keys, args=args)
        except Exception as err:  # redis down or slow: admit, say so
            metrics.RATELIMIT_ERRORS.inc()
            log.warning("ratelimit_store_unavailable", error=str(err)[:200])
            return ALLOW_ALL, Ticket((), ())
        rejected = int(out[0]) - 1 if int(out[0]) else None
        counts = [(float(out[2 * i + 1]), float(out[2 * i + 2])) for i in range(len(rules))]
        return verdict(rules, costs, counts, [f for _, f in positions], rejected), ticket

    def correct(self, ticket: Ticket, deltas: Sequence[int]) -> None:
        if any(deltas):
            task = asyncio.get_running_loop().create_task(self._correct(ticket, deltas))
            self._pending.add(task)  # a task nobody references can be garbage-collected mid-flight
            task.add_done_callback(self._pending.discard)

    async def _correct(self, ticket: Ticket, deltas: Sequence[int]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        n = 0
        for rule, idx, delta in zip(ticket.rules, ticket.windows, deltas, strict=True):
            if delta:
                key = self._key(rule, idx)
                pipe.incrby(key, delta)
                pipe.pexpire(key, int(rule.window_s * 2000))  # a correction must not leave a key that never expires
                n += 1
        if not n:
            return
        try:
            await pipe.execute()
        except Exception as err:
            metrics.RATELIMIT_ERRORS.inc()
            log.warning("ratelimit_adjust_failed", error=str(err)[:200])

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)
        await self._redis.aclose()
