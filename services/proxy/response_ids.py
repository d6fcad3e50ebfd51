"""Response ids the proxy hands out for stored Responses API answers: the provider that created the response,
its own id, and an HMAC binding both to the calling team, under a secret every replica shares.

Why not a shared id map (a compacted topic, a database): a follow-up on another replica right after the create
would race the map's propagation, the map grows with every response, and a broker outage would break reads.
A self-describing id needs no state at all: any replica with the secret knows where to send a GET, and a team
holding another team's id (the upstream account is shared by every team) fails the check and gets a 404.
The wrap is deterministic, so ids the provider echoes (previous_response_id) are re-wrapped the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any

PREFIX = "resp_tw1"  # keeps OpenAI's resp_ prefix; the version lets the format change later
MAX_ID_CHARS = 1024
_MAC_BYTES = 16
_MAX_HEADS = 4096
_BLOCK = 64  # SHA-256's block size
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ResponseIds:
    """HMAC-SHA256 (RFC 2104) over PREFIX, team, provider and upstream id, NUL-separated. Built from hashlib's
    SHA-256 states rather than the hmac module: OpenSSL's HMAC objects cost ~9 us per MAC on this path, two
    copied SHA-256 states ~3 us (the MAC is the same; tests check it against hmac.digest)."""

    def __init__(self, secret: bytes) -> None:
        key = hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret
        key = key.ljust(_BLOCK, b"\x00")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))
        # (team, provider) -> (the inner state over everything but the upstream id, the provider in base64);
        # bounded: cleared when full, a miss costs one copy more
        self._heads: dict[tuple[str, str], tuple[Any, str]] = {}

    def _head(self, team_id: str, provider: str) -> tuple[Any, str]:
        found = self._heads.get((team_id, provider))
        if found is None:
            if len(self._heads) >= _MAX_HEADS:
                self._heads.clear()
            inner = self._inner.copy()
            inner.update(b"\x00".join((PREFIX.encode(), team_id.encode(), provider.encode(), b"")))
            found = self._heads[(team_id, provider)] = (inner, _b64(provider.encode()))
        return found

    def _finish(self, head: Any, upstream_id: str) -> bytes:
        inner = head.copy()
        inner.update(upstream_id.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:_MAC_BYTES]

    def _mac(self, team_id: str, provider: str, upstream_id: str) -> bytes:
        return self._finish(self._head(team_id, provider)[0], upstream_id)

    def wrap(self, team_id: str, provider: str, upstream_id: str) -> str:
        head, provider_b64 = self._head(team_id, provider)
        mac = self._finish(head, upstream_id)
        return ".".join((PREFIX, provider_b64, _b64(upstream_id.encode()), _b64(mac)))

    def unwrap(self, team_id: str, public_id: object) -> tuple[str, str] | None:
        """(provider, upstream id) when the id is one this team was given; None for anything else."""
        if not isinstance(public_id, str) or len(public_id) > MAX_ID_CHARS:
            return None
        parts = public_id.split(".")
        if len(parts) != 4 or parts[0] != PREFIX:
            return None
        try:
            provider, upstream_id = _unb64(parts[1]).decode(), _unb64(parts[2]).decode()
            mac = _unb64(parts[3])
        except (binascii.Error, ValueError):
            return None
        if not provider or not upstream_id or not hmac.compare_digest(mac, self._mac(team_id, provider, upstream_id)):
            return None
        return provider, upstream_id
