"""What the month-in-the-life test needs besides the stack: a shifted clock for real processes (libfaketime),
an independent price book read straight from the YAML file, the ledger arithmetic the test expects (Decimal,
half-even, once per line), crafted usage events as a proxy would have sent them, and a few Kafka reads/writes.

Nothing here imports the product's pricing, invoice or ledger code: the expectations must be able to disagree.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

# Debian's `faketime` package (`make system-deps` installs it); the multi-threaded variant, as the stack is.
FAKETIME_LIB = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))), Path("libfaketimeMT.so.1"))
MILLION = Decimal(1_000_000)
CENT = Decimal("0.01")


def cents(v: Decimal) -> Decimal:
    return v.quantize(CENT, rounding=ROUND_HALF_EVEN)


# -- the clock ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeClock:
    """A constant offset from the real clock, applied to a whole process tree by libfaketime (wall clock and
    monotonic both shifted; the Debian build does not shift file times). `now()` is what those processes see.

    The offsets used are positive (the month lies ahead of the real date): the proxy spool's retention compares
    the shifted clock with real file mtimes, so every acknowledged segment of an earlier run is past retention,
    which is the case this test is about."""

    offset_s: int

    @classmethod
    def at(cls, when: datetime) -> FakeClock:
        return cls(int((when - datetime.now(UTC)).total_seconds()))

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset_s)

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": f"{self.offset_s:+d}", "TZ": "UTC"}


# -- prices, read from the YAML file itself -------------------------------------------------------------

# The billing dimensions as docs/metering.md "Prices" states them, restated here so the test can disagree:
# the token dimensions are priced per 1M, the request fee per billable request, web searches per 1,000.
DIMENSIONS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "request", "web_search")
PER = {d: MILLION for d in DIMENSIONS} | {"request": Decimal(1), "web_search": Decimal(1_000)}
FEES = ("request", "web_search")  # per-call fees: without a price of their own there is no invoice line of them


@dataclass(frozen=True, order=True)
class Unit:
    """The unit prices one call is priced at: one set of rates of one price entry (`since` names the entry,
    i.e. the price version; `tier` the set: '' base, 'long_context' or a service tier's name)."""

    since: date
    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal = Decimal(0)
    cache_write_1h: Decimal = Decimal(0)
    request: Decimal = Decimal(0)
    web_search: Decimal = Decimal(0)
    tier: str = ""

    def of(self, component: str) -> Decimal:
        return getattr(self, component)


def _rates(since: date, r: dict[str, Any], fees: tuple[Decimal, Decimal], tier: str) -> Unit:
    """A set of token rates from the YAML: an unset cache price is the set's input price; fees are the entry's."""
    inp = Decimal(str(r["input"]))

    def cache(name: str) -> Decimal:
        return Decimal(str(r[name])) if r.get(name) is not None else inp

    return Unit(since, inp, Decimal(str(r.get("output", "0"))), cache("cached_input"), cache("cache_write"),
                cache("cache_write_1h"), *fees, tier=tier)  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One effective-dated price (or baseline) entry: base rates, an optional long-context tier, service tiers."""

    since: date
    base: Unit
    long_context: tuple[int, Unit] | None
    tiers: dict[str, Unit]

    @classmethod
    def parse(cls, p: dict[str, Any]) -> Entry:
        since = date.fromisoformat(str(p.get("effective_from", "2000-01-01")))
        fees = tuple(Decimal(str(p[f])) if p.get(f) is not None else Decimal(0) for f in FEES)
        lc = p.get("long_context")
        return cls(since, _rates(since, p, fees, ""),  # type: ignore[arg-type]
                   None if lc is None else (int(lc["above_prompt_tokens"]), _rates(since, lc, fees, "long_context")),  # type: ignore[arg-type]
                   {name: _rates(since, r, fees, name) for name, r in (p.get("service_tiers") or {}).items()})  # type: ignore[arg-type]  # fmt: skip

    def select(self, tier: str, prompt: int) -> Unit:
        """The service tier the provider reported if the entry prices it, else the long-context rates when the
        prompt (all input) is over the threshold, else the base rates."""
        if tier and tier in self.tiers:
            return self.tiers[tier]
        if self.long_context is not None and prompt > self.long_context[0]:
            return self.long_context[1]
        return self.base


def _in_force(entries: list[Entry], day: date) -> Entry | None:
    found = [e for e in entries if e.since <= day]
    return found[-1] if found else None


class Catalog:
    """Price entries per model by `effective_from`, ROI baselines, and plan fees, parsed from the config file
    with PyYAML."""

    def __init__(self, path: Path) -> None:
        raw = yaml.safe_load(path.read_text())
        self.prices: dict[str, list[Entry]] = {}
        self.baselines: dict[str, list[Entry]] = {}
        for model, m in raw["models"].items():
            self.prices[model] = sorted((Entry.parse(p) for p in m["prices"]), key=lambda e: e.since)
            base = m.get("baseline")
            base = [base] if isinstance(base, dict) else base or []
            self.baselines[model] = sorted((Entry.parse(p) for p in base), key=lambda e: e.since)
        self.fees = {name: Decimal(str(p.get("fee_usd_per_month", "0"))) for name, p in raw["plans"].items()}

    def entry(self, model: str, day: date) -> Entry:
        found = _in_force(self.prices[model], day)
        assert found is not None, f"no price for {model} on {day}"
        return found

    def unit(self, model: str, day: date, tier: str = "", prompt: int = 0) -> Unit:
        return self.entry(model, day).select(tier, prompt)

    def baseline_unit(self, model: str, day: date, tier: str = "", prompt: int = 0) -> Unit:
        """ROI's baseline: the model's baseline entry in force that day, its own price when it has none."""
        found = _in_force(self.baselines.get(model, []), day)
        return found.select(tier, prompt) if found is not None else self.unit(model, day, tier, prompt)


# -- calls and the ledger they imply --------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One answered call as the client saw it (or one event a proxy sent): what the bill must be made of.
    `prompt` is every input token (cache reads and writes inside it, as each SDK's usage adds up to it)."""

    team_id: str
    at: datetime  # the shifted clock when it was made
    model: str  # '' for a call that names none (a follow-up GET on a stored response)
    prompt: int
    completion: int
    cached: int = 0
    cache_hit: bool = False  # answered from Tollway's response cache: billed nothing
    label: str = ""
    cache_write: int = 0  # 5-minute cache writes
    cache_write_1h: int = 0
    web_search: int = 0
    tier: str = ""  # the service tier the provider reported serving
    reasoning: int = 0  # inside completion: reported, never priced apart

    @property
    def period(self) -> str:
        return f"{self.at.year:04d}-{self.at.month:02d}"

    @property
    def billable(self) -> bool:
        return not self.cache_hit

    @property
    def has_tokens(self) -> bool:
        return bool(self.prompt or self.completion)

    def quantities(self) -> dict[str, int]:
        """Billed units per dimension: reads, then 5-minute writes, then 1-hour writes carved out of the prompt
        (never more than it), the rest uncached input; one request fee for a call that has tokens."""
        cached = min(self.cached, self.prompt)
        w5 = min(self.cache_write, self.prompt - cached)
        w1h = min(self.cache_write_1h, self.prompt - cached - w5)
        return {"input": self.prompt - cached - w5 - w1h, "cached_input": cached, "cache_write": w5,
                "cache_write_1h": w1h, "output": self.completion, "request": int(self.has_tokens),
                "web_search": self.web_search}  # fmt: skip

    def unit(self, catalog: Catalog) -> Unit:
        return catalog.unit(self.model, self.at.date(), self.tier, self.prompt)

    def cost_at(self, unit: Unit) -> Decimal:
        return sum((Decimal(q) * unit.of(d) / PER[d] for d, q in self.quantities().items()), Decimal(0))


# An invoice item: model, the price entry (its version), component, unit price of that component. The set of
# rates (base, tier, long context) is not part of it: two sets with one unit price bill one line.
ItemKey = tuple[str, date, str, Decimal]


def amount(key: ItemKey, qty: int) -> Decimal:
    return Decimal(qty) * key[3] / PER[key[2]]


@dataclass
class Ledger:
    """Every call of the month, priced from a catalog: items, exact amounts, invoice lines."""

    calls: list[Call] = field(default_factory=list)

    def of(self, team_id: str, period: str) -> list[Call]:
        return [c for c in self.calls if c.team_id == team_id and c.period == period]

    @staticmethod
    def items(calls: Iterable[Call], catalog: Catalog) -> dict[ItemKey, int]:
        out: dict[ItemKey, int] = defaultdict(int)
        for c in calls:
            if not c.billable or not c.has_tokens:
                continue
            unit = c.unit(catalog)
            for comp, qty in c.quantities().items():
                if qty and not (comp in FEES and not unit.of(comp)):
                    out[(c.model, unit.since, comp, unit.of(comp))] += qty
        return dict(out)

    @staticmethod
    def exact(calls: Iterable[Call], catalog: Catalog, model: str | None = None,
              component: str | None = None) -> Decimal:  # fmt: skip
        total = Decimal(0)
        for key, qty in Ledger.items(calls, catalog).items():
            if (model is None or key[0] == model) and (component is None or key[2] == component):
                total += amount(key, qty)
        return total

    @staticmethod
    def lines(calls: Iterable[Call], catalog: Catalog) -> dict[ItemKey, tuple[int, Decimal]]:
        """Invoice usage lines: quantity and amount rounded once, half-even, to cents."""
        return {k: (q, cents(amount(k, q))) for k, q in Ledger.items(calls, catalog).items()}

    @staticmethod
    def tokens(calls: Iterable[Call]) -> int:
        """What counts against tokens_per_month: prompt + completion of calls that reached the provider."""
        return sum(c.prompt + c.completion for c in calls if c.billable)

    @staticmethod
    def baseline(calls: Iterable[Call], catalog: Catalog, model: str) -> Decimal:
        """ROI's exact baseline of a model: every call of it (cache hits too: what they avoided) at the baseline
        rates in force on its day, its own price where it has no baseline."""
        return sum((c.cost_at(catalog.baseline_unit(c.model, c.at.date(), c.tier, c.prompt))
                    for c in calls if c.model == model and c.has_tokens), Decimal(0))  # fmt: skip


def month_bounds(period: str) -> tuple[datetime, datetime]:
    y, m = int(period[:4]), int(period[5:7])
    return datetime(y, m, 1, tzinfo=UTC), datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=UTC)


def prorated_fee(fee: Decimal, start: datetime, end: datetime, period: str) -> Decimal:
    """A plan's monthly fee for the part [start, end) of the period it was in force, by the second."""
    lo, hi = month_bounds(period)
    start, end = max(start, lo), min(end, hi)
    if end <= start:
        return Decimal(0)
    return fee * Decimal(int((end - start).total_seconds())) / Decimal(int((hi - lo).total_seconds()))


# -- events as a proxy would have sent them --------------------------------------------------------------


def uuid7_at(t: datetime) -> str:
    """A UUIDv7 minted at `t` (what the proxy whose clock said `t` would have made)."""
    ms = int(t.timestamp() * 1000)
    rand = secrets.randbits(74)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def crafted_event(team_id: str, key_id: str, at: datetime, model: str, prompt: int, completion: int,
                  instance: str, seq: int, cached: int = 0) -> dict[str, Any]:  # fmt: skip
    return {
        "schema_version": 1, "event_id": uuid7_at(at),
        "occurred_at": at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": f"req_{instance}_{seq}", "team_id": team_id, "key_id": key_id, "end_user": None,
        "metadata": {}, "endpoint": "/v1/chat/completions", "requested_model": model, "served_model": model,
        "provider": "openai", "stream": False, "status": "ok", "http_status": 200, "error_code": None,
        "prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached, "latency_ms": 12.0,
        "ttft_ms": None, "attempts": 1, "fallback_used": False, "cache_hit": False, "client_disconnected": False,
        "proxy_instance": instance, "proxy_seq": seq, "usage_source": "provider",
    }  # fmt: skip


# -- Kafka, from the test process ------------------------------------------------------------------------


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """(key, value) records, acknowledged by the broker before this returns."""

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in records:
                await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()

    asyncio.run(run())


def read_topic(bootstrap: str, topic: str, idle_s: float = 1.5, timeout_s: float = 15.0) -> list[Any]:
    """Every record of a topic from the start, read until nothing new arrives for `idle_s` (the broker's
    reported end offsets are not to be trusted on tansu: wait on data)."""

    async def run() -> list[Any]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")  # fmt: skip
        await consumer.start()
        out: list[Any] = []
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            parts = consumer.partitions_for_topic(topic)
            while not parts and loop.time() < deadline:
                await asyncio.sleep(0.2)
                await consumer.topics()
                parts = consumer.partitions_for_topic(topic)
            consumer.assign([TopicPartition(topic, p) for p in sorted(parts or ())])
            last = loop.time()
            while loop.time() < deadline and loop.time() - last < idle_s:
                batch = await consumer.getmany(timeout_ms=200)
                for recs in batch.values():
                    out.extend(recs)
                    last = loop.time()
        finally:
            await consumer.stop()
        return out

    return asyncio.run(run())


def dead_letters(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """The DLQ's records, each with the original value decoded (`value`, bytes)."""
    out = []
    for r in read_topic(bootstrap, topic):
        d = orjson.loads(r.value)
        d["value"] = base64.b64decode(d["value_b64"]) if d.get("value_b64") else b""
        out.append(d)
    return out


# -- soft checks: a month has many figures; report every disagreement, not only the first ----------------


@dataclass
class Checks:
    failures: list[str] = field(default_factory=list)
    passed: int = 0

    def eq(self, what: str, got: Any, want: Any) -> bool:
        if got == want:
            self.passed += 1
            return True
        return self._fail(f"{what}: got {got!r}, want {want!r}")

    def true(self, what: str, cond: bool, detail: Any = "") -> bool:
        if cond:
            self.passed += 1
            return True
        return self._fail(f"{what}: {detail}" if detail != "" else what)

    def _fail(self, text: str) -> bool:
        self.failures.append(text)
        print(f"DISAGREES: {text}", flush=True)  # as it happens: a run cut short still shows what it found
        return False
