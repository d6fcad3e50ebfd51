"""Admin API against real engines: teams and keys persist, reload, and never expose a secret after creation."""

from __future__ import annotations

import httpx
import pytest

from schemas.config import load_config
from schemas.keys import hash_key
from services.billing.accounts import Accounts
from tests.support.billing import ADMIN, FINANCE


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "code"}
    assert err["code"] == code and err["message"]
    return err


async def test_team_and_key_created_via_api_reload_from_the_store(billing, store, unique):
    r = await billing.post(
        "/v1/admin/teams", json={"name": f"acme-{unique}", "plan": "free", "limits": {"rpm": 7}}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    team = r.json()
    assert team["name"] == f"acme-{unique}" and team["plan"] == "free" and team["limits"] == {"rpm": 7}
    r = await billing.post(
        "/v1/admin/keys",
        json={
            "team_id": team["team_id"],
            "name": "ci",
            "limits": {"budget_usd_per_month": "12.5"},
            "metadata": {"project": "search"},
            "expires_at": "2099-01-01T00:00:00Z",
        },
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert set(created) == {
        "key", "key_id", "team_id", "prefix", "name", "plan", "limits", "expires_at", "metadata",
        "published", "will_retry",
    }  # fmt: skip
    assert created["published"] is True and created["will_retry"] is False
    assert created["key"].startswith("tw-") and created["prefix"] == created["key"][:10] + "..."
    assert created["limits"] == {"budget_usd_per_month": "12.5"}
    assert created["expires_at"] == "2099-01-01T00:00:00Z"

    fresh = Accounts(store, load_config("tollway.yaml"))
    await fresh.load()
    reloaded_team = fresh.find_team(f"acme-{unique}")
    assert reloaded_team is not None and reloaded_team.team_id == team["team_id"]
    assert reloaded_team.plan == "free" and reloaded_team.limits.rpm == 7
    key = fresh.authenticate(created["key"])
    assert key is not None and key.key_id == created["key_id"]
    assert str(key.limits.budget_usd_per_month) == "12.5"
    assert key.metadata == {"project": "search"} and key.name == "ci"
    assert key.expires_at is not None and key.expires_at.year == 2099


async def test_revoke_survives_a_reload(billing, store, unique):
    team = (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)).json()
    key = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
    r = await billing.delete(f"/v1/admin/keys/{key['key_id']}", headers=ADMIN)
    assert r.status_code == 200
    assert r.json() == {"key_id": key["key_id"], "revoked": True, "published": True, "will_retry": False}

    fresh = Accounts(store, load_config("tollway.yaml"))
    await fresh.load()
    assert fresh.authenticate(key["key"]) is None
    assert fresh.get_key(key["key_id"]).revoked  # type: ignore[union-attr]
    # Two versions were written; FINAL reads only the latest.
    rows = await store.query(
        "SELECT count() FROM {db}.api_keys WHERE key_id = {k:String}", parameters={"k": key["key_id"]}
    )
    assert rows[0][0] == 2
    assert_error(await billing.delete("/v1/admin/keys/key_nope", headers=ADMIN), 404, "key_not_found")


async def test_secret_is_returned_once_and_never_listed_or_stored(billing, store, unique):
    team = (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)).json()
    created = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
    secret = created["key"]

    for query in ("", f"?team={team['team_id']}", f"?team=t-{unique}"):
        r = await billing.get(f"/v1/admin/keys{query}", headers=ADMIN)
        assert r.status_code == 200
        listed = r.json()["data"]
        assert [k["key_id"] for k in listed] == [created["key_id"]]
        assert secret not in r.text and hash_key(secret) not in r.text
        assert "key" not in listed[0] and "key_hash" not in listed[0]

    stored = await store.query("SELECT * FROM {db}.api_keys")
    assert secret not in repr(stored) and hash_key(secret) in repr(stored)


async def test_list_teams_filters_by_name(billing, unique):
    for name in (f"a-{unique}", f"b-{unique}"):
        assert (await billing.post("/v1/admin/teams", json={"name": name}, headers=ADMIN)).status_code == 201
    all_teams = (await billing.get("/v1/admin/teams", headers=ADMIN)).json()["data"]
    assert [t["name"] for t in all_teams] == [f"a-{unique}", f"b-{unique}"]
    only_b = (await billing.get("/v1/admin/teams", params={"name": f"b-{unique}"}, headers=FINANCE)).json()
    assert [t["name"] for t in only_b["data"]] == [f"b-{unique}"]
    assert all_teams[0]["plan"] == "team"  # the config's default_plan


async def test_duplicate_team_name_is_a_conflict(billing, unique):
    assert (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)).status_code == 201
    assert_error(await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN), 409, "conflict")


async def test_finance_reads_but_cannot_write(billing, unique):
    assert_error(
        await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=FINANCE), 403, "permission_denied"
    )
    team = (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)).json()
    assert_error(
        await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=FINANCE),
        403,
        "permission_denied",
    )
    key = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
    assert_error(await billing.delete(f"/v1/admin/keys/{key['key_id']}", headers=FINANCE), 403, "permission_denied")
    assert (await billing.get("/v1/admin/keys", headers=FINANCE)).status_code == 200


async def test_team_keys_and_strangers_cannot_use_admin_endpoints(billing, unique):
    team = (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)).json()
    key = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
    as_team = {"X-API-Key": key["key"]}
    assert_error(await billing.get("/v1/admin/keys", headers=as_team), 403, "permission_denied")
    assert_error(
        await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=as_team),
        403,
        "permission_denied",
    )
    err = assert_error(await billing.get("/v1/admin/teams"), 401, "invalid_api_key")
    assert err["type"] == "invalid_request_error"
    assert_error(
        await billing.get("/v1/admin/teams", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key"
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        # A body that parses but holds a bad value is 422 (naming the field); a rule billing checks itself
        # (unknown plan, expiry in the past) stays 400.
        ("/v1/admin/teams", {"name": ""}, 422, "invalid_request_error"),
        ("/v1/admin/teams", {"name": 5}, 422, "invalid_request_error"),
        ("/v1/admin/teams", {"name": "x", "plan": "gold"}, 400, "unknown_plan"),
        ("/v1/admin/teams", {"name": "x", "limits": {"rpm": 0}}, 422, "invalid_request_error"),
        ("/v1/admin/teams", {"name": "x", "limits": {"rpz": 1}}, 422, "invalid_request_error"),
        ("/v1/admin/teams", {"name": "x", "owner": "me"}, 422, "invalid_request_error"),
        ("/v1/admin/keys", {}, 422, "invalid_request_error"),
        ("/v1/admin/keys", {"team_id": "TEAM", "expires_at": "next week"}, 422, "invalid_request_error"),
        ("/v1/admin/keys", {"team_id": "TEAM", "expires_at": "2001-01-01T00:00:00Z"}, 400, "invalid_request_error"),
        ("/v1/admin/keys", {"team_id": "TEAM", "plan": "gold"}, 400, "unknown_plan"),
        ("/v1/admin/keys", {"team_id": "TEAM", "metadata": {"n": 1}}, 422, "invalid_request_error"),
    ],
)
async def test_bad_admin_input_is_a_4xx_in_openai_shape(billing, unique, path, body, status, code):
    team = (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)).json()
    if body.get("team_id") == "TEAM":
        body = {**body, "team_id": team["team_id"]}
    err = assert_error(await billing.post(path, json=body, headers=ADMIN), status, code)
    assert err["type"] == "invalid_request_error"


async def test_malformed_json_unknown_team_and_unknown_route_are_not_500s(billing):
    r = await billing.post(
        "/v1/admin/teams", content=b"{not json", headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert_error(r, 400, "invalid_request_error")
    assert_error(
        await billing.post("/v1/admin/keys", json={"team_id": "team_nope"}, headers=ADMIN), 404, "team_not_found"
    )
    assert_error(await billing.get("/v1/nope", headers=ADMIN), 404, "not_found")


async def test_health_and_metrics(billing, unique):
    assert (await billing.get("/healthz")).json() == {"status": "ok"}
    await billing.post("/v1/admin/teams", json={"name": f"t-{unique}"}, headers=ADMIN)
    text = (await billing.get("/metrics")).text
    assert 'tollway_billing_admin_writes_total{operation="create_team"}' in text
    assert "tollway_billing_control_messages_total" in text
