"""Proxy metrics (prefix tollway_), defined once per process."""

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("tollway_requests_total", "Proxied requests", ["endpoint", "model", "provider", "status"])
LATENCY = Histogram(
    "tollway_request_seconds", "Total request latency seen by the client", ["endpoint"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)  # fmt: skip
UPSTREAM_LATENCY = Histogram(
    "tollway_upstream_seconds", "Upstream call latency", ["provider"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)  # fmt: skip
ADDED_LATENCY = Histogram(
    "tollway_proxy_added_seconds", "Latency the proxy adds on top of the upstream",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)  # fmt: skip
TOKENS = Counter("tollway_tokens_total", "Tokens metered", ["model", "kind"])
EVENTS = Counter("tollway_usage_events_total", "Usage events by outcome", ["outcome"])
EVENTS_QUEUED = Gauge("tollway_usage_events_queued", "Usage events waiting for the producer")
TTFT = Histogram(
    "tollway_ttft_seconds", "Time to the first streamed content token", ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
UPSTREAM_ATTEMPTS = Counter(
    "tollway_upstream_attempts_total", "Upstream calls by outcome (ok, retryable failure, rejected)",
    ["model", "provider", "outcome"],
)  # fmt: skip
FALLBACKS = Counter("tollway_fallbacks_total", "Requests answered by a route other than the first tried", ["model"])
BREAKER_STATE = Gauge(
    "tollway_route_breaker_state", "Circuit breaker per route: 0 closed, 1 half-open, 2 open",
    ["model", "provider", "route"],
)  # fmt: skip
PROBES = Counter("tollway_health_probes_total", "Active health probes", ["provider", "result"])
CACHE = Counter("tollway_cache_total", "Response cache lookups and stores", ["result"])
CACHE_ENTRIES = Gauge("tollway_cache_entries", "Entries in the response cache")
RATE_LIMITED = Counter("tollway_rate_limited_total", "Requests rejected by a rate limit", ["scope", "metric"])
RATELIMIT_ERRORS = Counter("tollway_ratelimit_store_errors_total", "Shared limit store unreachable (failed open)")
CLIENT_DISCONNECTS = Counter("tollway_client_disconnects_total", "Streams the client left before the end", ["model"])


class Children:
    """A metric's label children, resolved once per label values: `labels()` hashes, validates and locks on
    every call (~2% of a call's CPU), a dict lookup does not. Bounded by the same label sets as the metric."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


requests_by = Children(REQUESTS)
latency_by = Children(LATENCY)
upstream_latency_by = Children(UPSTREAM_LATENCY)
tokens_by = Children(TOKENS)
attempts_by = Children(UPSTREAM_ATTEMPTS)
