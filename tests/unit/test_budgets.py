"""End-user and tag budgets, pure: the index both billing and the proxies read, the proxy's gate on them,
and billing's month-to-date book and daily spend for budgeted entities. No engine running."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from schemas.budgets import Budget, BudgetIndex, describe
from schemas.config import load_config
from schemas.control import KeyState, QuotaSignal, TeamState, decode, encode, message_key
from services.billing.quota import DailySpend, QuotaBook, Usage
from services.proxy.draft import UsageDraft
from services.proxy.errors import QuotaExceeded
from services.proxy.quota import QuotaGate

CONFIG = load_config("tollway.yaml")
ALICE = ("end_user", "t:alice")
APOLLO = ("tag", "t:project=apollo")


def body(max_tokens: int) -> dict:
    return {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def gate_and_key() -> tuple[QuotaGate, KeyState]:
    gate = QuotaGate(CONFIG, default_max_tokens=100)
    gate.on_control(TeamState(team_id="t", name="t", plan="enterprise"))
    return gate, KeyState(key_id="k", key_hash="h", prefix="p", team_id="t")


def ended(event_id: str, prompt: int, completion: int) -> UsageDraft:
    return UsageDraft(occurred_at=datetime.now(UTC), request_id="r", endpoint="chat.completions", event_id=event_id,
                      status="ok", prompt_tokens=prompt, completion_tokens=completion, served_model="gpt-4.1",
                      provider="openai")  # fmt: skip


def test_budget_shape_is_validated_and_bounded():
    for bad in (
        {"team_id": "t", "scope": "tag", "value": "apollo", "budget_usd_per_month": "1"},  # no tag name
        {"team_id": "t", "scope": "tag", "tag": "project", "budget_usd_per_month": "1"},  # no value
        {"team_id": "t", "scope": "end_user", "value": "alice"},  # no amount at all
        {"team_id": "t", "scope": "end_user", "tag": "x", "value": "a", "budget_usd_per_month": "1"},
        {"team_id": "t", "scope": "tag", "tag": "a=b", "value": "c", "budget_usd_per_month": "1"},  # '=' in name
        {"team_id": "t", "scope": "end_user", "value": "a", "budget_usd_per_month": "-1"},
        {"team_id": "t", "scope": "end_user", "value": "a", "budget_usd_per_month": "1000000001"},
        {"team_id": "t", "scope": "end_user", "value": "a", "budget_usd_per_month": "0.0000001"},
        {"team_id": "t", "scope": "end_user", "value": "a", "tokens_per_month": True},
        {"team_id": "t", "scope": "end_user", "value": "a" * 257, "tokens_per_month": 5},
        {"team_id": "t:x", "scope": "end_user", "value": "a", "tokens_per_month": 5},
    ):
        with pytest.raises(ValidationError):
            Budget(**bad)
    b = Budget(team_id="t", scope="tag", tag="project", value="apollo", budget_usd_per_month=Decimal("2.5"),
               daily_alert_usd=Decimal("1"))  # fmt: skip
    assert decode(encode(b)) == b and message_key(b) == b"budget:t:tag:project:apollo"
    assert b.entity() == APOLLO and describe(APOLLO) == {"tag": "project", "value": "apollo"}


def test_index_finds_own_budget_then_the_team_default_and_nothing_for_others():
    idx = BudgetIndex()
    assert idx.entities("t", "alice", {"project": "apollo"}) == []
    idx.put(Budget(team_id="t", scope="end_user", value="alice", tokens_per_month=10))
    idx.put(Budget(team_id="t", scope="tag", tag="project", value="apollo", tokens_per_month=20))
    got = idx.entities("t", "alice", {"project": "apollo", "env": "prod"})
    assert [(e, b.tokens_per_month) for e, b in got] == [(ALICE, 10), (APOLLO, 20)]
    assert idx.entities("t", "bob", {"project": "zeus"}) == []  # no budget: no entity
    assert idx.entities("other", "alice", {"project": "apollo"}) == []
    idx.put(Budget(team_id="t", scope="end_user", tokens_per_month=5))  # the team's default
    assert [(e, b.tokens_per_month) for e, b in idx.entities("t", "bob", {})] == [(("end_user", "t:bob"), 5)]
    assert idx.get(ALICE).tokens_per_month == 10  # her own beats the default
    idx.put(Budget(team_id="t", scope="end_user", value="alice", deleted=True))
    assert idx.get(ALICE).tokens_per_month == 5
    idx.put(Budget(team_id="t", scope="tag", tag="project", value="apollo", deleted=True))
    idx.put(Budget(team_id="t", scope="end_user", deleted=True))
    assert len(idx) == 0 and not idx.has_team("t") and idx.entities("t", "alice", {"project": "apollo"}) == []


def test_gate_rejects_an_exhausted_end_user_and_serves_others():
    gate, key = gate_and_key()
    period = f"{datetime.now(UTC):%Y-%m}"
    gate.on_control(Budget(team_id="t", scope="end_user", value="alice", tokens_per_month=1000))
    gate.admit("e0", key, body(10), "bob", {})
    assert not any(e[0] == "end_user" for e in gate.states)  # bob has no budget: no state for him
    gate.on_control(QuotaSignal(scope="end_user", id="t:alice", state="exhausted", period=period, used_tokens=1000,
                                crossed_at=datetime.now(UTC)))  # fmt: skip
    with pytest.raises(QuotaExceeded) as err:
        gate.admit("e1", key, body(10), "alice", {})
    assert err.value.code == "insufficient_quota" and "end user" in str(err.value)
    gate.admit("e2", key, body(10), "bob", {})
    gate.on_control(
        QuotaSignal(scope="end_user", id="t:alice", state="ok", reason="restored", period=period, used_tokens=10)
    )
    gate.admit("e3", key, body(10), "alice", {})


def test_gate_counts_a_tag_budget_locally_and_reserves_the_worst_case():
    gate, key = gate_and_key()
    gate.on_control(Budget(team_id="t", scope="tag", tag="project", value="apollo", tokens_per_month=300))
    tags = {"project": "apollo"}
    worst, _ = gate.worst_case(body(50))
    admitted = []
    for i in range(20):  # concurrent: none finished
        try:
            gate.admit(f"c{i}", key, body(50), None, tags)
            admitted.append(i)
        except QuotaExceeded:
            pass
    assert len(admitted) == 300 // worst + (300 % worst > 0)
    gate.admit("other", key, body(50), None, {"project": "zeus"})  # another value: not this budget
    for i in admitted:
        gate.settle(ended(f"c{i}", worst - 50, 50))
    with pytest.raises(QuotaExceeded):
        gate.admit("late", key, body(1), None, tags)
    assert gate.states[APOLLO].crossed_at is not None  # the crossing starts the lag clock, as for teams


def test_gate_keeps_budget_states_bounded_and_never_evicts_a_busy_or_exhausted_one():
    gate, key = gate_and_key()
    gate.BUDGET_STATES_MAX = 10
    period = f"{datetime.now(UTC):%Y-%m}"
    gate.on_control(Budget(team_id="t", scope="end_user", tokens_per_month=10**6))  # a default for everyone
    gate.on_control(QuotaSignal(scope="end_user", id="t:u0", state="exhausted", period=period))
    gate.admit("busy", key, body(10), "u1", {})  # in flight: reserved
    for i in range(2, 200):
        gate.admit(f"e{i}", key, body(10), f"u{i}", {})
        gate.settle(ended(f"e{i}", 5, 5))
        gate.on_control(QuotaSignal(scope="end_user", id=f"t:u{i}", state="ok", period=period, used_tokens=10,
                                    counted=[f"e{i}"]))  # fmt: skip
    budget_states = [e for e in gate.states if e[0] == "end_user"]
    assert len(budget_states) <= 10 + 4
    assert ("end_user", "t:u0") in gate.states and ("end_user", "t:u1") in gate.states
    with pytest.raises(QuotaExceeded):
        gate.admit("x", key, body(10), "u0", {})


def test_book_counts_budget_entities_and_converges_them_to_the_ledger():
    book = QuotaBook("2026-11")
    at = datetime(2026, 11, 15, tzinfo=UTC)
    assert book.add("e1", "t", "k", 100, Decimal("0.5"), at, budgets=(ALICE, APOLLO))
    assert not book.add("e1", "t", "k", 100, Decimal("0.5"), at, budgets=(ALICE, APOLLO))
    assert book.add("e2", "t", "k", 10, Decimal("0.1"), at, budgets=(APOLLO,))
    assert (book.get(ALICE).tokens, book.get(APOLLO).usd) == (100, Decimal("0.6"))
    # The ledger has e1 (and an older 40 tokens of alice's); e2 is still only in the tail.
    settled = {("team", "t"): Usage(140, Decimal("0.7")), ("key", "k"): Usage(140, Decimal("0.7")),
               ALICE: Usage(140, Decimal("0.7")), APOLLO: Usage(100, Decimal("0.5"))}  # fmt: skip
    done = book.converge(settled, {"e1"}, None, timedelta(seconds=300))
    assert book.get(ALICE).tokens == 140 and book.get(APOLLO).tokens == 110 and ALICE in done.changed
    daily = DailySpend("2026-11-15", {ALICE: Decimal("1")})
    daily.add(ALICE, Decimal("0.25"))
    assert daily.get(ALICE) == Decimal("1.25") and daily.get(APOLLO) == 0
