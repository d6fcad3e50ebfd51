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


@dataclass(frozen=True, order=True)
class Unit:
    input: Decimal
    output: Decimal
    cached_input: Decimal

    def of(self, component: str) -> Decimal:
        return {"input": self.input, "output": self.output, "cached_input": self.cached_input}[component]


class Catalog:
    """Unit prices per model by `effective_from`, and plan fees, parsed from the config file with PyYAML."""

    def __init__(self, path: Path) -> None:
        raw = yaml.safe_load(path.read_text())
        self.prices: dict[str, list[tuple[date, Unit]]] = {}
        for model, m in raw["models"].items():
            entries = []
            for p in m["prices"]:
                inp = Decimal(str(p["input"]))
                cached = Decimal(str(p["cached_input"])) if p.get("cached_input") is not None else inp
                entries.append((date.fromisoformat(str(p["effective_from"])),
                                Unit(inp, Decimal(str(p.get("output", "0"))), cached)))  # fmt: skip
            self.prices[model] = sorted(entries)
        self.fees = {name: Decimal(str(p.get("fee_usd_per_month", "0"))) for name, p in raw["plans"].items()}

    def unit(self, model: str, day: date) -> Unit:
        found = [u for d, u in self.prices[model] if d <= day]
        assert found, f"no price for {model} on {day}"
        return found[-1]


# -- calls and the ledger they imply --------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One answered call as the client saw it (or one event a proxy sent): what the bill must be made of."""

    team_id: str
    at: datetime  # the shifted clock when it was made
    model: str
    prompt: int
    completion: int
    cached: int = 0
    cache_hit: bool = False  # answered from Tollway's response cache: billed nothing
    label: str = ""

    @property
    def period(self) -> str:
        return f"{self.at.year:04d}-{self.at.month:02d}"

    @property
    def billable(self) -> bool:
        return not self.cache_hit

    def quantities(self) -> dict[str, int]:
        cached = min(self.cached, self.prompt)
        return {"input": self.prompt - cached, "cached_input": cached, "output": self.completion}


ItemKey = tuple[str, str, Unit]  # model, component, unit prices in force


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
            if not c.billable:
                continue
            unit = catalog.unit(c.model, c.at.date())
            for comp, qty in c.quantities().items():
                if qty:
                    out[(c.model, comp, unit)] += qty
        return dict(out)

    @staticmethod
    def exact(calls: Iterable[Call], catalog: Catalog, model: str | None = None) -> Decimal:
        total = Decimal(0)
        for (m, comp, unit), qty in Ledger.items(calls, catalog).items():
            if model is None or m == model:
                total += Decimal(qty) * unit.of(comp) / MILLION
        return total

    @staticmethod
    def lines(calls: Iterable[Call], catalog: Catalog) -> dict[ItemKey, tuple[int, Decimal]]:
        """Invoice usage lines: quantity and amount rounded once, half-even, to cents."""
        return {k: (q, cents(Decimal(q) * k[2].of(k[1]) / MILLION)) for k, q in Ledger.items(calls, catalog).items()}

    @staticmethod
    def tokens(calls: Iterable[Call]) -> int:
        """What counts against tokens_per_month: prompt + completion of calls that reached the provider."""
        return sum(c.prompt + c.completion for c in calls if c.billable)


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
        self.failures.append(f"{what}: got {got!r}, want {want!r}")
        return False

    def true(self, what: str, cond: bool, detail: Any = "") -> bool:
        if cond:
            self.passed += 1
            return True
        self.failures.append(f"{what}: {detail}" if detail != "" else what)
        return False
