"""Who is calling: the in-memory key view (fed by the control topic) and the request's credential."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request

from schemas.control import KeyState, QuotaSignal, Snapshot, TeamState
from schemas.keys import hash_key
from services.proxy.errors import InvalidApiKey
from services.proxy.headers import header


class KeyView:
    """Keys by hash, teams by id, quota states: everything auth and admission need, no database."""

    def __init__(self) -> None:
        self.keys_by_hash: dict[str, KeyState] = {}
        self.key_hash_by_id: dict[str, str] = {}
        self.teams: dict[str, TeamState] = {}
        self.exhausted: dict[tuple[str, str], QuotaSignal] = {}
        self.snapshots_seen = 0

    def apply(self, msg: TeamState | KeyState | QuotaSignal | Snapshot) -> None:
        match msg:
            case KeyState():
                old = self.key_hash_by_id.get(msg.key_id)
                if old and old != msg.key_hash:
                    self.keys_by_hash.pop(old, None)
                self.keys_by_hash[msg.key_hash] = msg
                self.key_hash_by_id[msg.key_id] = msg.key_hash
            case TeamState():
                self.teams[msg.team_id] = msg
            case QuotaSignal():
                if msg.state == "exhausted":
                    self.exhausted[(msg.scope, msg.id)] = msg
                else:
                    self.exhausted.pop((msg.scope, msg.id), None)
            case Snapshot():
                self.snapshots_seen += 1

    def lookup(self, secret: str, now: datetime | None = None) -> KeyState | None:
        key = self.keys_by_hash.get(hash_key(secret))
        if key is None or key.revoked:
            return None
        if key.expires_at is not None and key.expires_at <= (now or datetime.now(UTC)):
            return None
        return key


def credential(request: Request) -> str | None:
    auth = header(request, b"authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return header(request, b"x-api-key") or None


def authenticate(request: Request, view: KeyView) -> KeyState:
    secret = credential(request)
    if not secret:
        raise InvalidApiKey("Missing API key. Pass it as 'Authorization: Bearer <key>' or 'X-API-Key'.")
    key = view.lookup(secret)
    if key is None:
        # Claude Code and the Anthropic SDK may send both headers, the bearer holding some other token
        # (an OAuth login): the x-api-key one is then the gateway key
        other = header(request, b"x-api-key")
        if other and other != secret:
            key = view.lookup(other)
    if key is None:
        # Never echo the secret, not even partly: the message is the same for unknown, revoked, expired.
        raise InvalidApiKey("Incorrect API key provided, or the key was revoked or has expired.")
    return key
