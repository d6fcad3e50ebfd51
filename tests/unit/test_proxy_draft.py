"""The proxy's usage draft is the contract's UsageEvent field for field: the same names in the same order
(orjson writes the draft in that order, and the canonical bytes depend on it) and the model's defaults, save
the few a call starts from on purpose."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from schemas.events import UsageEvent
from services.proxy.draft import UsageDraft
from services.proxy.tokens import TokenUsage

# What a call in progress holds before it knows better: not yet authenticated (no team: no event), not yet
# parsed (no model), not yet answered (an error until it is). The model requires these; the draft cannot.
STARTS_AS = {"team_id": None, "key_id": "", "requested_model": "", "status": "error", "http_status": 0}
GIVEN_AT_START = {"event_id", "occurred_at", "request_id", "endpoint"}


def test_the_draft_has_every_event_field_in_the_models_order() -> None:
    assert [f.name for f in dataclasses.fields(UsageDraft)] == list(UsageEvent.model_fields)


def test_the_draft_starts_from_the_models_defaults() -> None:
    d = UsageDraft(event_id="e", occurred_at=datetime(2026, 1, 1, tzinfo=UTC), request_id="r", endpoint="x")
    for name, f in UsageEvent.model_fields.items():
        if name in GIVEN_AT_START:
            continue
        want = STARTS_AS[name] if name in STARTS_AS else f.get_default(call_default_factory=True)
        assert getattr(d, name) == want, name


def test_a_mistyped_field_is_an_error_not_a_lost_value() -> None:
    d = UsageDraft(event_id="e", occurred_at=datetime(2026, 1, 1, tzinfo=UTC), request_id="r", endpoint="x")
    try:
        d.prompt_token = 5  # type: ignore[attr-defined]
    except AttributeError:
        pass
    else:
        raise AssertionError("a slots draft refuses unknown attributes")


def test_usage_goes_in_and_comes_out_whole() -> None:
    d = UsageDraft(event_id="e", occurred_at=datetime(2026, 1, 1, tzinfo=UTC), request_id="r", endpoint="x")
    d.take_usage(TokenUsage(10, 3, 4), "estimated")
    assert (d.prompt_tokens, d.completion_tokens, d.cached_tokens, d.usage_source) == (10, 3, 4, "estimated")
    assert d.usage() == TokenUsage(10, 3, 4)
