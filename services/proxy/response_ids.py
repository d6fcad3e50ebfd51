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

PREFIX = "resp_tw1"  # keeps OpenAI's resp_ prefix; the version lets the format change later
MAX_ID_CHARS = 1024
_MAC_BYTES = 16


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ResponseIds:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, team_id: str, provider: str, upstream_id: str) -> bytes:
        msg = b"\x00".join((PREFIX.encode(), team_id.encode(), provider.encode(), upstream_id.encode()))
        return hmac.digest(self._secret, msg, hashlib.sha256)[:_MAC_BYTES]

    def wrap(self, team_id: str, provider: str, upstream_id: str) -> str:
        mac = self._mac(team_id, provider, upstream_id)
        return ".".join((PREFIX, _b64(provider.encode()), _b64(upstream_id.encode()), _b64(mac)))

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
