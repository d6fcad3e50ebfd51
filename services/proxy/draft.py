"""The usage event while its call is under way: one typed record the request path fills in, emitted once.

Its fields are UsageEvent v1's, in the model's order, so orjson writes it as the contract's canonical JSON
with no copy or reorder (services/proxy/events.py); tests/unit/test_proxy_draft.py holds the two together
(names, order, defaults), so a field added to the contract fails that test until the proxy fills it here.
Slots: a mistyped field name is an AttributeError, not a silently dropped key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from schemas.events import SCHEMA_VERSION, Status, UsageSource
from services.proxy.tokens import TokenUsage


@dataclass(slots=True, kw_only=True)
class UsageDraft:
    schema_version: int = SCHEMA_VERSION
    event_id: str
    occurred_at: datetime
    request_id: str
    team_id: str | None = None  # set by authentication; a call that never got a team is no event
    key_id: str = ""
    end_user: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    endpoint: str
    requested_model: str = ""
    served_model: str = ""
    provider: str = ""
    stream: bool = False
    status: Status = "error"  # until the call is answered: an exit by any other path is a failure
    http_status: int = 0
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    attempts: int = 0
    fallback_used: bool = False
    cache_hit: bool = False
    client_disconnected: bool = False
    proxy_instance: str = ""
    proxy_seq: int = 0
    usage_source: UsageSource = "provider"
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0  # filled by the agent APIs (issue 15); chat completions report none
    cache_write_1h_tokens: int = 0
    service_tier: str = ""
    web_search_requests: int = 0
    quoted_cost_usd: str = ""  # services/proxy/cost.py: set only when the amount was told to the caller
    quoted_price_version: str = ""
    route_reason: str = ""  # forward.Tried.reason, or "cache"

    def take_usage(self, usage: TokenUsage, source: UsageSource) -> None:
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens
        self.cached_tokens = usage.cached_tokens
        self.reasoning_tokens = usage.reasoning_tokens
        self.cache_write_tokens = usage.cache_write_tokens
        self.cache_write_1h_tokens = usage.cache_write_1h_tokens
        self.web_search_requests = usage.web_search_requests
        self.usage_source = source

    def usage(self) -> TokenUsage:
        return TokenUsage(self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.reasoning_tokens,
                          self.cache_write_tokens, self.cache_write_1h_tokens, self.web_search_requests)  # fmt: skip
