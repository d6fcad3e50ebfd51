"""Pure quota and ROI arithmetic, and the proxy's quota gate, with no engine running."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.config import Limits, load_config
from schemas.control import KeyState, QuotaSignal, Snapshot, TeamState
from schemas.prices import UnitPrice
from services.billing.quota import QuotaBook, Usage, crossed_thresholds, exhausted_by
from services.billing.roi import RoiRow, compute
from services.proxy.draft import UsageDraft
from services.proxy.errors import QuotaExceeded
from services.proxy.quota import QuotaGate

CONFIG = load_config("tollway.yaml")
NOW = datetime(2026, 11, 15, tzinfo=UTC)


def test_book_counts_an_event_once_for_its_team_and_key():
    book = QuotaBook("2026-11")
    assert book.add("e1", "t", "k", 100, Decimal("0.5"), NOW)
    assert not book.add("e1", "t", "k", 100, Decimal("0.5"), NOW)  # redelivery
    assert book.get(("team", "t")).tokens == 100 and book.get(("key", "k")).usd == Decimal("0.5")


def test_reaching_a_limit_exactly_exhausts_it_and_thresholds_are_inclusive():
    book = QuotaBook("2026-11")
    book.add("e1", "t", "k", 800, Decimal("4"), NOW)
    u = book.get(("team", "t"))
    assert exhausted_by(u, Limits(tokens_per_month=801)) is None
    assert exhausted_by(u, Limits(tokens_per_month=800)) == "tokens_per_month"
    assert exhausted_by(u, Limits(budget_usd_per_month=Decimal("4"))) == "budget_usd_per_month"
    crossed = crossed_thresholds(u, Limits(budget_usd_per_month=Decimal("5")), [50, 80, 100])
    assert [(m, p) for m, p, _, _ in crossed] == [("budget_usd", 50), ("budget_usd", 80)]


def test_roi_savings_split_exactly_into_cache_routing_and_model_choice():
    own = UnitPrice("v", Decimal("0.40"), Decimal("1.60"), Decimal("0.10"))  # gpt-4.1-mini
    rows = [
        RoiRow(
            date(2026, 10, 3), "gpt-4.1-mini", "gpt-4.1-mini", "openai", "ok", own, 1, 1000, 0, 500, Decimal("0.0012")
        ),
        RoiRow(date(2026, 10, 3), "gpt-4.1-mini", "gpt-4.1-mini", "openai", "cached", own, 1, 1000, 0, 500, Decimal(0)),
        RoiRow(date(2026, 10, 3), "gpt-4.1", "gpt-4.1-mini", "openai", "ok", own, 1, 1000, 0, 500, Decimal("0.0012")),
    ]
    r = compute(rows, CONFIG, "team_x", "2026-10", NOW)
    # baseline: mini's baseline 2/8 for rows 1-2, gpt-4.1's own 2/8 for the routed row: 3 x 0.006
    assert r["baseline_cost_usd"] == "0.02" and r["actual_cost_usd"] == "0.00"
    b = r["savings_breakdown_usd"]
    assert (b["cache"], b["routing"]) == ("0.00", "0.00")  # fractions of a cent, rounded for display
    assert r["savings_pct"] == "86.67"


def gate_with(limit: int) -> tuple[QuotaGate, KeyState]:
    gate = QuotaGate(CONFIG, default_max_tokens=100)
    gate.on_control(TeamState(team_id="t", name="t", plan="enterprise"))
    key = KeyState(key_id="k", key_hash="h", prefix="p", team_id="t", limits=Limits(tokens_per_month=limit))
    return gate, key


def ended(fields: dict) -> UsageDraft:
    """A call's usage event as the proxy holds it when the call ends."""
    return UsageDraft(occurred_at=NOW, request_id="r", endpoint="chat.completions", **fields)


def body(max_tokens: int) -> dict:
    return {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def test_gate_reserves_worst_case_so_concurrent_calls_overshoot_by_at_most_one_reservation():
    gate, key = gate_with(1000)
    period = f"{datetime.now(UTC):%Y-%m}"
    gate.on_control(QuotaSignal(scope="key", id="k", state="ok", period=period, used_tokens=900))
    admitted = []
    for i in range(50):  # fifty concurrent calls: none has finished yet
        try:
            gate.admit(f"e{i}", key, body(50))
            admitted.append(i)
        except QuotaExceeded:
            pass
    worst, _ = gate.worst_case(body(50))
    assert len(admitted) == 100 // worst + (100 % worst > 0)
    for i in admitted:  # each used its whole worst case
        gate.settle(ended({"event_id": f"e{i}", "status": "ok", "prompt_tokens": worst - 50, "completion_tokens": 50,
                     "served_model": "gpt-4.1", "provider": "openai"}))  # fmt: skip
    used = 900 + worst * len(admitted)
    assert used - 1000 < worst  # the overshoot bound: one reservation
    with pytest.raises(QuotaExceeded):
        gate.admit("late", key, body(1))


def test_gate_obeys_signals_and_forgets_counted_events():
    gate, key = gate_with(10_000)
    period = f"{datetime.now(UTC):%Y-%m}"
    gate.admit("e1", key, body(10))
    gate.settle(ended({"event_id": "e1", "status": "ok", "prompt_tokens": 5, "completion_tokens": 10,
                 "served_model": "gpt-4.1", "provider": "openai"}))  # fmt: skip
    st = gate.states[("key", "k")]
    assert st.pending_tokens == 15
    gate.on_control(QuotaSignal(scope="key", id="k", state="ok", period=period, used_tokens=15, counted=["e1"]))
    assert st.pending_tokens == 0 and st.used(period)[0] == 15
    gate.on_control(QuotaSignal(scope="key", id="k", state="exhausted", period=period, used_tokens=10_000,
                                crossed_at=datetime.now(UTC)))  # fmt: skip
    with pytest.raises(QuotaExceeded) as err:
        gate.admit("e2", key, body(1))
    assert err.value.code == "insufficient_quota" and int(err.value.headers["retry-after"]) > 0
    gate.on_control(QuotaSignal(scope="key", id="k", state="ok", reason="restored", period=period, used_tokens=15))
    gate.admit("e3", key, body(1))  # a raised limit (restored) lets calls through again


def test_a_stale_exhausted_state_is_dropped_by_the_next_full_state():
    gate, key = gate_with(10_000)
    period = f"{datetime.now(UTC):%Y-%m}"
    gate.on_control(QuotaSignal(scope="key", id="k", state="exhausted", period=period))
    gate.on_control(Snapshot(published_at=NOW, keys=1, teams=1))
    gate.on_control(Snapshot(published_at=NOW, keys=1, teams=1))  # a restart that did not re-assert it
    gate.admit("e1", key, body(1))


def test_quota_view_projection_never_overflows_and_is_none_past_the_reset():
    from datetime import UTC, datetime
    from decimal import Decimal

    from schemas.config import Limits
    from services.billing.quota import Usage, quota_view

    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    # One token used all month against a huge limit: the naive projection is millennia away.
    tiny = quota_view(
        ("team", "t"),
        Usage(tokens=1, usd=Decimal("0.000001")),
        Limits(tokens_per_month=10**15, budget_usd_per_month=Decimal(10**9)),
        "2026-11",
        now,
        "ok",
        None,
    )
    assert tiny["projected_exhaustion_at"] is None
    fast = quota_view(("team", "t"), Usage(tokens=900, usd=Decimal(0)), Limits(tokens_per_month=1000), "2026-11", now,
                      "ok", None)  # fmt: skip
    assert fast["projected_exhaustion_at"] is not None


def test_gate_keeps_usage_billing_has_not_acknowledged_past_thirty_seconds(monkeypatch):
    gate, key = gate_with(1000)
    clock = [1000.0]
    monkeypatch.setattr("services.proxy.quota.time.monotonic", lambda: clock[0])
    gate.admit("e1", key, body(10))
    gate.settle(ended({"event_id": "e1", "status": "ok", "prompt_tokens": 990, "completion_tokens": 10,
                 "served_model": "gpt-4.1", "provider": "openai"}))  # fmt: skip
    clock[0] += 120  # billing is down: no acknowledgement for two minutes
    with pytest.raises(QuotaExceeded):
        gate.admit("e2", key, body(1))
    gate.on_control(QuotaSignal(scope="key", id="k", state="ok", period=f"{datetime.now(UTC):%Y-%m}", used_tokens=1000,
                                counted=["e1"]))  # fmt: skip
    assert gate.states[("key", "k")].pending_tokens == 0  # acknowledged: billing's total has it now
    with pytest.raises(QuotaExceeded):
        gate.admit("e3", key, body(1))


def test_gate_forgets_unacknowledged_usage_only_after_its_bound(monkeypatch):
    gate, key = gate_with(1000)
    clock = [1000.0]
    monkeypatch.setattr("services.proxy.quota.time.monotonic", lambda: clock[0])
    gate.admit("e1", key, body(10))
    gate.settle(ended({"event_id": "e1", "status": "ok", "prompt_tokens": 990, "completion_tokens": 10,
                 "served_model": "gpt-4.1", "provider": "openai"}))  # fmt: skip
    clock[0] += gate.pending_max_s + 1
    gate.admit("e2", key, body(1))
    assert gate.states[("key", "k")].pending_tokens == 0


T0 = datetime(2026, 11, 15, 12, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_book_converges_to_the_ledger_and_keeps_only_what_the_ledger_does_not_hold_yet():
    book = QuotaBook("2026-11")
    for i in range(3):
        assert book.add(f"e{i}", "t", "k", 100, Decimal("0.01"), at(i), counted_at=at(i))
    assert book.get(("team", "t")).tokens == 300
    # The ledger has e0 (and an adjustment the stream never saw); e1 and e2 are not written yet.
    out = book.converge({("team", "t"): Usage(100, Decimal("0.015"), 1), ("key", "k"): Usage(100, Decimal("0.015"), 1)},
                        {"e0"}, at(1), timedelta(seconds=60))  # fmt: skip
    assert (out.absorbed, out.dropped) == (1, 0) and out.changed == {("team", "t"), ("key", "k")}
    assert (book.get(("team", "t")).tokens, book.get(("team", "t")).usd) == (300, Decimal("0.035"))
    # The meter writes e2 and goes on writing for minutes; e1 never comes: it stops counting.
    led = Usage(200, Decimal("0.025"), 2)
    out = book.converge({("team", "t"): led, ("key", "k"): led}, {"e2"}, at(300), timedelta(seconds=60))
    assert (out.absorbed, out.dropped) == (1, 1) and not book.tail
    assert (book.get(("key", "k")).tokens, book.get(("key", "k")).usd) == (200, Decimal("0.025"))
    assert not book.add("e1", "t", "k", 100, Decimal("0.01"), at(1), counted_at=at(301))  # still a duplicate


def test_book_keeps_its_tail_while_the_meter_writes_nothing():
    book = QuotaBook("2026-11")
    book.add("e0", "t", "k", 100, Decimal("0.01"), at(0), counted_at=at(0))
    out = book.converge({}, set(), None, timedelta(seconds=60))  # no rows ingested: the meter is down
    assert out.dropped == 0 and book.get(("team", "t")).tokens == 100
    out = book.converge({}, set(), at(30), timedelta(seconds=60))
    assert out.dropped == 0 and not out.changed


def test_book_tail_is_bounded_and_what_overflows_counts_until_the_next_convergence():
    book = QuotaBook("2026-11", max_tail=2)
    for i in range(3):
        book.add(f"e{i}", "t", "k", 100, Decimal(0), at(i), counted_at=at(i))
    assert len(book.tail) == 2 and book.get(("team", "t")).tokens == 300
    out = book.converge({}, set(), None, timedelta(seconds=60))
    assert out.dropped == 1 and book.get(("team", "t")).tokens == 200


def test_gate_judges_in_billings_month_not_this_proxys_clock():
    gate, key = gate_with(1000)
    month = f"{datetime.now(UTC):%Y-%m}"
    gate.on_control(QuotaSignal(scope="key", id="k", state="exhausted", period=month, used_tokens=1000))
    gate.clock = lambda: datetime.now(UTC) + timedelta(days=40)  # this proxy's clock runs 40 days ahead
    with pytest.raises(QuotaExceeded):
        gate.admit("e1", key, body(1))
    # Billing silent for longer than BILLING_SILENT_S (down over the month's end): this clock rules.
    ahead = datetime.now(UTC) + timedelta(days=40)
    gate._billing_heard -= gate.BILLING_SILENT_S + 1
    assert gate.period(ahead) == f"{ahead:%Y-%m}"
    gate.clock = lambda: datetime.now(UTC)
    gate.on_control(QuotaSignal(scope="key", id="k", state="ok", reason="new_period",
                                period=f"{datetime.now(UTC) + timedelta(days=40):%Y-%m}"))  # fmt: skip
    gate.admit("e2", key, body(1))  # billing rolled: this proxy follows, though its clock lags


def test_worst_case_reserves_the_request_fee_and_the_web_searches_a_body_can_run():
    from services.proxy.tokens import worst_case_tokens

    gate, _ = gate_with(1000)
    entry = gate.prices.at("gpt-4.1", "*", datetime.now(UTC))
    assert entry.web_search > 0  # the shipped book prices gpt-4.1's web search tool calls
    searches = entry.web_search / 1000

    def tokens_only(b: dict) -> Decimal:  # the reservation of the same body without any search fee
        most = worst_case_tokens(b, gate.default_max_tokens)
        return entry.worst_case_usd(most.prompt_tokens, most.completion_tokens)

    anthropic = {**body(50), "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]}
    responses = {**body(50), "tools": [{"type": "function", "name": "f"}, {"type": "web_search_preview"}]}
    chat = {**body(50), "web_search_options": {}}
    assert gate.worst_case(anthropic)[1] == tokens_only(anthropic) + 3 * searches  # the tool's own cap
    assert gate.worst_case(responses)[1] == tokens_only(responses) + 10 * searches  # no cap: WEB_SEARCHES_RESERVED
    assert gate.worst_case(chat)[1] == tokens_only(chat) + searches  # a search model: one a call
    # hostile shapes reserve the default, never crash; a tool that is not a search adds nothing
    for tools in ([{"type": "web_search", "max_uses": -1}], [{"type": "web_search", "max_uses": True}]):
        b = {**body(50), "tools": tools}
        assert gate.worst_case(b)[1] == tokens_only(b) + 10 * searches
    b = {**body(50), "tools": [{"type": "web_search", "max_uses": 10**9}]}
    assert gate.worst_case(b)[1] == tokens_only(b) + 1000 * searches
    b = {**body(50), "tools": ["web_search", None, {"type": 7}]}
    assert gate.worst_case(b)[1] == tokens_only(b)
    # the request fee (every set's) is in every reservation, on top of the tokens at the dearest rates
    tokens, usd = gate.worst_case(body(50))
    most_in = max(max(u.input, u.cache_write, u.cache_write_1h, u.cached_input) for u in entry.units())
    most_out = max(u.output for u in entry.units())
    assert usd == ((tokens - 50) * most_in + 50 * most_out) / 1_000_000 + entry.request
    fee = entry.worst_case_usd(0, 0)
    assert fee == entry.request and entry.worst_case_usd(0, 0, 2) == fee + 2 * searches
