"""Billing's typed errors and the one place that turns them into OpenAI-shaped JSON."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.errors import error_json

log = structlog.get_logger("tollway.billing")


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class UnknownPlan(InvalidRequest):
    code = "unknown_plan"


class InvalidApiKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class TeamNotFound(NotFound):
    code = "team_not_found"


class KeyNotFound(NotFound):
    code = "key_not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _response(status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_json(message, type_, code), status_code=status, headers=headers)


def response_for(exc: GatewayError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, InvalidApiKey) else None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return _response(exc.status, exc.message, exc.type, exc.code, headers)


async def _gateway_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return response_for(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Name the field and the rule, never echo the input: a body may carry a secret.
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    # A body that parsed but holds a value out of bounds is 422; bad JSON and bad query parameters are 400.
    errors = exc.errors()
    in_body = bool(errors) and all(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors)
    status = 422 if in_body and not any(e.get("type") == "json_invalid" for e in errors) else 400
    return _response(status, "; ".join(parts) or "invalid request", "invalid_request_error", "invalid_request_error")


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
    kind = "invalid_request_error" if exc.status_code < 500 else "api_error"
    return _response(exc.status_code, str(exc.detail), kind, code, exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled_error", path=request.url.path, error=type(exc).__name__, exc_info=exc)
    return _response(500, "internal error", "api_error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
