"""Deterministic token counting and completion text, so usage can be checked exactly in tests."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]")

DEFAULT_COMPLETION_WORDS = 16

# Plain lowercase alphabetic words: each one is exactly one token under count_tokens, so
# completion_tokens == number of words, and a stream of " word" chunks joins back to the same count.
VOCABULARY: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "amber", "birch", "cedar", "dune", "ember", "fern",
    "grove", "harbor", "island", "jade", "kelp", "lagoon", "meadow", "nectar",
    "orchid", "pebble", "quartz", "river", "summit", "tundra", "umber", "valley",
    "willow", "yarrow", "zephyr", "anchor", "beacon", "canyon", "drift", "falcon",
    "glacier", "horizon", "lantern", "marble", "nimbus", "orbit", "prairie", "ripple",
)  # fmt: skip


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def content_text(content: Any) -> str:
    """The text of a message ``content``: a string, None, or a list of parts (only text parts count)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return str(content)


def prompt_tokens_for_messages(messages: Iterable[Mapping[str, Any]]) -> int:
    # 3 per message plus 3 to prime the reply mirrors OpenAI's published counting recipe.
    total = 3
    for m in messages:
        total += 3 + count_tokens(content_text(m.get("content")))
        name = m.get("name")
        if name:
            total += count_tokens(str(name))
    return total


def completion_text(
    prompt_messages: Iterable[Mapping[str, Any]],
    max_tokens: int | None = None,
    words: int | None = None,
) -> list[str]:
    """A reproducible answer: ``words`` (default 16) words chosen by a hash of the last user message,
    capped by ``max_tokens``."""
    n = DEFAULT_COMPLETION_WORDS if words is None else max(0, words)
    if max_tokens is not None:
        n = min(n, max(0, max_tokens))
    last_user = ""
    for m in prompt_messages:
        if m.get("role") == "user":
            last_user = content_text(m.get("content"))
    return words_for(last_user, n)


def words_for(seed: str, n: int) -> list[str]:
    """``n`` vocabulary words chosen by a hash of ``seed``: the same seed always gives the same words."""
    digest = hashlib.blake2b(seed.encode(), digest_size=64).digest()
    size = len(VOCABULARY)
    return [VOCABULARY[(digest[i % 64] + i // 64) % size] for i in range(n)]
