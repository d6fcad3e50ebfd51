"""The billed model (schemas/billed.py) is one rule: the ledger, the meter's hourly rollups and the dashboard
view of migration 020 all group a call under the model Python's `billed_model` names, on the real engine."""

from __future__ import annotations

from schemas.billed import billed_model
from schemas.clickhouse import Store, migrations
from schemas.periods import bounds
from services.billing import ledger
from services.meter.rollups import refresh_all
from tests.support.events import make_event
from tests.support.metered import PERIOD, meter, oct_


def test_every_sql_file_names_only_rules_the_migrator_fills_in():
    for version, name, sql in migrations():
        leftover = sql.replace("{db}", "")
        assert "{" not in leftover, f"{version:03d}_{name}.sql: unfilled placeholder"


async def test_ledger_rollups_and_dashboard_view_agree_with_the_python_rule(store: Store) -> None:
    team = "team-billed-model"
    # A rejected call never reached a model (served ''), a fallback was served by another model, and two
    # cache hits (the dashboard view's rows), one of each kind.
    events = [
        make_event(team, occurred_at=oct_(3), served_model="", requested_model="gpt-4.1", status="rejected",
                   http_status=429, prompt_tokens=0, completion_tokens=0),
        make_event(team, occurred_at=oct_(3), served_model="gpt-4.1-mini", requested_model="gpt-4.1"),
        make_event(team, occurred_at=oct_(4), served_model="", requested_model="gpt-4.1", status="cached",
                   cache_hit=True),
        make_event(team, occurred_at=oct_(4), served_model="gpt-4.1-mini", requested_model="gpt-4.1",
                   status="cached", cache_hit=True),
    ]  # fmt: skip
    await meter(store, events)
    await refresh_all(store)
    want = {billed_model(e.served_model, e.requested_model) for e in events}
    assert want == {"gpt-4.1", "gpt-4.1-mini"}  # the served model when there is one, else the requested one
    start, end = bounds(PERIOD)

    rows = await store.query(f"SELECT DISTINCT model FROM {ledger.effective_sql(team=True)} AS x",
                             {"start": start, "end": end, "team": team})  # fmt: skip
    assert {r[0] for r in rows} == want
    hourly = await store.query("SELECT model, sum(requests) FROM {db}.usage_hourly_v WHERE team_id = {t:String} "
                               "GROUP BY model", {"t": team})  # fmt: skip
    assert dict(hourly) == {"gpt-4.1": 2, "gpt-4.1-mini": 2}
    hits = await store.query("SELECT model, sum(cache_hits) FROM {db}.cache_savings_hourly WHERE team_id = {t:String} "
                             "GROUP BY model", {"t": team})  # fmt: skip
    assert dict(hits) == {"gpt-4.1": 1, "gpt-4.1-mini": 1}
