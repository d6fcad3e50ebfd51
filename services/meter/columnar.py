"""Decode and price a whole batch in Arrow: one JSON parse for all records, checks and prices as column kernels.

`reference.decode_and_price` (per record: orjson, Python checks, Decimal) stays the reference and the fallback:
a record takes this path only when the checks below prove that the reference would store exactly the same
row, and every other record goes through the reference itself, so the outcome never depends on the path.

- The records are joined by newlines and parsed by pyarrow with an explicit schema of every v1 field
  (schemas/usage_row.py) as the proxy writes them and `unexpected_field_behavior="error"`: an extra field, a duplicate key, a value of
  another JSON type or a number its column cannot hold fails the parse of the whole part, which is then
  split in halves (a bounded number of times) so that the rest still takes this path.
- `metadata` is parsed as an empty struct: any key in it fails the parse, so a parsed row's metadata is `{}`
  (or null, left to the reference). Maps with keys (their order and duplicate keys are orjson's business)
  go to the reference: when the first parse of a batch fails, records without `"metadata":{}` in their
  bytes are routed there before the parts are parsed again.
- Rows line up with records: each record starts with `{` and ends with `}`, so it holds at least one JSON
  document (a `{` right after a `}` can only start a new one), and the parse must give exactly one row per
  record.
- Each row is checked as `row.event_row` checks it (from the same field table): lengths in code points, the UUID pattern, enums, ranges,
  nulls only where allowed, counts that fit their columns, valid UTF-8. NaN/Infinity (pyarrow parses them,
  orjson does not) and timestamps in any form but the proxy's `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` from 1970 on
  go to the reference.
- Prices are looked up once per (model, provider, UTC day, service tier); a row's long-context tier is one
  compare of its prompt_tokens with the group's threshold. Every dimension (schemas/prices.py DIMENSIONS) is
  priced by the same kernels. Costs are exact: tokens x the price as an integer
  in uint64 when every row's product fits (then no Decimal step can round), else decimal256 with a bound on
  the digits of the sum (Decimal's default context keeps 28). A price with more fractional digits than its
  column (encode.py truncates those) or a cost that would round sends the row to the reference.

tests/unit/test_meter_columnar.py compares both paths on generated batches, row for row, and
tests/integration/test_meter_columnar_store.py what ClickHouse stores.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import reduce
from operator import attrgetter
from typing import Any, get_origin

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from schemas.clock import FUTURE_TOLERANCE_S, future_cutoff
from schemas.prices import DIMENSIONS, MILLION, PER, PriceBook, UnitPrice
from schemas.usage_row import EVENT, Field
from services.meter.batch import PricedBatch
from services.meter.dead_letters import DeadLetter
from services.meter.reference import _decode_and_price
from services.meter.row import SCHEMA, row_version

_STR, _I64, _U64, _F64, _BOOL = pa.string(), pa.int64(), pa.uint64(), pa.float64(), pa.bool_()


def _source_type(f: Field) -> pa.DataType:
    """How the field is parsed from the proxy's JSON. Counts that are UInt64 columns are parsed as uint64 (a
    negative count fails the block: rare, and the reference words the dead letter)."""
    t = f.base_type
    if t is bool:
        return _BOOL
    if t is int:
        return _U64 if f.clickhouse == "UInt64" else _I64
    if t is float:
        return _F64
    if get_origin(t) is dict:
        return pa.struct([])
    return _STR  # strings, enums, the UUID and the timestamp


# What the proxy writes (UsageEvent.model_dump_json), field for field. An event without some field (an older
# proxy's) has nulls there and takes the reference path.
SOURCE = pa.schema([(f.name, _source_type(f)) for f in EVENT])
_PARSE = pj.ParseOptions(explicit_schema=SOURCE, unexpected_field_behavior="error")
_STRING_FIELDS = [f.name for f in SOURCE if f.type == _STR]
_EMPTY_META = b'"metadata":{}'
_SPECIAL = ("schema_version", "event_id", "occurred_at")  # checked one by one in _contract
# What pyarrow parsed as another type than the stored column (ints parsed as int64), cast after the checks.
_CASTS = [f.name for f in EVENT if f.base_type is int and _source_type(f) != SCHEMA.field(f.name).type]
_STORED_NONE = [(f.name, f.stored_none) for f in EVENT if f.stored_none is not None]

_UUID = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# The proxy's serialisation of a UTC datetime (pydantic): seconds, then either nothing or 6 digits, then Z.
# Years before 1970 are left to the reference (flooring to milliseconds differs from truncating there).
_OCCURRED = (
    r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{6})?Z$"
)
_SECONDS = "%Y-%m-%dT%H:%M:%S"
_FREE = pa.array(["cached", "rejected"])  # priced, at zero cost (schemas/prices.py price_of)

_UNIT = pa.decimal128(38, 12)
_COST = pa.decimal128(38, 18)
_PER_UNIT = pa.decimal256(40, 18)  # unit price per token (per request, per search): exact, <= 15 fractional digits
_TOKENS = pa.decimal256(20, 0)
_TS = pa.timestamp("ms", tz="UTC")
_MS_PER_DAY = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SPLIT_MIN = 64  # a part this small that still fails to parse goes to the reference whole
_MAX_FAILED_PARSES = 12


def decode_and_price_columnar(records: list[Any], book: PriceBook, future_tolerance_s: float = FUTURE_TOLERANCE_S
                              ) -> tuple[PricedBatch, list[DeadLetter]]:  # fmt: skip
    """Same contract as `reference.decode_and_price`: the same rows (in another order) and the same dead letters."""
    enabled = gc.isenabled()
    gc.disable()  # see reference.decode_and_price
    try:
        return _columnar(records, book, future_tolerance_s)
    finally:
        if enabled:
            gc.enable()


def _columnar(records: list[Any], book: PriceBook, future_tolerance_s: float) -> tuple[PricedBatch, list[DeadLetter]]:
    now = datetime.now(UTC)
    horizon_ms, _ = future_cutoff(now, future_tolerance_s)
    values = [r.value for r in records]
    partitions = np.fromiter(map(_PARTITION, records), dtype=np.uint32, count=len(records))
    offsets = np.fromiter(map(_OFFSET, records), dtype=np.uint64, count=len(records))
    spans = _spans(records, partitions, offsets)

    index, block = _candidates(values)
    parts, slow = _parse_parts(values, index, block)
    fast: pa.Table | None = None
    if parts:
        table = pa.concat_tables([t for _, t in parts]).combine_chunks() if len(parts) > 1 else parts[0][1]
        index = np.concatenate([i for i, _ in parts])
        fast, taken = _fast_rows(table, index, partitions, offsets, book, now, horizon_ms)
        slow.extend(np.setdiff1d(index, taken, assume_unique=True).tolist())
    slow.sort()  # the reference's dead letters come in record order
    batch, dead = _decode_and_price([records[i] for i in slow], book, now, future_tolerance_s)
    batch.spans = spans
    if fast is not None:
        batch.joined(fast)
    return batch, dead


_PARTITION, _OFFSET, _TOPIC = attrgetter("partition"), attrgetter("offset"), attrgetter("topic")


def _spans(records: list[Any], partitions: np.ndarray, offsets: np.ndarray) -> dict[tuple[str, int], tuple[int, int]]:
    """(topic, partition) -> (offset of its first record, offset of its last record), as the reference has it."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    if len({*map(_TOPIC, records)}) != 1:
        for r in records:
            key = (r.topic, r.partition)
            span = spans.get(key)
            spans[key] = (r.offset, r.offset) if span is None else (span[0], r.offset)
        return spans
    topic = records[0].topic
    first: dict[int, int] = {}
    for p in np.unique(partitions).tolist():
        at = np.flatnonzero(partitions == p)
        first[p] = int(at[0])
        spans[(topic, p)] = (int(offsets[at[0]]), int(offsets[at[-1]]))
    return dict(sorted(spans.items(), key=lambda kv: first[kv[0][1]]))  # in order of first appearance


def _candidates(values: list[bytes | None]) -> tuple[np.ndarray, bytes | None]:
    """Indices of the records that may take the Arrow path (the others go to the reference), and their bytes
    joined by newlines when that is all of them."""
    n = len(values)
    if not n:
        return np.arange(0), None
    try:
        block = b"\n".join(values)  # type: ignore[arg-type]  # a None value makes this raise
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)  # type: ignore[arg-type]
    except TypeError:
        block = None
    # The common case, checked on the joined bytes: every record is non-empty, starts with `{` and ends with
    # `}` (so it yields at least one row: with one row per record in all, each yields exactly one). Metadata
    # is not looked at: if a record has some, the parse fails and _parse_parts routes record by record.
    if block is not None and lengths.min() > 0:
        ends = np.cumsum(lengths + 1) - 1  # the newline after each record (one past the block for the last)
        starts = ends - lengths
        raw = np.frombuffer(block, dtype=np.uint8)
        if (raw[starts] == ord("{")).all() and (raw[ends - 1] == ord("}")).all():
            return np.arange(n, dtype=np.int64), block
    return _routed(values, range(n)), None


def _routed(values: list[bytes | None], among: Iterable[int]) -> np.ndarray:
    """The records that are one JSON object with empty metadata, by their bytes: a record with a metadata map
    would fail the whole part's parse (see the module doc), so it goes to the reference up front."""
    return np.fromiter(
        (i for i in among if (v := values[i]) and v[:1] == b"{" and v[-1:] == b"}" and _EMPTY_META in v),
        dtype=np.int64,
    )


def _read(values: list[bytes], index: np.ndarray, block: bytes | None = None) -> pa.Table | None:
    if block is None:
        block = b"\n".join([values[i] for i in index.tolist()])
    try:
        # One block on this thread: Arrow's thread pool cut the wall time of a parse but cost more CPU in all
        # (bench: two meters 99k/s with it, 145k/s without, on 2 cores); the other core has the insert.
        # (A block past 1 GiB is cut at newlines; one inside a record then fails the parse, never aligns wrong.)
        table = pj.read_json(pa.BufferReader(block), read_options=pj.ReadOptions(use_threads=False,
                             block_size=min(len(block) + 1, 1 << 30)), parse_options=_PARSE)  # fmt: skip
        if table.num_rows != len(index):
            return None
        for name in _STRING_FIELDS:  # pyarrow's JSON reader does not check UTF-8; orjson refuses bad bytes
            table[name].validate(full=True)
    except (pa.ArrowException, ValueError, OverflowError):
        return None
    return table


def _parse_parts(
    values: list[bytes], index: np.ndarray, block: bytes | None
) -> tuple[list[tuple[np.ndarray, pa.Table]], list[int]]:
    """Parse the candidates; a part that fails is halved (a bounded number of times) to isolate the culprits."""
    parts: list[tuple[np.ndarray, pa.Table]] = []
    slow = sorted(set(range(len(values))) - set(index.tolist())) if len(index) != len(values) else []
    todo, failures = [index] if len(index) else [], 0
    while todo:
        part = todo.pop()
        if failures > _MAX_FAILED_PARSES:  # failing all over: not worth more parses, the reference takes it
            slow.extend(part.tolist())
            continue
        whole = block is not None and len(part) == len(values)
        table = _read(values, part, block if whole else None)
        if table is not None:
            parts.append((part, table))
            continue
        failures += 1
        if whole:  # the optimistic first try: now leave out the records with metadata (or anything odd)
            routed = _routed(values, part.tolist())
            if len(routed) < len(part):
                slow.extend(np.setdiff1d(part, routed, assume_unique=True).tolist())
                todo.append(routed)
                continue
        if len(part) <= _SPLIT_MIN:
            slow.extend(part.tolist())
        else:
            half = len(part) // 2
            todo += [part[half:], part[:half]]
    return parts, slow


def _contract(t: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(rows row.event_row would accept, occurred_at as UTC epoch ms)."""
    at = t["occurred_at"]
    seconds = pc.utf8_slice_codeunits(at, 0, 19)
    parsed = pc.strptime(seconds, format=_SECONDS, unit="s", error_is_null=True)
    shaped = pc.match_substring_regex(at, _OCCURRED)
    # Milliseconds are the fraction's first 3 digits (floored, as encode.py stores a datetime).
    frac = pc.if_else(pc.and_(shaped, pc.equal(pc.utf8_length(at), 27)), pc.utf8_slice_codeunits(at, 20, 23), "0")
    ms = pc.add(pc.cast(pc.cast(parsed, pa.timestamp("ms")), _I64), pc.cast(frac, _I64))
    conds = [
        shaped,
        pc.equal(t["schema_version"], 1),
        pc.match_substring_regex(t["event_id"], _UUID),
        # strptime turns 02-30 into 03-02 where fromisoformat refuses it (the pattern bounds everything else).
        pc.equal(pc.day(parsed), pc.cast(pc.if_else(shaped, pc.utf8_slice_codeunits(at, 8, 10), "0"), _I64)),
    ]
    conds += [_field_ok(f, t[f.name]) for f in EVENT if f.name not in _SPECIAL]
    ok = pc.fill_null(reduce(pc.and_kleene, conds), False)
    return ok, ms


def _field_ok(f: Field, col: pa.ChunkedArray) -> pa.ChunkedArray:
    """The field's contract bounds (and its column's), as row.event_row checks them; null where absent."""
    t = f.base_type
    if f.choices is not None:
        ok = pc.is_in(col, value_set=pa.array(f.choices))
    elif t is str:
        ok = _length_within(col, f.min_length or 0, f.max_length or 2**62)
    elif t is int:
        lo = max(f.ge if f.ge is not None else 0, 0)  # every integer column is unsigned
        hi = min(x for x in (f.le, f.column_max, 2**64 - 1) if x is not None)
        ok = pc.is_valid(col)
        if col.type != _U64 or lo or hi < 2**64 - 1:
            ok = pc.and_(pc.greater_equal(col, lo), pc.less_equal(col, hi))
    elif t is float:
        ok = pc.and_(pc.is_finite(col), pc.greater_equal(col, f.ge if f.ge is not None else float("-inf")))
    else:  # flags, metadata: present
        ok = pc.is_valid(col)
    return pc.or_kleene(pc.is_null(col), ok) if f.nullable else ok


def _length_within(col: pa.ChunkedArray, lo: int, hi: int) -> pa.ChunkedArray:
    """lo <= code points <= hi. A string has at most as many code points as bytes and at least one if it has
    any byte, so the byte length (no scan) settles it unless some value has more bytes than `hi`."""
    size = pc.binary_length(col)
    if (pc.max(size).as_py() or 0) > hi:
        size = pc.utf8_length(col)
    return pc.and_(pc.greater_equal(size, lo), pc.less_equal(size, hi)) if lo else pc.less_equal(size, hi)


def _digits_ok(d: Decimal) -> bool:
    """A unit price the column holds exactly and whose products encode.py would not truncate."""
    if not d.is_finite() or d < 0 or d >= 10**26:
        return False
    _, digits, exp = d.as_tuple()
    return isinstance(exp, int) and exp >= -12 and len(digits) <= 28


# The dimensions, in schemas/prices.py's order, and each one's price as "per 1M units" (a request fee x 1e6, a
# web search fee per 1,000 x 1e3), so one integer scale and one 1e-6 step price them all.
_DIMS = DIMENSIONS
_TO_MILLION = {d: MILLION / PER[d] for d in _DIMS}
_U64_PART = (2**64 - 1) // len(_DIMS)  # each product's room so that the sum of all of them fits uint64
_NEVER = 2**64 - 1  # a long-context threshold no prompt exceeds


def _groups(model: pa.Array, provider: pa.Array, day: pa.Array, tier: pa.Array, prompt: pa.Array,
            book: PriceBook) -> tuple[pa.Array, dict]:  # fmt: skip
    """Per-row price-set id and per-set price columns. A group is (model, provider, UTC day, service tier): few
    per batch. Each group has two sets, its rates at or under the long-context threshold and above it (the same
    set twice when the price has no long-context tier)."""
    m, p, tr = pc.dictionary_encode(model), pc.dictionary_encode(provider), pc.dictionary_encode(tier)
    first_day = pc.min(day).as_py() or 0
    days = pc.subtract(day, first_day)
    n_p, n_t, n_d = len(p.dictionary), len(tr.dictionary), pc.max(days).as_py() + 1
    key = pc.add(pc.multiply(pc.add(pc.multiply(pc.add(pc.multiply(pc.cast(m.indices, _I64), n_p),
                 pc.cast(p.indices, _I64)), n_t), pc.cast(tr.indices, _I64)), n_d), days)  # fmt: skip
    uniq = pc.unique(key)
    gid = pc.index_in(key, value_set=uniq)
    models, providers, tiers = m.dictionary.to_pylist(), p.dictionary.to_pylist(), tr.dictionary.to_pylist()
    units: list[UnitPrice | None] = []
    thresholds: list[int] = []
    for k in uniq.to_pylist():
        rest, di = divmod(k, n_d)
        rest, ti = divmod(rest, n_t)
        mi, pi = divmod(rest, n_p)
        entry = book.at(models[mi], providers[pi], _EPOCH + timedelta(days=first_day + di))
        if entry is None:
            units += [None, None]
            thresholds.append(_NEVER)
            continue
        # both sets as PriceSet.select picks them (the one rule for tiers and long context): a prompt matters
        # only as at-or-under / above the threshold
        lc = entry.long_context
        short = entry.select(tiers[ti], 0)
        units += [short, short if lc is None else entry.select(tiers[ti], lc[0] + 1)]
        thresholds.append(_NEVER if lc is None else lc[0])
    above = pc.greater(prompt, pc.take(pa.array(thresholds, _U64), gid))
    sid = pc.add(pc.multiply(pc.cast(gid, _I64), 2), pc.cast(above, _I64))

    cols: dict[str, list] = {k: [] for k in ("has", "ok", "version", "tier", "max_total")}
    cols |= {f"{d}{x}": [] for d in _DIMS for x in ("", "_m")}
    exponents: list[int] = []
    per_millions: list[list[Decimal]] = []
    for unit in units:
        prices = [unit.of(d) for d in _DIMS] if unit else [Decimal(0)] * len(_DIMS)
        ok = all(_digits_ok(x) for x in prices)
        if not ok:
            prices = [Decimal(0)] * len(_DIMS)  # placeholder: these rows go to the reference
        cols["has"].append(unit is not None)
        cols["ok"].append(ok)
        cols["version"].append(unit.version if unit else "")
        cols["tier"].append(unit.tier if unit else "")
        per_million = [x * _TO_MILLION[d] for d, x in zip(_DIMS, prices, strict=True)]
        for d, x, xm in zip(_DIMS, prices, per_million, strict=True):
            cols[d].append(x)
            cols[f"{d}_m"].append(xm.scaleb(-6))  # per unit
        # Decimal adds the costs at the smallest exponent; an exact sum that keeps <= 28 digits there (and fits
        # Decimal(38, 18)) means no step rounded: each product's coefficient (count x the unit's) is at most
        # that sum's, and dividing by 1e6 (1e3, 1) only moves the exponent.
        min_exp = min(x.as_tuple().exponent for x in per_million)  # type: ignore[type-var]
        exponents.append(min_exp)  # type: ignore[arg-type]
        cols["max_total"].append(min(Decimal(10) ** 20, Decimal(10) ** (22 + min_exp)))
        per_millions.append(per_million)
    # The same prices (per 1M units) as integers at one scale for the batch, and the most units each may multiply
    # in uint64 with room for the sum of all: within those, every product and the sum stay below 10**28.
    scale = max(0, -min(exponents))
    for i, d in enumerate(_DIMS):
        ints = [int(pm[i].scaleb(scale)) for pm in per_millions]
        cols[f"{d}_max"] = [_U64_PART // u if u else _U64_PART for u in ints]
        cols[f"{d}_int"] = [u if u <= _U64_PART else 0 for u in ints]  # beyond: only 0 units take this way
    arrays = {
        "has": pa.array(cols["has"], _BOOL), "ok": pa.array(cols["ok"], _BOOL),
        "version": pa.array(cols["version"], _STR), "tier": pa.array(cols["tier"], _STR),
        **{d: pa.array(cols[d], _UNIT) for d in _DIMS},
        **{f"{d}_m": pa.array(cols[f"{d}_m"], _PER_UNIT) for d in _DIMS},
        "max_total": pa.array(cols["max_total"], pa.decimal256(40, 18)),
        **{f"{d}_{x}": pa.array(cols[f"{d}_{x}"], _U64) for d in _DIMS for x in ("int", "max")},
        **{f"{d}_any": any(cols[d]) for d in _DIMS},
        "scale": scale,
    }  # fmt: skip
    return sid, arrays


def _zeros(t: pa.DataType, n: int) -> pa.Array:
    """n zeros of a decimal type without a kernel (a decimal's zero is all-zero bytes)."""
    return pa.Array.from_buffers(t, n, [None, pa.py_buffer(bytes(t.byte_width * n))])


def _sum(arrays: list) -> Any:
    return reduce(pc.add, arrays)


def _fast_rows(table: pa.Table, index: np.ndarray, partitions: np.ndarray, offsets: np.ndarray, book: PriceBook,
               now: datetime, horizon_ms: int) -> tuple[pa.Table, np.ndarray]:  # fmt: skip
    """The priced rows for what passes every check, in row.SCHEMA, and which record indices they are."""
    ok, ms = _contract(table)
    ok = pc.and_(ok, pc.fill_null(pc.less_equal(ms, horizon_ms), False))  # from the future: the reference holds it
    t = table.filter(ok).combine_chunks()
    ms = pc.filter(ms, ok).combine_chunks()
    index = index[ok.to_numpy(zero_copy_only=False)]
    if not t.num_rows:
        return t, index

    served, requested = t["served_model"].chunk(0), t["requested_model"].chunk(0)
    model = pc.if_else(pc.equal(served, ""), requested, served)
    day = pc.divide(ms, _MS_PER_DAY)  # integer division; ms >= 0 here
    prompt, completion, cached, cw, cw1h = (t[c].chunk(0) for c in ("prompt_tokens", "completion_tokens",
                                            "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens"))  # fmt: skip
    web = pc.cast(t["web_search_requests"].chunk(0), _U64)
    gid, g = _groups(model, t["provider"].chunk(0), day, t["service_tier"].chunk(0), prompt, book)
    has = pc.take(g["has"], gid)
    charge = pc.and_(has, pc.invert(pc.is_in(t["status"].chunk(0), value_set=_FREE)))
    zero = pa.scalar(0, _U64)
    any_tokens = pc.or_(pc.not_equal(prompt, zero), pc.not_equal(completion, zero))
    # The input parts carved out of prompt_tokens, clipped in order (schemas/prices.py quantities).
    cached_eff = pc.min_element_wise(cached, prompt)
    rest = pc.subtract(prompt, cached_eff)
    cw_eff = pc.min_element_wise(cw, rest)
    rest = pc.subtract(rest, cw_eff)
    cw1h_eff = pc.min_element_wise(cw1h, rest)
    counts = {
        "input": pc.subtract(rest, cw1h_eff), "cached_input": cached_eff, "cache_write": cw_eff,
        "cache_write_1h": cw1h_eff, "output": completion,
        "request": pc.cast(any_tokens, _U64), "web_search": web,
    }  # fmt: skip
    tokens = {d: pc.if_else(charge, counts[d], zero) for d in _DIMS}
    priceable = pc.or_(pc.invert(has), pc.take(g["ok"], gid))
    if pc.all(reduce(pc.and_, [pc.less_equal(v, pc.take(g[f"{k}_max"], gid)) for k, v in tokens.items()])).as_py():
        # The common case: units x price-as-integer in uint64, then read as a decimal at the prices' scale.
        ints = {k: pc.multiply(v, pc.take(g[f"{k}_int"], gid)) for k, v in tokens.items()}
        ints["total"] = _sum([ints[d] for d in _DIMS])
        at_scale = pa.decimal128(38, g["scale"] + 6)
        # (a dimension the whole batch has none of, e.g. web searches in chat traffic, skips the decimal casts)
        costs = {k: pc.cast(pc.cast(v, pa.decimal128(20, 0)).view(at_scale), _COST) if pc.max(v).as_py() else
                 _zeros(_COST, len(v)) for k, v in ints.items()}  # fmt: skip
        total = costs.pop("total")
        keep = priceable
    else:
        # Counts too big for that: exact decimal256, and a bound on the sum's digits (see _groups).
        costs = {k: pc.multiply(pc.cast(v, _TOKENS), pc.take(g[f"{k}_m"], gid)) for k, v in tokens.items()}
        total = _sum([costs[d] for d in _DIMS])
        keep = pc.and_(priceable, pc.less(total, pc.take(g["max_total"], gid)))
    if not pc.all(keep).as_py():
        t, ms, gid, has, total, any_tokens = (x.filter(keep) for x in (t, ms, gid, has, total, any_tokens))
        costs = {k: v.filter(keep) for k, v in costs.items()}
        index = index[keep.to_numpy(zero_copy_only=False)]

    priced = pc.or_(has, pc.invert(any_tokens))  # no price and no tokens: "none", priced
    version = pc.if_else(has, pc.take(g["version"], gid), pc.if_else(any_tokens, "", "none"))
    tier = pc.if_else(has, pc.take(g["tier"], gid), "")
    zero_unit = pa.scalar(Decimal(0), _UNIT)
    units = {d: pc.if_else(has, pc.take(g[d], gid), zero_unit) if g[f"{d}_any"] else _zeros(_UNIT, t.num_rows)
             for d in _DIMS}  # fmt: skip
    now_ms = int(now.timestamp() * 1000)
    n = t.num_rows
    columns = {
        **{name: t[name] for name in SOURCE.names},
        **{name: pc.cast(t[name], SCHEMA.field(name).type) for name in _CASTS},
        **{name: pc.fill_null(t[name], stored) for name, stored in _STORED_NONE},
        "occurred_at": pc.cast(ms, _TS),
        "metadata": pa.MapArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], _STR),
                                            pa.array([], _STR), type=SCHEMA.field("metadata").type),
        "priced": priced, "price_version": version, "price_tier": tier,
        **{f"unit_{d}": units[d] for d in _DIMS}, **{f"cost_{d}": pc.cast(costs[d], _COST) for d in _DIMS},
        "cost_total": pc.cast(total, _COST),
        "kafka_partition": pa.array(partitions[index]), "kafka_offset": pa.array(offsets[index]),
        "ingested_at": pa.nulls(n, _TS),  # stamped per insert attempt (encode.ipc)
        "row_version": pc.if_else(priced, pa.scalar(row_version(True, now_ms), _U64),
                                  pa.scalar(row_version(False, now_ms), _U64)),
    }  # fmt: skip
    out = pa.Table.from_arrays([columns[name] for name in SCHEMA.names], schema=SCHEMA)
    return out, index
