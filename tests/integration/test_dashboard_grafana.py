"""The provisioned Grafana dashboard: every panel's SQL runs on a real (embedded) ClickHouse with the
migrated schema, reads only dedup-aware sources, and counts a redelivered event once."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from schemas.clickhouse import Store
from schemas.config import load_config
from schemas.prices import PriceBook
from services.meter.reference import decode_and_price
from services.meter.rollups import refresh_all
from services.meter.writer import UsageWriter
from tests.support.events import make_event

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/dashboards/tollway-spend.json"
DATASOURCES = REPO / "deploy/grafana/provisioning/datasources/clickhouse.yaml"
# Sources a panel may read: the rollup views (built from FINAL) and the views of 020_dashboard_views.sql.
DEDUP_AWARE = {"usage_hourly_v", "usage_daily", "cache_savings_hourly", "unpriced_events_v", "teams_v", "api_keys_v"}
_CONDITIONAL_ALL = re.compile(r"\$__conditionalAll\((.*?),\s*\$team\)", re.S)


def render(sql: str, db: str, teams: list[str] | None) -> str:
    """Grafana's macros and the $team variable as plain SQL, the way the plugin expands them."""

    def cond(m: re.Match[str]) -> str:
        if teams is None:  # "All": the plugin drops the condition
            return "1 = 1"
        return m.group(1).replace("${team:singlequote}", ", ".join(f"'{t}'" for t in teams))

    sql = _CONDITIONAL_ALL.sub(cond, sql)
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        r"\1 >= toDateTime('2000-01-01 00:00:00', 'UTC') AND \1 <= toDateTime('2100-01-01 00:00:00', 'UTC')",
        sql,
    )
    sql = sql.replace("$__interval_s", "60")
    assert "$" not in sql, f"unexpanded macro or variable in:\n{sql}"
    return re.sub(r"\btollway\.", f"{db}.", sql)


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def by_title(title: str) -> str:
    (panel,) = [p for p in panels() if p["title"] == title]
    return panel["targets"][0]["rawSql"]


def test_panels_use_the_provisioned_clickhouse_source_and_dedup_aware_tables() -> None:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "grafana-clickhouse-datasource"
    for p in panels():
        for target in p["targets"]:
            assert target["datasource"] == {"type": source["type"], "uid": source["uid"]}, p["title"]
            assert target["editorType"] == "sql"
            sql = target["rawSql"]
            for table in re.findall(r"\btollway\.(\w+)(\s+FINAL)?", sql):
                assert table[0] in DEDUP_AWARE or table[1], f"{p['title']}: reads tollway.{table[0]} without FINAL"
    titles = {p["title"] for p in panels()}
    for wanted in (
        "Spend over time by team",
        "Spend by team",
        "Spend by model",
        "Spend by key",
        "Tokens over time",
        "Requests over time",
        "Cache hit rate and savings",
        "Unpriced events",
        "Unpriced events, latest",
    ):
        assert wanted in titles


async def _seed(store: Store) -> dict[str, Any]:
    """Two teams' calls (one redelivered, one cache hit, one with no price) through the meter's own path."""
    events = [
        make_event("team_a", key_id="key_a1"),
        make_event("team_a", key_id="key_a2", served_model="gpt-4.1-mini", requested_model="gpt-4.1-mini"),
        make_event("team_a", key_id="key_a1", status="cached", cache_hit=True),
        make_event("team_b", key_id="key_b1", served_model="mystery-model", requested_model="mystery-model"),
    ]
    values = [e.model_dump_json().encode() for e in events]
    values.append(values[0])  # redelivered: the same event again, at a later offset
    records = [SimpleNamespace(topic="tollway.usage.v1", partition=0, offset=i, key=b"k", value=v)
               for i, v in enumerate(values)]  # fmt: skip
    book = PriceBook(load_config(REPO / "tollway.yaml"))
    batch, dead = decode_and_price(records, book)
    assert not dead
    assert await UsageWriter(store).insert(batch, asyncio.Event())
    await store.insert_rows(
        "teams",
        [
            ["team_a", "acme", "team", "{}", events[0].occurred_at, 1],
            ["team_b", "globex", None, "{}", events[0].occurred_at, 1],
        ],
        ["team_id", "name", "plan", "limits", "created_at", "version"],
    )
    await refresh_all(store)
    # gpt-4.1: 100 in x $2 + 50 out x $8 per 1M; gpt-4.1-mini: x $0.40 / $1.60.
    return {"requests": 4, "spend": 0.0006 + 0.00012, "savings": 0.0006, "unpriced": 1}


async def test_every_panel_runs_and_counts_each_event_once(store: Store) -> None:
    expected = await _seed(store)
    for p in panels():
        for teams in (None, ["acme"], ["acme", "globex"]):
            await store.query(render(p["targets"][0]["rawSql"], store.db, teams))
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][0]["query"]["rawSql"]
    assert [r[0] for r in await store.query(render(variable, store.db, None))] == ["acme", "globex"]

    async def scalar(title: str, teams: list[str] | None = None) -> float:
        rows = await store.query(render(by_title(title), store.db, teams))
        return float(rows[0][0])

    assert await scalar("Requests") == expected["requests"]  # the redelivered event counts once
    assert await scalar("Spend") == pytest.approx(expected["spend"])
    assert await scalar("Cache savings") == pytest.approx(expected["savings"])
    assert await scalar("Cache hit rate", ["acme"]) == pytest.approx(1 / 3)
    assert await scalar("Unpriced events") == expected["unpriced"]
    assert await scalar("Unpriced events", ["acme"]) == 0
    by_team = await store.query(render(by_title("Spend by team"), store.db, None))
    assert {r[0]: r[2] for r in by_team} == {"acme": 3, "globex": 1}
    by_key = await store.query(render(by_title("Spend by key"), store.db, ["acme"]))
    assert {r[0] for r in by_key} == {"key_a1", "key_a2"}
    series = await store.query(render(by_title("Spend over time by model"), store.db, None))
    assert {r[1] for r in series} == {"gpt-4.1", "gpt-4.1-mini", "mystery-model"}
