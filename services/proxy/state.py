"""Everything the proxy's request path holds for the life of the process, opened by one async context
manager and closed by it in reverse order (a failed start closes what was already open)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import httpx

from schemas.config import GatewayConfig
from services.proxy import upstream
from services.proxy.auth import KeyView
from services.proxy.cache import ResponseCache
from services.proxy.control import ControlListener
from services.proxy.cost import QuoteBook
from services.proxy.events import UsageEmitter
from services.proxy.health import Health
from services.proxy.http1 import Http1Pool
from services.proxy.limiter import MemoryLimiter, RedisLimiter
from services.proxy.quota import QuotaGate
from services.proxy.routing import Router
from services.proxy.settings import ProxySettings


@dataclass(slots=True, frozen=True)
class ProxyState:
    settings: ProxySettings
    config: GatewayConfig
    instance: str
    router: Router
    view: KeyView  # keys and teams, from the control topic
    quota: QuotaGate  # monthly quotas: billing's signals + local counting + reservations
    plain: Http1Pool  # the hot hop: plain (non-streamed) calls
    upstream: aiohttp.ClientSession  # streamed calls
    http: httpx.AsyncClient  # health probes only
    limiter: MemoryLimiter | RedisLimiter
    cache: ResponseCache
    health: Health
    book: QuoteBook  # the proxy's copy of the price book: cost quotes and `cheapest` routing
    emitter: UsageEmitter
    control: ControlListener
    stop: asyncio.Event  # set on shutdown: the background loops end


@contextlib.asynccontextmanager
async def open_proxy_state(settings: ProxySettings, config: GatewayConfig, bootstrap: str,
                           replay_spool: bool = False) -> AsyncIterator[ProxyState]:  # fmt: skip
    """`replay_spool`: the broker is a fresh in-memory one, so re-send the spool's retained window.

    Closed in reverse: the loops are told to stop, the emitter gets its time to empty the spool, the loops
    are awaited, then the clients close."""
    async with contextlib.AsyncExitStack() as stack:
        plain = Http1Pool(settings.upstream_max_connections, max_body_bytes=settings.upstream_max_body_bytes)
        stack.push_async_callback(plain.close)
        session = upstream.open_session(settings.upstream_max_connections)
        stack.push_async_callback(session.close)
        http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0))
        stack.push_async_callback(http.aclose)
        limiter = RedisLimiter(settings.redis_url) if settings.redis_url else MemoryLimiter()
        stack.push_async_callback(limiter.close)
        tasks: list[asyncio.Task[None]] = []
        stack.push_async_callback(_wait_for, tasks)
        router = Router(config)
        view = KeyView()
        quota = QuotaGate(config)
        instance = settings.instance()
        seq_name = instance.replace("/", "_").replace(":", "_") + ".seq"
        emitter = UsageEmitter(bootstrap, instance, settings.data_dir / "proxy" / seq_name,
                               settings.event_linger_ms, settings.event_queue_max,
                               replay_retained=replay_spool)  # fmt: skip
        await emitter.start()
        stack.push_async_callback(emitter.stop)
        stop = asyncio.Event()
        stack.callback(stop.set)
        book = QuoteBook(config)
        health = Health(router, config, book=book)
        # One reader of the control topic, folded by the key view, then the quota gate.
        control = ControlListener(bootstrap, view.apply, quota.on_control)
        tasks.append(asyncio.create_task(health.probe_loop(http, router, stop), name="health-probes"))
        tasks.append(asyncio.create_task(control.run(stop), name="control-listener"))
        cache = ResponseCache(config.cache.max_entries, config.cache.max_bytes, config.cache.max_entry_bytes)
        yield ProxyState(settings=settings, config=config, instance=instance, router=router, view=view, quota=quota,
                         plain=plain, upstream=session, http=http, limiter=limiter, cache=cache, health=health,
                         book=book, emitter=emitter, control=control, stop=stop)  # fmt: skip


async def _wait_for(tasks: list[asyncio.Task[None]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
