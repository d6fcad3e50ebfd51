"""Caller resolution: admin and finance tokens, team keys, and what each may read or write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.config import load_config
from services.billing.accounts import Accounts
from services.billing.auth import Caller, require_admin, require_staff, resolve, team_scope, token_from
from services.billing.errors import InvalidApiKey, PermissionDenied, TeamNotFound, UnknownPlan
from services.billing.settings import BillingSettings


class MemoryStore:
    """Stands in for ClickHouse where only the in-memory view is under test; records what was written."""

    db = "memory"

    def __init__(self) -> None:
        self.rows: dict[str, list[list[Any]]] = {}

    async def insert_rows(self, table: str, rows: list[list[Any]], column_names: Any) -> None:
        self.rows.setdefault(table, []).extend(rows)

    async def query_dicts(self, sql: str, parameters: Any = None) -> list[dict[str, Any]]:
        return []


SETTINGS = BillingSettings(admin_token="admin-secret-token", finance_token="finance-secret-token")


@pytest.fixture
async def accounts() -> Accounts:
    return Accounts(MemoryStore(), load_config("tollway.yaml"))  # type: ignore[arg-type]


def test_token_from_bearer_or_x_api_key():
    assert token_from("Bearer abc", None) == "abc"
    assert token_from("bearer  abc ", None) == "abc"
    assert token_from(None, "xyz") == "xyz"
    assert token_from("Bearer abc", "xyz") == "abc"
    assert token_from("Basic abc", None) is None
    assert token_from("Bearer ", None) is None
    assert token_from(None, "  ") is None


async def test_service_tokens_resolve_to_their_roles(accounts: Accounts):
    assert resolve("admin-secret-token", SETTINGS, accounts) == Caller(role="admin")
    assert resolve("finance-secret-token", SETTINGS, accounts) == Caller(role="finance")


async def test_missing_or_wrong_token_is_invalid_api_key(accounts: Accounts):
    for token in (None, "", "admin-secret-toke", "admin-secret-token ", "tw-nope"):
        with pytest.raises(InvalidApiKey) as e:
            resolve(token, SETTINGS, accounts)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"


async def test_unset_service_tokens_grant_nothing(accounts: Accounts):
    bare = BillingSettings(admin_token=None, finance_token="")
    with pytest.raises(InvalidApiKey):
        resolve("", bare, accounts)
    with pytest.raises(InvalidApiKey):
        resolve("anything", bare, accounts)


async def test_team_key_resolves_to_its_team_until_revoked(accounts: Accounts):
    team = await accounts.create_team("alpha")
    secret, key = await accounts.create_key(team.team_id)
    caller = resolve(secret, SETTINGS, accounts)
    assert caller == Caller(role="team", team_id=team.team_id, key_id=key.key_id)
    await accounts.revoke_key(key.key_id)
    with pytest.raises(InvalidApiKey):
        resolve(secret, SETTINGS, accounts)


async def test_expired_key_is_rejected(accounts: Accounts):
    team = await accounts.create_team("alpha")
    secret, key = await accounts.create_key(team.team_id, expires_at=datetime.now(UTC) + timedelta(hours=1))
    assert accounts.authenticate(secret) is not None
    # Expiry is checked at use, not only at creation: age the key in place.
    accounts._keys[key.key_id] = key.model_copy(update={"expires_at": datetime.now(UTC) - timedelta(seconds=1)})
    assert accounts.authenticate(secret) is None


async def test_store_never_receives_the_secret(accounts: Accounts):
    team = await accounts.create_team("alpha")
    secret, key = await accounts.create_key(team.team_id, metadata={"project": "x"})
    written = repr(accounts._store.rows)  # type: ignore[attr-defined]
    assert secret not in written
    assert key.key_hash in written
    assert secret not in key.model_dump_json()


async def test_unknown_plan_is_a_clear_error(accounts: Accounts):
    with pytest.raises(UnknownPlan, match=r"'gold'.*known: enterprise, free, team"):
        await accounts.create_team("alpha", plan="gold")
    team = await accounts.create_team("alpha", plan="free")
    with pytest.raises(UnknownPlan):
        await accounts.create_key(team.team_id, plan="gold")


async def test_admin_only_and_staff_only(accounts: Accounts):
    admin, finance, team = Caller("admin"), Caller("finance"), Caller("team", "team_x", "key_x")
    assert require_admin(admin) is admin
    for c in (finance, team):
        with pytest.raises(PermissionDenied):
            require_admin(c)
    assert require_staff(finance) is finance
    with pytest.raises(PermissionDenied) as e:
        require_staff(team)
    assert e.value.status == 403 and e.value.code == "permission_denied"


async def test_team_scope_pins_a_team_key_to_its_own_team(accounts: Accounts):
    a = await accounts.create_team("alpha")
    b = await accounts.create_team("beta")
    caller = Caller("team", a.team_id, "key_a")
    assert team_scope(caller, None, accounts) == a.team_id
    assert team_scope(caller, a.team_id, accounts) == a.team_id
    assert team_scope(caller, "alpha", accounts) == a.team_id
    for other in (b.team_id, "beta", "no-such-team"):
        with pytest.raises(PermissionDenied):
            team_scope(caller, other, accounts)


async def test_team_scope_lets_staff_pick_any_team_or_all(accounts: Accounts):
    a = await accounts.create_team("alpha")
    b = await accounts.create_team("beta")
    for role in ("admin", "finance"):
        caller = Caller(role)  # type: ignore[arg-type]
        assert team_scope(caller, None, accounts) is None
        assert team_scope(caller, a.team_id, accounts) == a.team_id
        assert team_scope(caller, "beta", accounts) == b.team_id
        with pytest.raises(TeamNotFound):
            team_scope(caller, "no-such-team", accounts)
