"""A circuit breaker per route: closed -> open after N consecutive failures -> half-open probe after a cooldown.

Pure state machine over an injected clock, so the transitions are unit-tested without waiting.
"""

from __future__ import annotations

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the gauge value exported per route


class CircuitBreaker:
    __slots__ = ("_opened_at", "_probe_out", "cooldown_s", "failures", "state", "threshold")

    def __init__(self, threshold: int, cooldown_s: float) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.state = CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._probe_out = False

    def allows(self, now: float) -> bool:
        """May a request go to this route now? In half-open, exactly one probe request at a time."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now - self._opened_at < self.cooldown_s:
                return False
            self.state = HALF_OPEN
            self._probe_out = False
        return not self._probe_out

    def would_allow(self, now: float) -> bool:
        """`allows` without side effects, for ordering and reporting."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now - self._opened_at >= self.cooldown_s
        return not self._probe_out

    def begin(self, now: float) -> None:
        """A request is on its way: in half-open it is the probe, and no other gets through until it ends."""
        if self.allows(now) and self.state == HALF_OPEN:
            self._probe_out = True

    def success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self._probe_out = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.trip(now)

    def trip(self, now: float) -> None:
        self.state = OPEN
        self._opened_at = now
        self._probe_out = False

    def release(self) -> None:
        """The probe ended without a verdict (e.g. client went away): let another request probe."""
        self._probe_out = False

    def retry_in(self, now: float) -> float:
        """Seconds until this route takes a request again (0 when it does now)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.cooldown_s - (now - self._opened_at))

    def half_open(self) -> None:
        """An active probe saw the provider answer: let one real request test it without waiting the cooldown."""
        if self.state == OPEN:
            self.state = HALF_OPEN
            self._probe_out = False
