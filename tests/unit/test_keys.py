"""Key secrets: high-entropy, stored only as SHA-256, shown only by a short prefix."""

from __future__ import annotations

import hashlib

from schemas.keys import display_prefix, hash_key, new_id, new_secret


def test_secrets_are_unique_and_prefixed():
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("tw-") and len(a) >= 40


def test_hash_is_sha256_and_does_not_contain_the_secret():
    s = new_secret()
    h = hash_key(s)
    assert h == hashlib.sha256(s.encode()).hexdigest()
    assert s not in h and s[3:] not in h


def test_display_prefix_is_short():
    s = new_secret()
    p = display_prefix(s)
    assert s.startswith(p[:-3]) and len(p) <= 13


def test_ids_name_their_kind():
    assert new_id("key").startswith("key_") and new_id("team") != new_id("team")
