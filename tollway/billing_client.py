"""The CLI's side of the billing API: where it is, which token to send, and how its errors read.

Tokens come from the environment only, so they never show in `ps`. API errors arrive in OpenAI's shape and
are turned into one line on stderr and exit code 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import httpx

DEFAULT_BILLING_URL = "http://127.0.0.1:8090"


class CliError(Exception):
    """A failure worth one line on stderr."""


class Conflict(CliError):
    """HTTP 409: the thing already exists (e.g. a team created concurrently)."""


def billing_url() -> str:
    return os.environ.get("TOLLWAY_BILLING_URL", DEFAULT_BILLING_URL).rstrip("/")


def token(*names: str) -> str:
    """The first of these environment variables that is set."""
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    raise CliError(f"{' or '.join(names)} is not set")


def client(*token_names: str, timeout_s: float = 60.0) -> httpx.Client:
    return httpx.Client(base_url=billing_url(), headers={"Authorization": f"Bearer {token(*token_names)}"},
                        timeout=timeout_s)  # fmt: skip


def call(c: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    """The JSON body of a successful call; otherwise CliError with the API's own message."""
    resp = c.request(method, path, **kw)
    if resp.is_success:
        return resp.json()
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200] or resp.reason_phrase
    error = Conflict if resp.status_code == 409 else CliError
    raise error(f"{method} {path} -> {resp.status_code}: {message}")


def get_csv(c: httpx.Client, path: str, params: dict[str, str] | None = None) -> str:
    resp = c.get(path, params=params, headers={"Accept": "text/csv"})
    if not resp.is_success:
        raise CliError(f"GET {path} -> {resp.status_code}: {resp.text[:200]}")
    return resp.text


def guarded(command: str, action: Callable[[], int | None]) -> int:
    """Run a CLI action; a CliError or an unreachable billing API becomes one stderr line and exit 1."""
    try:
        return action() or 0
    except CliError as e:
        print(f"tollway {command}: {e}", file=sys.stderr)
    except httpx.HTTPError as e:
        print(f"tollway {command}: cannot reach billing at {billing_url()}: {e}", file=sys.stderr)
    return 1
