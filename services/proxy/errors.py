"""Typed gateway errors, rendered in OpenAI's shape `{"error": {"message", "type", "code"}}`, or on the
Anthropic Messages endpoints in Anthropic's `{"type": "error", "error": {"type", "message"}}`.

Nothing else in the proxy builds error JSON: raise a GatewayError and let `error_response` render it.
"""

from __future__ import annotations

from typing import Literal

import orjson
from starlette.responses import Response

from schemas.errors import error_json


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code = "internal_error"
    # set on failures of an upstream attempt: what the provider said, and whether trying again may help
    upstream_status = 0
    retryable = False
    retry_after_s: float | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if code:
            self.code = code


class InvalidApiKey(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class QuotaExceeded(GatewayError):
    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class UsageUnrecordable(GatewayError):
    """The usage spool is (nearly) full: a call that could not be billed is not made."""

    status, type, code = 503, "api_error", "usage_unrecordable"


class UpstreamError(GatewayError):
    status, type, code = 502, "api_error", "upstream_error"


class UpstreamUnavailable(GatewayError):
    status, type, code = 503, "api_error", "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "api_error", "upstream_timeout"


def error_body(message: str, type_: str, code: str) -> bytes:
    return orjson.dumps(error_json(message, type_, code))


Shape = Literal["openai", "anthropic"]

# HTTP status -> Anthropic's error.type (anthropic.types.shared.ErrorObject). The status already says which
# class an error is in, so one table covers every GatewayError; same status and headers in either shape.
ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error_body(message: str, status: int, request_id: str | None = None) -> bytes:
    body: dict[str, object] = {"type": "error", "error": {"type": anthropic_type(status), "message": message}}
    if request_id:
        body["request_id"] = request_id
    return orjson.dumps(body)


def error_response(err: GatewayError, request_id: str | None = None, shape: Shape = "openai") -> Response:
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    body = (
        anthropic_error_body(err.message, err.status, request_id)
        if shape == "anthropic"
        else error_body(err.message, err.type, err.code)
    )
    return Response(
        body,
        status_code=err.status,
        media_type="application/json",
        headers=headers,
    )
