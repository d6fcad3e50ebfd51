"""The error shape every Tollway API answers with (OpenAI's): `{"error": {"message", "type", "code"}}`.
Each service raises its own typed errors and renders them through this."""

from __future__ import annotations


def error_json(message: str, type_: str, code: str) -> dict[str, dict[str, str]]:
    return {"error": {"message": message, "type": type_, "code": code}}
