"""End-user and tag budgets (issue 16): a team's monthly limits for one of its end users, for every end user
(the team's default), or for one tag value (e.g. `project=apollo`). Billing stores and counts them, the
proxies gate on them; both read this one index.

A budget is a quota entity like a team or a key: scope "end_user" or "tag", id `<team_id>:<end_user>` or
`<team_id>:<tag>=<value>` (team ids have no ':', budget tag names no '=', so an id names one budget).
Only entities with a budget exist: a call whose end user and tags have none costs one dict lookup per team
(none at all when its team has no budgets), and no state is kept for it anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.config import MAX_COUNT, MAX_USD, USD_PLACES, Limits

BudgetScope = Literal["end_user", "tag"]
Entity = tuple[str, str]
MAX_VALUE_LEN = 256  # an end user is cut to 256 characters on the event; a tag value likewise


class Budget(BaseModel):
    """One budget, and the control message (`kind="budget"`) that carries it to the proxies; `deleted` removes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: Literal["budget"] = "budget"
    team_id: str = Field(min_length=1, max_length=64, pattern=r"^[^:]+$")
    scope: BudgetScope
    tag: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[^=]+$")
    # None with scope end_user: the team's default, for every end user without a budget of their own.
    value: str | None = Field(default=None, min_length=1, max_length=MAX_VALUE_LEN)
    tokens_per_month: int | None = Field(default=None, ge=1, le=MAX_COUNT, strict=True)
    budget_usd_per_month: Decimal | None = Field(default=None, ge=0, le=MAX_USD, decimal_places=USD_PLACES)
    daily_alert_usd: Decimal | None = Field(default=None, gt=0, le=MAX_USD, decimal_places=USD_PLACES)
    deleted: bool = False

    @model_validator(mode="after")
    def _shape(self) -> Budget:
        if self.scope == "tag" and (self.tag is None or self.value is None):
            raise ValueError("a tag budget needs `tag` and `value`")
        if self.scope == "end_user" and self.tag is not None:
            raise ValueError("an end_user budget has no `tag`")
        if not self.deleted and self.tokens_per_month is None and self.budget_usd_per_month is None:
            raise ValueError("set budget_usd_per_month or tokens_per_month (or both)")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(tokens_per_month=self.tokens_per_month, budget_usd_per_month=self.budget_usd_per_month)

    @property
    def is_default(self) -> bool:
        return self.scope == "end_user" and self.value is None

    @property
    def slot(self) -> tuple[str, str, str, str]:
        """What identifies the budget (not its amounts): the stored row's key and the control message's."""
        return (self.team_id, self.scope, self.tag or "", self.value or "")

    def entity(self) -> Entity | None:
        """The quota entity this budget limits; None for a team's default (it limits each end user's)."""
        if self.scope == "tag":
            return ("tag", tag_entity(self.team_id, self.tag or "", self.value or ""))
        return None if self.value is None else ("end_user", end_user_entity(self.team_id, self.value))


def end_user_entity(team_id: str, end_user: str) -> str:
    return f"{team_id}:{end_user}"


def tag_entity(team_id: str, tag: str, value: str) -> str:
    return f"{team_id}:{tag}={value}"


def team_of(entity_id: str) -> str:
    return entity_id.split(":", 1)[0]


def describe(entity: Entity) -> dict[str, str]:
    """A budget entity named for people (alerts): its end_user, or its tag and value (the team is team_of)."""
    rest = entity[1].partition(":")[2]
    if entity[0] == "end_user":
        return {"end_user": rest}
    if entity[0] == "tag":
        tag, _, value = rest.partition("=")
        return {"tag": tag, "value": value}
    return {}


class BudgetIndex:
    """Every live budget, by team, folded latest-wins from `put` (a deleted budget removes its slot)."""

    def __init__(self) -> None:
        self._explicit: dict[Entity, Budget] = {}
        self._default: dict[str, Budget] = {}  # team_id -> default end-user budget
        self._tag_names: dict[str, dict[str, int]] = {}  # team_id -> tag name -> budgets on it
        self._end_users: dict[str, int] = {}  # team_id -> explicit end-user budgets

    def put(self, b: Budget) -> None:
        old = self.find(b.slot)
        if old is not None:
            self._remove(old)
        if not b.deleted:
            self._add(b)

    def _add(self, b: Budget) -> None:
        entity = b.entity()
        if entity is None:
            self._default[b.team_id] = b
            return
        self._explicit[entity] = b
        if b.scope == "tag":
            names = self._tag_names.setdefault(b.team_id, {})
            names[b.tag or ""] = names.get(b.tag or "", 0) + 1
        else:
            self._end_users[b.team_id] = self._end_users.get(b.team_id, 0) + 1

    def _remove(self, b: Budget) -> None:
        entity = b.entity()
        if entity is None:
            self._default.pop(b.team_id, None)
            return
        self._explicit.pop(entity, None)
        counts = self._tag_names.get(b.team_id, {}) if b.scope == "tag" else self._end_users
        k = (b.tag or "") if b.scope == "tag" else b.team_id
        counts[k] = counts.get(k, 1) - 1
        if counts[k] <= 0:
            del counts[k]
        if b.scope == "tag" and not self._tag_names.get(b.team_id):
            self._tag_names.pop(b.team_id, None)

    def find(self, slot: tuple[str, str, str, str]) -> Budget | None:
        team_id, scope, tag, value = slot
        if scope == "end_user" and not value:
            return self._default.get(team_id)
        entity = (
            ("tag", tag_entity(team_id, tag, value))
            if scope == "tag"
            else ("end_user", end_user_entity(team_id, value))
        )
        return self._explicit.get(entity)

    def get(self, entity: Entity) -> Budget | None:
        """The budget that limits an entity: its own, or (an end user) the team's default."""
        b = self._explicit.get(entity)
        if b is None and entity[0] == "end_user":
            b = self._default.get(team_of(entity[1]))
        return b

    def entities(self, team_id: str, end_user: str | None, tags: Mapping[str, str]) -> list[tuple[Entity, Budget]]:
        """The budgeted entities a call of this team, end user and tags counts against."""
        out: list[tuple[Entity, Budget]] = []
        if end_user and (team_id in self._default or team_id in self._end_users):
            entity = ("end_user", end_user_entity(team_id, end_user))
            b = self.get(entity)
            if b is not None:
                out.append((entity, b))
        names = self._tag_names.get(team_id)
        if names and tags:
            for tag, value in tags.items():
                if tag in names:
                    entity = ("tag", tag_entity(team_id, tag, value))
                    b = self._explicit.get(entity)
                    if b is not None:
                        out.append((entity, b))
        return out

    def has_team(self, team_id: str) -> bool:
        return team_id in self._default or team_id in self._end_users or team_id in self._tag_names

    def teams(self) -> set[str]:
        return set(self._default) | set(self._end_users) | set(self._tag_names)

    def __iter__(self) -> Iterator[Budget]:
        yield from self._default.values()
        yield from self._explicit.values()

    def __len__(self) -> int:
        return len(self._default) + len(self._explicit)
