"""What happens to a billing request before its handler: who is calling (headers only), whether a body may be
read at all, how much of it, and whether the caller is within its request rate and report concurrency.

The body of an unknown caller is never read (401 from the headers alone), and no body is read past
`api_max_body_bytes` (413, from Content-Length before reading, or as soon as a chunked body passes it).
A pure ASGI middleware, not a FastAPI dependency: FastAPI reads and parses the body before it resolves
dependencies, which is how a 200 MB unauthenticated POST once grew the process by ~570 MB to answer 401.
"""

from __future__ import annotations

import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.billing import metrics
from services.billing.auth import Caller, identify, resolve, token_from
from services.billing.errors import GatewayError, InvalidApiKey, InvalidRequest, PayloadTooLarge, RateLimited
from services.billing.errors import response_for as error_response
from services.billing.ratelimit import TokenBuckets
from services.billing.settings import BillingSettings

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Reads that run ClickHouse queries over usage rows: the ones one caller could use to hog the engine.
REPORT_PATHS = ("/v1/usage", "/v1/reports/", "/v1/invoices", "/v1/dashboard/data", "/v1/reconcile")


class Admission:
    def __init__(self, app: ASGIApp, settings: BillingSettings) -> None:
        self.app = app
        self.max_body = settings.api_max_body_bytes
        self.team_buckets = TokenBuckets(settings.api_team_rate_per_s, settings.api_team_burst)
        self.staff_buckets = TokenBuckets(settings.api_staff_rate_per_s, settings.api_staff_burst)
        self.reports_in_flight = settings.api_reports_in_flight
        self._running: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            length = _content_length(headers)
            has_body = scope["method"] in BODY_METHODS and (bool(length) or "transfer-encoding" in headers)
            caller = _identify(scope, headers, must=has_body)
            if caller is None:  # no body to protect: the route answers 401 itself, or serves a public page
                await self.app(scope, receive, send)
                return
            who = f"team:{caller.team_id}" if caller.role == "team" else caller.role
            self._admit(caller, who)
            if length is not None and length > self.max_body:
                raise PayloadTooLarge(f"request body of {length} bytes is over the {self.max_body}-byte limit")
            if has_body:
                receive = await self._buffered(receive)
        except GatewayError as err:
            await _refuse(err, scope, receive, send)
            return
        report = scope["path"].startswith(REPORT_PATHS) and scope["method"] == "GET"
        if not report:
            await self.app(scope, receive, send)
            return
        if self._running.get(who, 0) >= self.reports_in_flight:
            metrics.API_REFUSED.labels(reason="reports_in_flight").inc()
            err = RateLimited(f"at most {self.reports_in_flight} reports at a time per caller; retry shortly", 1)
            await _refuse(err, scope, receive, send)
            return
        self._running[who] = self._running.get(who, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._running[who] -= 1
            if not self._running[who]:
                del self._running[who]

    def _admit(self, caller: Caller, who: str) -> None:
        buckets = self.team_buckets if caller.role == "team" else self.staff_buckets
        retry_after = buckets.take(who, time.monotonic())
        if retry_after:
            metrics.API_REFUSED.labels(reason="rate_limited").inc()
            raise RateLimited(
                f"too many billing API requests: the limit is {buckets.rate:g}/s (burst {buckets.burst}) per "
                f"{'team' if caller.role == 'team' else 'service token'}; retry after {retry_after} s",
                retry_after,
            )

    async def _buffered(self, receive: Receive) -> Receive:
        """Read the body up to the cap (a chunked body has no length to check up front), then replay it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see that
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLarge(f"request body is over the {self.max_body}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _content_length(headers: Headers) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise InvalidRequest("Content-Length: must be a whole number of bytes")
    return int(raw)


def _identify(scope: Scope, headers: Headers, must: bool) -> Caller | None:
    """The caller from the headers, or None. With `must` (a body is coming) an unknown caller is a 401 now."""
    state = scope["app"].state
    accounts = getattr(state, "accounts", None)
    if accounts is None:  # not started yet: nothing to authenticate against
        if must:
            raise InvalidApiKey("billing is starting; retry shortly")
        return None
    token = token_from(headers.get("authorization"), headers.get("x-api-key"))
    if not must:  # the route answers (and counts) an unknown caller
        return identify(token, state.settings, accounts) if token else None
    try:
        return resolve(token, state.settings, accounts)
    except InvalidApiKey:
        metrics.API_REFUSED.labels(reason="unauthenticated_body").inc()
        raise


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    return replay


async def _refuse(err: GatewayError, scope: Scope, receive: Receive, send: Send) -> None:
    if isinstance(err, PayloadTooLarge):
        metrics.API_REFUSED.labels(reason="body_too_large").inc()
    response = error_response(err)
    # The body (if any) was not read: ask the client not to reuse a connection that still carries it.
    response.headers["connection"] = "close"
    await response(scope, receive, send)
