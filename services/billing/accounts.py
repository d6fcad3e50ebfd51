"""Teams and API keys: the in-memory view billing serves from, persisted to ClickHouse on every change.

Rows live in ReplacingMergeTree(version) tables: each change writes the whole row with a larger version,
and reads use FINAL, so the latest write of an entity wins. Only the SHA-256 of a key secret is kept.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import structlog
from pydantic import ValidationError

from schemas.clickhouse import Store
from schemas.config import GatewayConfig, Limits
from schemas.control import KeyState, TeamState
from schemas.keys import display_prefix, hash_key, new_id, new_secret
from services.billing import metrics, plan_history
from services.billing.errors import Conflict, InvalidRequest, KeyNotFound, TeamNotFound, UnknownPlan

log = structlog.get_logger("tollway.billing")

TEAM_COLUMNS = ("team_id", "name", "plan", "limits", "created_at", "version")
KEY_COLUMNS = (
    "key_id",
    "key_hash",
    "prefix",
    "team_id",
    "name",
    "plan",
    "limits",
    "metadata",
    "expires_at",
    "revoked",
    "created_at",
    "version",
)


def as_utc(value: datetime) -> datetime:
    """ClickHouse hands back naive UTC; callers may send naive times. Both mean UTC here."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _limits_json(limits: Limits) -> str:
    return limits.model_dump_json(exclude_none=True)


def stored_limits(raw: str | None, table: str, entity_id: str) -> Limits:
    """A stored row's limits, field by field: a field billing cannot use (out of today's bounds, written
    before they existed) is logged, counted and left out, so the plan's limit applies to it. A start never
    dies on one bad row, and no field silently becomes "unlimited" beyond what the plan says."""
    try:
        data = json.loads(raw or "{}")  # stdlib json: reads ints of any size, so the bad field can be named
    except ValueError:
        data = None
    if not isinstance(data, dict):
        _unusable(table, entity_id, "limits", "not a JSON object")
        return Limits()
    kept: dict[str, object] = {}
    for name, value in data.items():
        try:
            Limits.model_validate({name: value})
        except ValidationError as err:
            _unusable(table, entity_id, f"limits.{name}", err.errors()[0].get("msg", "invalid"))
            continue
        kept[name] = value
    return Limits.model_validate(kept)


def _unusable(table: str, entity_id: str, field: str, why: str) -> None:
    metrics.STORED_UNUSABLE.labels(table=table, field=field.split(".")[0]).inc()
    log.error("stored_row_unusable", table=table, id=entity_id, field=field, reason=why)


class Accounts:
    """Teams by id, keys by id and by hash. Writes persist first, then change memory."""

    def __init__(self, store: Store, config: GatewayConfig) -> None:
        self._store = store
        self._config = config
        self._teams: dict[str, TeamState] = {}
        self._keys: dict[str, KeyState] = {}
        self._by_hash: dict[str, str] = {}
        self._created: dict[str, datetime] = {}
        self._versions: dict[str, int] = {}
        # Serialises writes: name uniqueness is checked and claimed without a race.
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        teams = await self._store.query_dicts(f"SELECT {', '.join(TEAM_COLUMNS)} FROM {{db}}.teams FINAL")
        keys = await self._store.query_dicts(f"SELECT {', '.join(KEY_COLUMNS)} FROM {{db}}.api_keys FINAL")
        self._teams.clear()
        self._keys.clear()
        self._by_hash.clear()
        for row in teams:
            try:
                team = TeamState(
                    team_id=row["team_id"],
                    name=row["name"],
                    plan=row["plan"],
                    limits=stored_limits(row["limits"], "teams", row["team_id"]),
                )
                self._remember_team(team, as_utc(row["created_at"]), row["version"])
            except (ValidationError, ValueError, TypeError, KeyError) as err:
                _unusable("teams", str(row.get("team_id")), "row", str(err)[:200])
        for row in keys:
            try:
                key = KeyState(
                    key_id=row["key_id"],
                    key_hash=row["key_hash"],
                    prefix=row["prefix"],
                    team_id=row["team_id"],
                    name=row["name"],
                    plan=row["plan"],
                    limits=stored_limits(row["limits"], "api_keys", row["key_id"]),
                    metadata=dict(row["metadata"] or {}),
                    expires_at=as_utc(row["expires_at"]) if row["expires_at"] is not None else None,
                    revoked=bool(row["revoked"]),
                )
                self._remember_key(key, as_utc(row["created_at"]), row["version"])
            except (ValidationError, ValueError, TypeError, KeyError) as err:
                _unusable("api_keys", str(row.get("key_id")), "row", str(err)[:200])
        log.info("accounts_loaded", teams=len(self._teams), keys=len(self._keys))

    # -- reads -------------------------------------------------------------------------------------

    def teams(self) -> list[TeamState]:
        return sorted(self._teams.values(), key=lambda t: (self._created[t.team_id], t.team_id))

    def keys(self, team_id: str | None = None) -> list[KeyState]:
        found = (k for k in self._keys.values() if team_id is None or k.team_id == team_id)
        return sorted(found, key=lambda k: (self._created[k.key_id], k.key_id))

    def find_team(self, id_or_name: str) -> TeamState | None:
        if id_or_name in self._teams:
            return self._teams[id_or_name]
        return next((t for t in self._teams.values() if t.name == id_or_name), None)

    def get_key(self, key_id: str) -> KeyState | None:
        return self._keys.get(key_id)

    def authenticate(self, secret: str) -> KeyState | None:
        """The live key for a secret; None when unknown, revoked or expired."""
        key_id = self._by_hash.get(hash_key(secret))
        key = self._keys.get(key_id) if key_id else None
        if key is None or key.revoked:
            return None
        if key.expires_at is not None and key.expires_at <= datetime.now(UTC):
            return None
        return key

    # -- writes ------------------------------------------------------------------------------------

    async def create_team(self, name: str, plan: str | None = None, limits: Limits | None = None) -> TeamState:
        name = name.strip()
        if not name:
            raise InvalidRequest("name: must not be empty")
        plan = self._check_plan(plan) or self._config.default_plan
        async with self._lock:
            if self.find_team(name) is not None:
                raise Conflict(f"a team named {name!r} already exists")
            team = TeamState(team_id=new_id("team"), name=name, plan=plan, limits=limits or Limits())
            created = _now()
            version = self._next_version(team.team_id)
            await self._store.insert_rows(
                "teams",
                [[team.team_id, team.name, team.plan, _limits_json(team.limits), created, version]],
                TEAM_COLUMNS,
            )
            await plan_history.record(self._store, "team", team.team_id, team.team_id, plan, created)
            self._remember_team(team, created, version)
        log.info("team_created", team_id=team.team_id, plan=team.plan)
        return team

    async def create_key(
        self,
        team_id: str,
        name: str | None = None,
        plan: str | None = None,
        expires_at: datetime | None = None,
        limits: Limits | None = None,
        metadata: dict[str, str] | None = None,
    ) -> tuple[str, KeyState]:
        """A new key and its secret: the caller hands the secret out once, and nothing keeps it."""
        if team_id not in self._teams:
            raise TeamNotFound(f"no team with id {team_id!r}")
        plan = self._check_plan(plan)
        if expires_at is not None:
            expires_at = as_utc(expires_at)
            if expires_at <= datetime.now(UTC):
                raise InvalidRequest("expires_at: must be in the future")
        secret = new_secret()
        key = KeyState(
            key_id=new_id("key"),
            key_hash=hash_key(secret),
            prefix=display_prefix(secret),
            team_id=team_id,
            name=name,
            plan=plan,
            limits=limits or Limits(),
            metadata=metadata or {},
            expires_at=expires_at,
        )
        async with self._lock:
            created = _now()
            await self._write_key(key, created)
            if plan is not None:
                await plan_history.record(self._store, "key", key.key_id, team_id, plan, created)
        log.info("key_created", key_id=key.key_id, team_id=team_id, prefix=key.prefix, plan=plan)
        return secret, key

    async def revoke_key(self, key_id: str) -> KeyState:
        """Idempotent: revoking a revoked key rewrites nothing and returns it as it is."""
        async with self._lock:
            current = self._keys.get(key_id)
            if current is None:
                raise KeyNotFound(f"no key with id {key_id!r}")
            if current.revoked:
                return current
            key = current.model_copy(update={"revoked": True})
            await self._write_key(key, self._created[key_id])
        log.info("key_revoked", key_id=key_id, team_id=key.team_id)
        return key

    async def update_team(self, team_id: str, plan: str | None = None, limits: Limits | None = None) -> TeamState:
        """Change a team's plan and/or limits (`limits` replaces the team's own overrides)."""
        plan = self._check_plan(plan)
        async with self._lock:
            current = self._teams.get(team_id)
            if current is None:
                raise TeamNotFound(f"no team with id {team_id!r}")
            update: dict[str, object] = {}
            if plan is not None:
                update["plan"] = plan
            if limits is not None:
                update["limits"] = limits
            team = current.model_copy(update=update)
            version = self._next_version(team_id)
            created = self._created[team_id]
            await self._store.insert_rows(
                "teams",
                [[team.team_id, team.name, team.plan, _limits_json(team.limits), created, version]],
                TEAM_COLUMNS,
            )
            if team.plan != current.plan:  # the fee is prorated over this history
                await plan_history.record(self._store, "team", team_id, team_id, team.plan or "", _now())
            self._remember_team(team, created, version)
        log.info("team_updated", team_id=team_id, plan=team.plan)
        return team

    async def update_key(
        self,
        key_id: str,
        plan: str | None = None,
        limits: Limits | None = None,
        expires_at: datetime | None = None,
        metadata: dict[str, str] | None = None,
        name: str | None = None,
    ) -> KeyState:
        """Change a key's plan, limits (replacing its overrides), expiry, metadata or name."""
        plan = self._check_plan(plan)
        async with self._lock:
            current = self._keys.get(key_id)
            if current is None:
                raise KeyNotFound(f"no key with id {key_id!r}")
            update: dict[str, object] = {}
            for field, value in (("plan", plan), ("limits", limits), ("metadata", metadata), ("name", name)):
                if value is not None:
                    update[field] = value
            if expires_at is not None:
                update["expires_at"] = as_utc(expires_at)
            key = current.model_copy(update=update)
            await self._write_key(key, self._created[key_id])
            if key.plan != current.plan and key.plan is not None:
                await plan_history.record(self._store, "key", key_id, key.team_id, key.plan, _now())
        log.info("key_updated", key_id=key_id, team_id=key.team_id)
        return key

    # -- internals ---------------------------------------------------------------------------------

    def _check_plan(self, plan: str | None) -> str | None:
        if plan is not None and plan not in self._config.plans:
            known = ", ".join(sorted(self._config.plans))
            raise UnknownPlan(f"plan: unknown plan {plan!r} (known: {known})")
        return plan

    def _next_version(self, entity_id: str) -> int:
        # Wall-clock nanoseconds survive restarts; +1 keeps versions strictly rising within one run.
        return max(time.time_ns(), self._versions.get(entity_id, 0) + 1)

    async def _write_key(self, key: KeyState, created: datetime) -> None:
        version = self._next_version(key.key_id)
        row = [
            key.key_id,
            key.key_hash,
            key.prefix,
            key.team_id,
            key.name,
            key.plan,
            _limits_json(key.limits),
            key.metadata,
            key.expires_at,
            key.revoked,
            created,
            version,
        ]
        await self._store.insert_rows("api_keys", [row], KEY_COLUMNS)
        self._remember_key(key, created, version)

    def _remember_team(self, team: TeamState, created: datetime, version: int) -> None:
        self._teams[team.team_id] = team
        self._created[team.team_id] = created
        self._versions[team.team_id] = version

    def _remember_key(self, key: KeyState, created: datetime, version: int) -> None:
        self._keys[key.key_id] = key
        self._by_hash[key.key_hash] = key.key_id
        self._created[key.key_id] = created
        self._versions[key.key_id] = version
