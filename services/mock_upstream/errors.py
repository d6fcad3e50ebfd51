"""Error bodies in each provider's shape: OpenAI's ``{"error": {...}}`` and Anthropic's ``{"type": "error", ...}``."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from starlette.responses import Response

Shape = Literal["openai", "anthropic"]

# status -> (type, code), as OpenAI spells them
_OPENAI: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("server_error", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}

# status -> error.type, as Anthropic spells them (anthropic.types.shared.ErrorObject)
_ANTHROPIC: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class BadRequest(Exception):
    """A request the mock refuses with a 4xx; ``param``/``code`` fill OpenAI's fields when known."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
    shape: Shape = "openai",
) -> JSONResponse:
    headers = None
    if status == 429 and retry_after is None:
        retry_after = 1
    if retry_after is not None:
        headers = {"retry-after": f"{retry_after:g}"}
    body: dict[str, Any]
    if shape == "anthropic":
        kind = _ANTHROPIC.get(status, "invalid_request_error" if status < 500 else "api_error")
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind, default_code = _OPENAI.get(
            status, ("invalid_request_error" if status < 500 else "server_error", f"http_{status}")
        )
        body = {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}
    return JSONResponse(body, status_code=status, headers=headers)


def refusal(e: BadRequest, shape: Shape = "openai") -> JSONResponse:
    return error_response(e.status, e.message, code=e.code, param=e.param, shape=shape)
