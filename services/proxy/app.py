"""The proxy app: its lifespan opens the ProxyState (services/proxy/state.py) and the handler over it; the
proxied endpoints are dispatched ahead of FastAPI, which serves health, readiness and metrics."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import structlog
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from schemas.config import GatewayConfig
from services.proxy import messages, models
from services.proxy.errors import GatewayError, InvalidRequest, Shape, error_response
from services.proxy.handler import ProxyHandler
from services.proxy.responses import ResponsesHandler
from services.proxy.settings import ProxySettings
from services.proxy.state import ProxyState, open_proxy_state

log = structlog.get_logger("tollway.proxy")


class ProxyApp(FastAPI):
    """FastAPI for the API surface (health, metrics, error handlers, lifespan), with the proxied endpoints
    dispatched ahead of it: FastAPI's middleware stack and route scan cost ~17% of a call (bench finding 4)."""

    fast_routes: dict[tuple[str, str], Callable[[ProxyHandler, Request], Awaitable[Response]]] = {
        ("POST", "/v1/chat/completions"): ProxyHandler.chat_completions,
        ("POST", "/v1/embeddings"): ProxyHandler.embeddings,
        ("GET", "/v1/models"): models.list_models,
        ("POST", "/v1/responses"): lambda _h, r: r.app.state.responses.create(r),
        ("POST", "/v1/messages"): messages.create,
        ("POST", "/v1/messages/count_tokens"): messages.count_tokens,
    }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.fast_routes.get((scope["method"], scope["path"]))
            if endpoint is not None:
                scope["app"] = self  # request.app.state is this app's, set up by its lifespan
                request = Request(scope, receive)
                try:
                    response = await endpoint(self.state.handler, request)
                except GatewayError as err:  # the handler answers its own errors; this is a safety net
                    response = error_response(err, request.headers.get("x-request-id"))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _responses_route(name: str) -> Callable[[Request], Awaitable[Response]]:
    async def route(request: Request) -> Response:
        return await getattr(request.app.state.responses, name)(request)

    return route


def _route(serve: Callable[[ProxyHandler, Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await serve(request.app.state.handler, request)

    return endpoint


def create_app(settings: ProxySettings, config: GatewayConfig, bootstrap: str, replay_spool: bool = False) -> FastAPI:
    """`replay_spool`: the broker is a fresh in-memory one, so re-send the spool's retained window."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_proxy_state(settings, config, bootstrap, replay_spool) as proxy:
            app.state.proxy = proxy
            app.state.handler = ProxyHandler(proxy)
            app.state.responses = ResponsesHandler(app.state.handler)
            log.info("proxy_started", instance=proxy.instance, models=len(config.models))
            yield
        log.info("proxy_stopped")

    app = ProxyApp(title="Tollway proxy", lifespan=lifespan, docs_url=None, redoc_url=None)

    # The proxied endpoints are served by ProxyApp.__call__; these routes only make them known to FastAPI
    # (a wrong method on them answers 405 through FastAPI's handler).
    async def chat(request: Request) -> Response:
        return await request.app.state.handler.chat_completions(request)

    async def embeddings(request: Request) -> Response:
        return await request.app.state.handler.embeddings(request)

    app.router.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.router.add_route("/v1/embeddings", embeddings, methods=["POST"])
    app.router.add_route("/v1/models", _route(models.list_models), methods=["GET"])
    # a path parameter, off the hot path: FastAPI's router serves it (`:path`: names may hold a slash)
    app.router.add_route("/v1/models/{model_id:path}", _route(models.retrieve_model), methods=["GET"])
    for path, serve in (("/v1/messages", messages.create), ("/v1/messages/count_tokens", messages.count_tokens)):
        app.router.add_route(path, _route(serve), methods=["POST"])
    # the follow-ups on a stored response: path parameters, off the hot path, so FastAPI's router serves them
    responses = {"create": ("", ["POST"]), "retrieve": ("/{response_id}", ["GET"]),
                 "delete": ("/{response_id}", ["DELETE"]), "cancel": ("/{response_id}/cancel", ["POST"]),
                 "input_items": ("/{response_id}/input_items", ["GET"])}  # fmt: skip
    for name, (suffix, methods) in responses.items():
        app.router.add_route(f"/v1/responses{suffix}", _responses_route(name), methods=methods)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        st: ProxyState = request.app.state.proxy
        checks = {
            "control_view": st.control.caught_up.is_set(),
            "usage_producer": st.emitter.started.is_set(),
            # The broker may be down (the spool keeps every event); not ready only when the spool nears its bound.
            "usage_spool": not st.emitter.spool.degraded,
        }
        ok = all(checks.values())
        body = {"status": "ready" if ok else "not_ready", "checks": checks, "keys": len(st.view.keys_by_hash),
                "events_queued": st.emitter.queued, "usage_broker_connected": st.emitter.connected,
                "spool": st.emitter.spool.stats()}  # fmt: skip
        # route health is detail, not readiness: a proxy with one provider down still serves the others
        body["routes"] = st.health.snapshot()
        body["models_unavailable"] = st.health.unhealthy_models()
        if st.health.probe_results:
            body["probes"] = st.health.probe_results
        return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc, request.headers.get("x-request-id"))

    def shape_of(request: Request) -> Shape:  # Anthropic's clients read Anthropic's errors under its paths
        return "anthropic" if request.url.path.startswith("/v1/messages") else "openai"

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        err = InvalidRequest(f"Unknown endpoint {request.method} {request.url.path}", code="unknown_url")
        err.status = 404
        return error_response(err, shape=shape_of(request))

    @app.exception_handler(405)
    async def bad_method(request: Request, exc: Exception) -> Response:
        err = InvalidRequest(f"Method {request.method} not allowed on {request.url.path}", code="method_not_allowed")
        err.status = 405
        return error_response(err, shape=shape_of(request))

    return app
