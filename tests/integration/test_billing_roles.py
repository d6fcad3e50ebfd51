"""Role isolation on every billing endpoint: a team key reads only its own team; finance reads every team
but writes nothing; admin does everything; no credential gets 401."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from schemas.clickhouse import Store
from schemas.config import load_config
from services.billing.app import create_app
from services.billing.settings import BillingSettings
from tests.support.billing import ADMIN, FINANCE

PERIOD = "2026-09"


@pytest.fixture
async def world(store: Store, bootstrap: str, unique: str) -> AsyncIterator[dict]:
    settings = BillingSettings(admin_token="admin-token-for-tests", finance_token="finance-token-for-tests",
                               quota_group=f"q-{unique}")  # fmt: skip
    app = create_app(settings, load_config("tollway.yaml"), store, bootstrap)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://billing") as c:
            teams, keys = {}, {}
            for name in ("a", "b"):
                teams[name] = (await c.post("/v1/admin/teams", json={"name": f"{name}-{unique}"}, headers=ADMIN)).json()
                keys[name] = (
                    await c.post("/v1/admin/keys", json={"team_id": teams[name]["team_id"]}, headers=ADMIN)
                ).json()
            r = await c.post("/v1/admin/invoices/finalize", json={"period": PERIOD, "team": teams["b"]["team_id"]},
                             headers=ADMIN)  # fmt: skip
            b_invoice = r.json()["data"][0]["invoice_id"]
            yield {"c": c, "teams": teams, "keys": keys, "b_invoice": b_invoice}


def as_key(world: dict, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world['keys'][name]['key']}"}


def reads_of_team_b(w: dict) -> list[tuple[str, str, dict]]:
    b, bk = w["teams"]["b"]["team_id"], w["keys"]["b"]["key_id"]
    return [
        ("GET", "/v1/usage", {"team": b}),
        ("GET", "/v1/usage", {"team": w["teams"]["b"]["name"], "group_by": "model"}),
        ("GET", "/v1/quota", {"team": b}),
        ("GET", "/v1/quota", {"key": bk}),
        ("GET", "/v1/invoices", {"team": b, "period": PERIOD}),
        ("GET", f"/v1/invoices/{w['b_invoice']}", {}),
        ("GET", f"/v1/invoices/draft_{b}_2026-10", {}),
        ("GET", "/v1/reports/roi", {"team": b, "period": PERIOD}),
    ]


def admin_endpoints(w: dict) -> list[tuple[str, str, dict | None]]:
    b, bk = w["teams"]["b"]["team_id"], w["keys"]["b"]["key_id"]
    return [
        ("POST", "/v1/admin/teams", {"name": "x"}),
        ("PATCH", f"/v1/admin/teams/{b}", {"limits": {"rpm": 1}}),
        ("POST", "/v1/admin/keys", {"team_id": b}),
        ("PATCH", f"/v1/admin/keys/{bk}", {"limits": {"rpm": 1}}),
        ("DELETE", f"/v1/admin/keys/{bk}", None),
        ("POST", "/v1/admin/invoices/finalize", {"period": PERIOD}),
    ]


async def test_a_team_key_never_reads_another_teams_data(world):
    c = world["c"]
    for method, path, params in reads_of_team_b(world):
        r = await c.request(method, path, params=params, headers=as_key(world, "a"))
        assert r.status_code in (403, 404), (path, params, r.status_code, r.text)
        assert world["teams"]["b"]["team_id"] not in r.text or r.status_code == 404
        assert "error" in r.json()
        # the same read as team b's own key works
        r = await c.request(method, path, params=params, headers=as_key(world, "b"))
        assert r.status_code == 200, (path, params, r.text)
    for path in ("/v1/admin/teams", "/v1/admin/keys"):
        assert (await c.get(path, headers=as_key(world, "a"))).status_code == 403


async def test_a_team_keys_unscoped_reads_cover_only_its_own_team(world):
    c, a = world["c"], world["teams"]["a"]["team_id"]
    h = as_key(world, "a")
    assert (await c.get("/v1/usage", headers=h)).json()["team_id"] == a
    q = (await c.get("/v1/quota", headers=h)).json()
    assert q["team"]["id"] == a and q["key"]["id"] == world["keys"]["a"]["key_id"]
    invoices = (await c.get("/v1/invoices", params={"period": PERIOD}, headers=h)).json()["data"]
    assert [i["team_id"] for i in invoices] == [a]
    assert (await c.get("/v1/reports/roi", params={"period": PERIOD}, headers=h)).json()["team_id"] == a


async def test_finance_reads_every_team_and_writes_nothing(world):
    c = world["c"]
    for method, path, params in reads_of_team_b(world):
        r = await c.request(method, path, params=params, headers=FINANCE)
        assert r.status_code == 200, (path, r.text)
    invoices = (await c.get("/v1/invoices", params={"period": PERIOD}, headers=FINANCE)).json()["data"]
    assert {i["team_id"] for i in invoices} >= {t["team_id"] for t in world["teams"].values()}
    for method, path, body in admin_endpoints(world):
        for who in (FINANCE, as_key(world, "a"), as_key(world, "b")):
            r = await c.request(method, path, json=body, headers=who)
            assert r.status_code == 403, (method, path, r.text)


async def test_no_credential_or_a_bad_one_is_401_everywhere(world):
    c = world["c"]
    calls = [(m, p, None, prm) for m, p, prm in reads_of_team_b(world)] + [
        (m, p, b, None) for m, p, b in admin_endpoints(world)
    ]
    for method, path, body, params in calls:
        for headers in ({}, {"Authorization": "Bearer tw-not-a-key"}):
            r = await c.request(method, path, json=body, params=params, headers=headers)
            assert r.status_code == 401, (method, path, r.text)
    for method, path, body in admin_endpoints(world):  # and the admin token can do them all
        r = await c.request(method, path, json=body, headers=ADMIN)
        assert r.status_code in (200, 201), (method, path, r.text)
