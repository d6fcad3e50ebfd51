"""`GET /dashboard` and `GET /v1/dashboard/data` on a real billing app, broker and ClickHouse engine:
the page ships its own assets, the data agrees with `/v1/usage`, dedup holds, and a team sees only itself."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from services.meter.rollups import refresh_all
from tests.support.billing import ADMIN, FINANCE
from tests.support.events import make_event
from tests.support.metered import expected, meter, month, oct_

COLUMNS = (
    "event_id", "occurred_at", "request_id", "team_id", "key_id", "endpoint", "requested_model", "served_model",
    "provider", "status", "http_status", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_hit",
    "priced", "price_version", "unit_input", "unit_output", "unit_cached_input", "cost_total", "ingested_at",
    "row_version",
)  # fmt: skip


def row(team_id: str, key_id: str, when: datetime, *, model: str = "gpt-4.1", cost: str = "0.0006",
        cached: bool = False, priced: bool = True, event_id: uuid.UUID | None = None) -> list[Any]:  # fmt: skip
    return [
        event_id or uuid.uuid4(), when, "req", team_id, key_id, "chat.completions", model, model, "openai",
        "cached" if cached else "ok", 200, 100, 50, 0, cached, priced, "v" if priced else "",
        Decimal("2") if priced else Decimal(0), Decimal("8") if priced else Decimal(0), Decimal("0.5"),
        Decimal(0) if cached or not priced else Decimal(cost), datetime.now(UTC), 1,
    ]  # fmt: skip


async def new_team(billing: httpx.AsyncClient, name: str) -> tuple[str, dict[str, Any]]:
    team = (await billing.post("/v1/admin/teams", json={"name": name}, headers=ADMIN)).json()
    key = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"], "name": "ci"}, headers=ADMIN)).json()
    return team["team_id"], key


async def test_the_page_and_its_assets_are_served_from_the_package_with_a_strict_policy(billing) -> None:
    page = await billing.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert page.headers["cache-control"] == "no-store"
    assert 'id="login-form"' in page.text and "http://" not in page.text and "https://" not in page.text
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "css"), ("chart.umd.min.js", "javascript")):
        asset = await billing.get(f"/dashboard/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"], name
    assert "Chart.js v4" in (await billing.get("/dashboard/static/chart.umd.min.js")).text[:200]
    for bad in ("../app.py", "dashboard.html.bak", "%2e%2e%2fapp.py"):
        assert (await billing.get(f"/dashboard/static/{bad}")).status_code in (400, 404), bad


async def test_data_needs_a_token(billing) -> None:
    r = await billing.get("/v1/dashboard/data")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_data_matches_usage_counts_each_event_once_and_flags_unpriced(billing, store, unique) -> None:
    team_a, key_a = await new_team(billing, f"dash-a-{unique}")
    team_b, key_b = await new_team(billing, f"dash-b-{unique}")
    now = datetime.now(UTC).replace(microsecond=0)
    dup = uuid.uuid4()
    rows = [
        row(team_a, key_a["key_id"], now - timedelta(hours=2), event_id=dup),
        row(team_a, key_a["key_id"], now - timedelta(hours=2), event_id=dup),  # redelivered
        row(team_a, key_a["key_id"], now - timedelta(hours=1), model="gpt-4.1-mini", cost="0.00012"),
        row(team_a, key_a["key_id"], now - timedelta(minutes=5), cached=True),
        row(team_b, key_b["key_id"], now - timedelta(hours=30), model="mystery", priced=False),
    ]
    await store.insert_rows("usage_events", rows, COLUMNS)
    await refresh_all(store)
    window = {"from": (now - timedelta(days=2)).isoformat().replace("+00:00", "Z")}

    staff = (await billing.get("/v1/dashboard/data", params=window, headers=FINANCE)).json()
    assert staff["role"] == "finance" and staff["team_id"] is None and staff["granularity"] == "hour"
    assert staff["totals"]["requests"] == 4  # the redelivered event counts once
    assert Decimal(staff["totals"]["cost_usd"]) == Decimal("0.00072")
    assert Decimal(staff["totals"]["cache_savings_usd"]) == Decimal("0.0006")  # 100 x $2 + 50 x $8 per 1M
    assert staff["totals"]["cache_hit_rate"] == pytest.approx(1 / 4)
    # "mystery" is not in the config: staff views show such names as one bucket (issue 17, item 7).
    assert staff["unpriced"] == {"requests": 1, "models": [{"model": "(unknown)", "requests": 1, "tokens": 150}]}
    assert {t["name"] for t in staff["by_team"]} == {f"dash-a-{unique}", f"dash-b-{unique}"}
    assert sum(p["requests"] for p in staff["series"]) == 4
    assert len(staff["series"]) in (48, 49)  # every hour of the two days, empty ones as zeros
    usage = (await billing.get("/v1/usage", params=window, headers=FINANCE)).json()
    assert usage["totals"]["requests"] == staff["totals"]["requests"]
    assert Decimal(usage["totals"]["cost_usd"]) == Decimal(staff["totals"]["cost_usd"])

    mine = (await billing.get("/v1/dashboard/data", params=window,
                              headers={"Authorization": f"Bearer {key_a['key']}"})).json()  # fmt: skip
    assert mine["role"] == "team" and mine["team_id"] == team_a
    assert [t["team_id"] for t in mine["teams"]] == [team_a]
    assert [t["team_id"] for t in mine["by_team"]] == [team_a]
    assert mine["unpriced"]["requests"] == 0
    assert {k["key_id"]: (k["prefix"], k["name"]) for k in mine["by_key"]} == {key_a["key_id"]: (key_a["prefix"], "ci")}
    other = await billing.get("/v1/dashboard/data", params={"team": team_b},
                              headers={"Authorization": f"Bearer {key_a['key']}"})  # fmt: skip
    assert other.status_code == 403

    month = (await billing.get("/v1/dashboard/data", params={"from": (now - timedelta(days=40)).date().isoformat(),
                                                               "team": team_b}, headers=ADMIN)).json()  # fmt: skip
    assert month["granularity"] == "day" and month["totals"]["unpriced_requests"] == 1


async def test_models_the_config_does_not_know_are_one_bucket_and_spend_is_the_ledgers(billing, store, unique) -> None:
    tid, _ = await new_team(billing, f"dash-u-{unique}")
    made_up = make_event(tid, occurred_at=oct_(23), status="rejected", http_status=404, requested_model="gpt-9-pro",
                         served_model="", provider="", prompt_tokens=0, completion_tokens=0)  # fmt: skip
    events = [*month(tid), made_up]
    await meter(store, events)
    await refresh_all(store)
    dash = (await billing.get("/v1/dashboard/data", params={"team": tid, "from": "2026-10-01", "to": "2026-10-31"},
                              headers=FINANCE)).json()  # fmt: skip
    models = {m["model"]: m for m in dash["by_model"]}
    assert set(models) == {"gpt-4.1", "gpt-4.1-mini", "(unknown)"}
    assert models["(unknown)"]["requests"] == 2  # "no-such-model" and "gpt-9-pro", as one row
    assert Decimal(dash["totals"]["cost_usd"]) == expected(events, after_rerate=False)
    assert sum(Decimal(m["cost_usd"]) for m in dash["by_model"]) == Decimal(dash["totals"]["cost_usd"])
