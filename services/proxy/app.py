"""The proxy app: everything the request path needs is built here once and closed in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import structlog
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from schemas.config import GatewayConfig
from services.proxy import upstream
from services.proxy.auth import KeyView
from services.proxy.cache import ResponseCache
from services.proxy.control import ControlListener
from services.proxy.errors import GatewayError, InvalidRequest, error_response
from services.proxy.events import UsageEmitter
from services.proxy.handler import ProxyHandler
from services.proxy.health import Health
from services.proxy.http1 import Http1Pool
from services.proxy.limiter import MemoryLimiter, RedisLimiter
from services.proxy.quota import QuotaGate
from services.proxy.routing import Router
from services.proxy.settings import ProxySettings

log = structlog.get_logger("tollway.proxy")


class ProxyApp(FastAPI):
    """FastAPI for the API surface (health, metrics, error handlers, lifespan), with the proxied endpoints
    dispatched ahead of it: FastAPI's middleware stack and route scan cost ~17% of a call (bench finding 4)."""

    fast_routes: dict[tuple[str, str], Callable[[ProxyHandler, Request], Awaitable[Response]]] = {
        ("POST", "/v1/chat/completions"): ProxyHandler.chat_completions,
        ("POST", "/v1/embeddings"): ProxyHandler.embeddings,
        ("GET", "/v1/models"): ProxyHandler.models,
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


def create_app(settings: ProxySettings, config: GatewayConfig, bootstrap: str, replay_spool: bool = False) -> FastAPI:
    """`replay_spool`: the broker is a fresh in-memory one, so re-send the spool's retained window."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = app.state
        st.settings, st.config = settings, config
        st.router = Router(config)
        st.view = KeyView()
        st.quota = QuotaGate(config)  # monthly quotas: billing's signals + local counting + reservations
        # One reader of the control topic, folded by the key view, then the quota gate.
        st.control = ControlListener(bootstrap, st.view.apply, st.quota.on_control)
        st.stop = asyncio.Event()
        # the hot hop: plain (non-streamed) calls
        st.plain = Http1Pool(settings.upstream_max_connections, max_body_bytes=settings.upstream_max_body_bytes)
        st.upstream = upstream.open_session(settings.upstream_max_connections)  # streamed calls (aiohttp)
        st.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0))  # health probes only
        st.limiter = RedisLimiter(settings.redis_url) if settings.redis_url else MemoryLimiter()
        st.cache = ResponseCache(config.cache.max_entries, config.cache.max_bytes, config.cache.max_entry_bytes)
        st.health = Health(st.router, config)
        probe_task = asyncio.create_task(st.health.probe_loop(st.http, st.router, st.stop), name="health-probes")
        instance = settings.instance()
        seq_name = instance.replace("/", "_").replace(":", "_") + ".seq"
        st.emitter = UsageEmitter(bootstrap, instance, settings.data_dir / "proxy" / seq_name,
                                  settings.event_linger_ms, settings.event_queue_max,
                                  replay_retained=replay_spool)  # fmt: skip
        await st.emitter.start()
        control_task = asyncio.create_task(st.control.run(st.stop), name="control-listener")
        st.handler = ProxyHandler(st)
        log.info("proxy_started", instance=instance, models=len(config.models))
        try:
            yield
        finally:
            st.stop.set()
            await st.emitter.stop()
            await asyncio.gather(control_task, probe_task, return_exceptions=True)
            await st.limiter.close()
            await st.http.aclose()
            await st.upstream.close()
            await st.plain.close()
            log.info("proxy_stopped")

    app = ProxyApp(title="Tollway proxy", lifespan=lifespan, docs_url=None, redoc_url=None)

    # The proxied endpoints are served by ProxyApp.__call__; these routes only make them known to FastAPI
    # (a wrong method on them answers 405 through FastAPI's handler).
    async def chat(request: Request) -> Response:
        return await request.app.state.handler.chat_completions(request)

    async def embeddings(request: Request) -> Response:
        return await request.app.state.handler.embeddings(request)

    async def models(request: Request) -> Response:
        return await request.app.state.handler.models(request)

    app.router.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.router.add_route("/v1/embeddings", embeddings, methods=["POST"])
    app.router.add_route("/v1/models", models, methods=["GET"])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        st = request.app.state
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

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        err = InvalidRequest(f"Unknown endpoint {request.method} {request.url.path}", code="unknown_url")
        err.status = 404
        return error_response(err)

    @app.exception_handler(405)
    async def bad_method(request: Request, exc: Exception) -> Response:
        err = InvalidRequest(f"Method {request.method} not allowed on {request.url.path}", code="method_not_allowed")
        err.status = 405
        return error_response(err)

    return app
