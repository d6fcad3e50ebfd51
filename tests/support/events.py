"""Build valid usage events for tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import uuid_utils

from schemas.events import UsageEvent


def make_event(team_id: str, **over: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "event_id": str(uuid_utils.uuid7()),
        "occurred_at": datetime.now(UTC),
        "request_id": "req_test",
        "team_id": team_id,
        "key_id": "key_test",
        "endpoint": "chat.completions",
        "requested_model": "gpt-4.1",
        "served_model": "gpt-4.1",
        "provider": "openai",
        "status": "ok",
        "http_status": 200,
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "attempts": 1,
        "proxy_instance": "test",
    }
    fields.update(over)
    return UsageEvent(**fields)
