"""Plan history: every plan a team (or key) has had and since when, so a month's plan fee can be prorated.

`teams` and `api_keys` are ReplacingMergeTree tables that keep only the latest plan; `plan_changes` keeps
each change (written by accounts on create and on every plan change). The fee follows the team's plan; key
plans are recorded for the record (they set limits, not fees). `spans` is pure: the plan in force over each
part of a month, from the team's creation, with boundaries floored to the whole second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.clickhouse import Store
from schemas.periods import bounds

COLUMNS = ("scope", "entity_id", "team_id", "plan", "effective_at", "version")


async def record(store: Store, scope: str, entity_id: str, team_id: str, plan: str, at: datetime) -> None:
    """`entity_id` (a team or key) is on `plan` from `at`."""
    await store.insert_rows("plan_changes", [[scope, entity_id, team_id, plan, at, time.time_ns()]], COLUMNS)


@dataclass(frozen=True, slots=True)
class TeamHistory:
    created_at: datetime | None  # None: the team is not in storage
    changes: tuple[tuple[datetime, str], ...]  # (from, plan) in time order; plan "" = the default plan


@dataclass(frozen=True, slots=True)
class PlanSpan:
    plan: str
    start: datetime
    end: datetime

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())


def _utc(t: datetime) -> datetime:
    return (t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)).replace(microsecond=0)


async def team_history(store: Store, team_id: str) -> TeamHistory:
    created = await store.query("SELECT created_at FROM {db}.teams FINAL WHERE team_id = {t:String}",
                                parameters={"t": team_id})  # fmt: skip
    rows = await store.query(
        "SELECT effective_at, plan FROM {db}.plan_changes FINAL WHERE team_id = {t:String} AND scope = 'team' "
        "AND entity_id = {t:String} ORDER BY effective_at",
        parameters={"t": team_id},
    )
    return TeamHistory(_utc(created[0][0]) if created else None, tuple((_utc(t), p) for t, p in rows))


def spans(period: str, history: TeamHistory, current_plan: str) -> list[PlanSpan]:
    """The team's plans over `period`, from its creation (nothing before it); `current_plan` where the
    history has nothing (a team written before history was kept). Adjacent spans of one plan merge."""
    start, end = bounds(period)
    if history.created_at is not None:
        start = max(start, history.created_at)
    if start >= end:
        return []
    before = [p for t, p in history.changes if t <= start]
    plan = before[-1] if before else (history.changes[0][1] if history.changes else current_plan)
    out: list[PlanSpan] = []
    cursor = start
    for t, new_plan in history.changes:
        if start < t < end and new_plan != plan:
            if t > cursor:
                out.append(PlanSpan(plan, cursor, t))
            cursor, plan = t, new_plan
    out.append(PlanSpan(plan, cursor, end))
    return [s for s in out if s.seconds > 0]
