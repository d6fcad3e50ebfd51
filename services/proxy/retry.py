"""When to try an upstream again: which failures are retryable, backoff with full jitter, Retry-After."""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime
from time import time as wall_time

# 408/409 are the provider saying "try again"; 429 and 5xx are transient by nature; 529 is Anthropic's overload.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


def retryable(status: int) -> bool:
    return status in RETRYABLE_STATUS


def backoff_s(retry: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2**retry)].

    Spreading retries over the whole interval keeps replicas that failed together from retrying together.
    """
    ceiling = min(max_s, base_s * (2 ** min(retry, 30)))
    return (rng or random).uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None when absent or garbage."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (wall_time() if now is None else now)
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return 0.0 if seconds == seconds else None
    return min(seconds, 86_400.0)
