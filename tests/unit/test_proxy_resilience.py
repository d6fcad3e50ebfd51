"""Pure pieces of the proxy's resilience: backoff schedule, Retry-After, circuit breaker, load balancer."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.proxy.balancer import Candidate, effective_weights, ewma, order
from services.proxy.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from services.proxy.retry import backoff_s, parse_retry_after, retryable


def test_backoff_is_full_jitter_under_an_exponential_ceiling_capped_at_max():
    rng = random.Random(1)
    for retry, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (10, 2.0), (100, 2.0)]:
        samples = [backoff_s(retry, 0.1, 2.0, rng) for _ in range(500)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.9 and min(samples) < ceiling * 0.1  # spread over the whole range


def test_retry_after_reads_seconds_and_http_dates_and_ignores_garbage():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0  # in the past
    for junk in (None, "", "soon", "-1", "nan"):
        assert parse_retry_after(junk) in (None, 0.0)
    assert parse_retry_after("99999999") == 86_400.0


def test_only_transient_statuses_are_retryable():
    assert all(retryable(s) for s in (408, 429, 500, 502, 503, 504, 529))
    assert not any(retryable(s) for s in (400, 401, 403, 404, 413, 422))


def test_breaker_opens_after_threshold_then_half_open_admits_one_probe():
    b = CircuitBreaker(threshold=3, cooldown_s=10)
    for _ in range(2):
        b.failure(now=0)
    assert b.state == CLOSED and b.allows(0)
    b.failure(now=1)
    assert b.state == OPEN and not b.allows(5) and b.retry_in(5) == pytest.approx(6)
    assert b.allows(11) and b.state == HALF_OPEN  # cooldown over: one probe may go
    b.begin(11)
    assert not b.allows(11.1)  # ...and only one
    b.success()
    assert b.state == CLOSED and b.failures == 0 and b.allows(12)


def test_breaker_failed_probe_reopens_for_a_full_cooldown():
    b = CircuitBreaker(threshold=1, cooldown_s=10)
    b.failure(now=0)
    assert b.allows(10)
    b.begin(10)
    b.failure(now=10)
    assert b.state == OPEN and not b.allows(19) and b.allows(20)


def test_breaker_success_resets_the_consecutive_count():
    b = CircuitBreaker(threshold=3, cooldown_s=10)
    for _ in range(10):
        b.failure(now=0)
        b.failure(now=0)
        b.success()
    assert b.state == CLOSED


def test_released_probe_lets_another_request_probe():
    b = CircuitBreaker(threshold=1, cooldown_s=1)
    b.failure(now=0)
    b.begin(2)
    assert not b.allows(2)
    b.release()
    assert b.allows(2)


def test_weighted_choice_follows_weights_within_a_tier():
    rng = random.Random(7)
    cands = [Candidate(0, 0, 3.0, None), Candidate(1, 0, 1.0, None)]
    firsts = Counter(order(cands, 1.0, rng)[0] for _ in range(4000))
    assert 0.70 < firsts[0] / 4000 < 0.80


def test_latency_bias_shifts_load_to_the_faster_route():
    rng = random.Random(7)
    cands = [Candidate(0, 0, 1.0, 0.050), Candidate(1, 0, 1.0, 0.200)]
    assert effective_weights(cands, 1.0) == pytest.approx([1.0, 0.25])
    assert effective_weights(cands, 0.0) == [1.0, 1.0]
    firsts = Counter(order(cands, 1.0, rng)[0] for _ in range(4000))
    assert 0.75 < firsts[0] / 4000 < 0.85


def test_lower_priority_tiers_are_only_fallbacks_and_every_route_appears_once():
    rng = random.Random(3)
    cands = [Candidate(0, 1, 100.0, None), Candidate(1, 0, 1.0, None), Candidate(2, 0, 1.0, None)]
    for _ in range(200):
        o = order(cands, 1.0, rng)
        assert sorted(o) == [0, 1, 2] and o[-1] == 0


def test_ewma_starts_at_the_first_sample_and_moves_by_alpha():
    assert ewma(None, 0.1, 0.3) == 0.1
    assert ewma(0.1, 0.2, 0.5) == pytest.approx(0.15)
