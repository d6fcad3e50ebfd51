"""The token counts of one mock answer in every billing dimension, before any API spells them."""

from __future__ import annotations

from dataclasses import dataclass

from services.mock_upstream.directives import Directives


@dataclass(frozen=True, slots=True)
class TokenCounts:
    input_total: int  # every prompt token, cached or not
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int
    visible_output: int  # the words of the answer, one token each
    reasoning: int  # hidden (or thinking) tokens, billed as output

    @property
    def uncached_input(self) -> int:
        return self.input_total - self.cache_read - self.cache_write_5m - self.cache_write_1h

    @property
    def cache_write(self) -> int:
        return self.cache_write_5m + self.cache_write_1h

    @property
    def output(self) -> int:
        return self.visible_output + self.reasoning


def split_input(
    derived_total: int, d: Directives, *, cache_read: int = 0, cache_write_5m: int = 0, cache_write_1h: int = 0
) -> tuple[int, int, int, int]:
    """(total, read, write 5m, write 1h) for a prompt: ``input_tokens`` replaces the derived total, and the
    cache directives replace the caller's own cache bookkeeping. Clamped in the order read, 5m, 1h so that
    read + writes never exceed the prompt, as no provider reports more cached tokens than it was sent."""
    total = derived_total if d.input_tokens is None else d.input_tokens
    if d.steers_cache:
        cache_read, cache_write_5m, cache_write_1h = (
            d.cached_tokens or 0,
            d.cache_write_tokens or 0,
            d.cache_write_1h_tokens or 0,
        )
    read = min(cache_read, total)
    w5 = min(cache_write_5m, total - read)
    w1h = min(cache_write_1h, total - read - w5)
    return total, read, w5, w1h
