"""API key format and hashing, shared by billing (mints keys) and the proxy (checks them).

A key is `tw-` + 256 random bits. Only its SHA-256 is stored or sent anywhere: a slow KDF buys nothing
for a secret with this much entropy, and a plain hash lets the proxy check a key with one dict lookup.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "tw-"
DISPLAY_CHARS = 10


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    """What UIs and logs may show of a key: enough to tell keys apart, useless to an attacker."""
    return secret[:DISPLAY_CHARS] + "..."


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(8)}"
