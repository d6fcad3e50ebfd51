"""Dead letters: a record the meter cannot accept, with its reason and origin (pure: no I/O).

They go to `tollway.usage.dlq` (dlq.py) and to `usage_dead_letters` (writer.py); nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

DEAD_COLUMNS = ("dead_id", "dead_at", "reason", "topic", "partition", "offset", "team_id", "model", "event_id",
                "key", "value")  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    # A valid event held for its occurred_at beyond the tolerance (schemas/clock.py); metric
    # tollway_meter_future_events_total.
    future: bool = False

    def dead_id(self) -> str:
        """Named by its bytes, never by where it was read: the same record dead-lettered again (a replay, a
        fresh broker, an operator's re-feed before the fix) is the same dead letter."""
        return hashlib.sha256(b"tollway-dead-v1\x00" + (self.value or b"")).hexdigest()

    def hints(self) -> tuple[str, str, str]:
        """(team_id, model, event_id) if the bad record still reads as a JSON object, else blanks."""
        try:
            d = orjson.loads(self.value or b"")
        except orjson.JSONDecodeError:
            return "", "", ""
        if not isinstance(d, dict):
            return "", "", ""
        pick = lambda k: str(d.get(k) or "")[:256]  # noqa: E731
        return pick("team_id"), pick("served_model") or pick("requested_model"), pick("event_id")


def dead_letter_rows(dead: list[DeadLetter], now: datetime) -> list[list[Any]]:
    rows = []
    for d in dead:
        team, model, event_id = d.hints()
        rows.append([d.dead_id(), now, d.reason, d.topic, d.partition, d.offset, team, model, event_id,
                     (d.key or b"").decode("utf-8", "replace"), (d.value or b"").decode("utf-8", "replace")])  # fmt: skip
    return rows
