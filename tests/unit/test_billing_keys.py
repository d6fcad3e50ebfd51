"""Key secrets: minted with enough entropy, stored only as a hash, shown only as a short prefix."""

from __future__ import annotations

import hashlib

from schemas.keys import DISPLAY_CHARS, KEY_PREFIX, display_prefix, hash_key, new_secret


def test_new_secrets_are_distinct_and_long():
    secrets = {new_secret() for _ in range(200)}
    assert len(secrets) == 200
    for s in secrets:
        assert s.startswith(KEY_PREFIX)
        assert len(s) >= len(KEY_PREFIX) + 43  # 256 bits, url-safe base64


def test_hash_is_sha256_hex_and_does_not_contain_the_secret():
    secret = new_secret()
    digest = hash_key(secret)
    assert digest == hashlib.sha256(secret.encode()).hexdigest()
    assert len(digest) == 64
    assert secret not in digest
    assert secret[len(KEY_PREFIX) :] not in digest
    assert hash_key(secret) == digest  # deterministic: the proxy checks keys by lookup
    assert hash_key(secret + "x") != digest


def test_display_prefix_shows_too_little_to_use():
    secret = new_secret()
    prefix = display_prefix(secret)
    assert prefix == secret[:DISPLAY_CHARS] + "..."
    assert len(prefix) == DISPLAY_CHARS + 3
    # What is shown carries at most 7 random characters (~42 bits) of the 256.
    assert len(secret) - DISPLAY_CHARS >= 36
