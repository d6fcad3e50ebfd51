"""Attribution tags: the bounds a caller's tag (a `metadata` entry of the usage event) must keep, stated once
for the proxy that enforces them and the billing reports that name a tag (`group_by=tag:<name>`).

The bounds follow OpenAI's own `metadata` (16 pairs, keys up to 64 characters, values up to 512) so a body
OpenAI accepts passes here too, with one difference: a key is limited to `[A-Za-z0-9_.:-]`, so it can be
named in a query string (`tag:project`), a CSV header and a ClickHouse map lookup without escaping.
"""

from __future__ import annotations

import re

MAX_TAGS = 16  # per call, caller tags (header and body together); the key's admin tags come on top
MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 512
MAX_END_USER_CHARS = 256
KEY_CHARS = "A-Za-z0-9_.:-"
_KEY = re.compile(f"[{KEY_CHARS}]{{1,{MAX_KEY_CHARS}}}")
NONE_LABEL = "(none)"  # the group of calls without the tag (or without an end user) in every report


def key_problem(key: object) -> str | None:
    """Why `key` cannot be a tag name, or None when it can."""
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        return f"tag names are 1 to {MAX_KEY_CHARS} characters of {KEY_CHARS}"
    return None


def value_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return "tag values must be strings"
    if len(value) > MAX_VALUE_CHARS:
        return f"tag values are at most {MAX_VALUE_CHARS} characters"
    if not value.isprintable():
        return "tag values must be printable characters"
    return None
