"""`tollway up` and the single-service commands: open engines, start services, stop them in order.

Start: broker (bundled unless TOLLWAY_KAFKA_BOOTSTRAP) -> topics -> ClickHouse + migrations -> billing
-> meter -> proxy (-> mock upstream and demo key with --demo). Stop in reverse: the proxy flushes its
usage events, the meter drains and commits, billing closes, then the broker child goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from schemas.clickhouse import Store
from schemas.config import ConfigError, GatewayConfig, Provider, load_config
from schemas.settings import CommonSettings
from tollway.broker import BundledBroker, wait_for_broker
from tollway.servers import QuietServer, make_server, start_server, stop_server
from tollway.topics import ensure_topics

if TYPE_CHECKING:
    from services.meter.health import MeterHealth
    from services.meter.settings import MeterSettings

log = structlog.get_logger("tollway")


def load_or_exit(settings: CommonSettings) -> GatewayConfig:
    try:
        return load_config(settings.config)
    except ConfigError as err:
        print(f"tollway: {err}", file=sys.stderr)
        raise SystemExit(2) from None


async def check_prices_or_exit(store: Store, config: GatewayConfig, by: str) -> None:
    """Refuse to start on a price edited in place (schemas/price_versions.py); record the prices in force."""
    from schemas.price_versions import PriceEditedInPlace, check_and_record

    try:
        recorded = await check_and_record(store, config, by)
    except PriceEditedInPlace as err:
        print(f"tollway: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("price_versions_checked", newly_recorded=recorded)


DEMO_PROVIDER_KEY = "mock-provider-key"  # the mock's Messages API wants a key, as Anthropic's does; any will do


def demo_headers(p: Provider) -> dict[str, str]:
    return {**p.headers, "x-api-key": DEMO_PROVIDER_KEY} if p.api == "anthropic" else p.headers


def demo_config(config: GatewayConfig, mock_url: str) -> GatewayConfig:
    """Every provider pointed at the bundled mock upstream: the whole path works with no internet."""
    providers = {name: p.model_copy(update={"base_url": mock_url, "api_key_env": None, "headers": demo_headers(p)})
                 for name, p in config.providers.items()}  # fmt: skip
    return config.model_copy(update={"providers": providers})


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


@contextlib.asynccontextmanager
async def kafka(settings: CommonSettings) -> AsyncIterator[tuple[str, BundledBroker | None]]:
    """The configured cluster, or a bundled broker child for the life of the block."""
    broker = None
    if settings.kafka_bootstrap:
        bootstrap = settings.kafka_bootstrap
        await wait_for_broker(bootstrap, timeout_s=60)
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        pidfile = settings.data_dir / "broker.pid"
        reap_orphan_broker(pidfile)
        broker = BundledBroker(log_path=settings.data_dir / "broker.log")
        bootstrap = await asyncio.to_thread(broker.start)
        if broker.proc is not None:
            pidfile.write_text(str(broker.proc.pid))
    try:
        await ensure_topics(bootstrap, settings.usage_partitions)
        yield bootstrap, broker
    finally:
        if broker:
            await asyncio.to_thread(broker.stop)


def reap_orphan_broker(pidfile: Path) -> None:
    """A kill -9 of `tollway up` leaves its broker child running (own session). It holds nothing we need
    (the proxy spool replays into the new broker), so stop it rather than leak it."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"broker" in cmdline and b"memory://" in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log.warning("orphan_broker_killed", pid=pid)
    pidfile.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def clickhouse(settings: CommonSettings) -> AsyncIterator[Store]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.resolved_clickhouse_url(), settings.clickhouse_database)
    await store.open()
    try:
        applied = await store.migrate()
        log.info("clickhouse_ready", url=_redact(store.url), migrations_applied=applied)
        yield store
    finally:
        await store.close()


def _redact(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


@dataclass
class Running:
    servers: list[tuple[str, QuietServer, asyncio.Task[None]]] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


async def up(demo: bool = False) -> None:
    from services.billing.app import create_app as billing_app
    from services.billing.settings import BillingSettings
    from services.meter.consumer import run_meter
    from services.meter.settings import MeterSettings
    from services.mock_upstream.app import create_app as mock_app
    from services.mock_upstream.settings import MockSettings
    from services.proxy.app import create_app as proxy_app
    from services.proxy.settings import ProxySettings

    proxy_s, meter_s, mock_s = ProxySettings(), MeterSettings(), MockSettings()
    billing_s = BillingSettings()
    if not billing_s.admin_token:
        billing_s = billing_s.model_copy(update={"admin_token": "adm-" + secrets.token_urlsafe(24)})
        print(f"TOLLWAY_ADMIN_TOKEN not set; generated one for this run: {billing_s.admin_token}", flush=True)
    config = load_or_exit(proxy_s)
    mock_url = f"http://{mock_s.mock_host}:{mock_s.mock_port}/v1"
    if demo:
        config = demo_config(config, mock_url)

    stop = asyncio.Event()
    install_stop_signals(stop)
    run = Running()
    async with kafka(proxy_s) as (bootstrap, broker), clickhouse(meter_s) as store:
        await check_prices_or_exit(store, config, "up")  # meter and billing share this store and config
        try:
            if demo:
                srv = make_server(mock_app(mock_s), mock_s.mock_host, mock_s.mock_port)
                run.servers.append(("mock-upstream", srv, await start_server(srv, "mock-upstream")))
            srv = make_server(billing_app(billing_s, config, store, bootstrap), billing_s.billing_host,
                              billing_s.billing_port)  # fmt: skip
            run.servers.append(("billing", srv, await start_server(srv, "billing")))
            meter_stop = asyncio.Event()
            meter_task = asyncio.create_task(
                run_meter(meter_s, config, store, bootstrap, meter_stop, drain=broker is not None), name="meter"
            )
            # A bundled broker starts empty: the proxy re-sends its spool's retained window (dedup absorbs it).
            app = proxy_app(proxy_s, config, bootstrap, replay_spool=broker is not None)
            srv = make_server(app, proxy_s.proxy_host, proxy_s.proxy_port)
            run.servers.append(("proxy", srv, await start_server(srv, "proxy")))
            billing_url = f"http://{billing_s.billing_host}:{billing_s.billing_port}"
            proxy_url = f"http://{proxy_s.proxy_host}:{proxy_s.proxy_port}/v1"
            print(f"Tollway is up: proxy {proxy_url}  billing {billing_url}  kafka {bootstrap}", flush=True)
            print(f"Dashboard: {billing_url}/dashboard  (sign in with the admin token or a team key)", flush=True)
            if demo:
                await print_demo(billing_url, billing_s.admin_token or "", proxy_url, mock_url)
            await wait_any(stop, meter_task)
        finally:
            # Reverse order: proxy first (its lifespan flushes usage events), then the meter drains.
            for name, srv, task in reversed(run.servers):
                if name == "proxy":
                    await stop_server(srv, task)
            if "meter_task" in locals():
                meter_stop.set()
                await asyncio.gather(meter_task, return_exceptions=True)
            for name, srv, task in reversed(run.servers):
                if name != "proxy":
                    await stop_server(srv, task)
            print("Tollway stopped.", flush=True)


async def wait_any(stop: asyncio.Event, *tasks: asyncio.Task[Any]) -> None:
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for t in tasks:
        if t in done and t.exception():
            log.error("service_died", task=t.get_name(), error=repr(t.exception()))


async def print_demo(billing_url: str, admin_token: str, proxy_url: str, mock_url: str) -> None:
    async with httpx.AsyncClient(base_url=billing_url, headers={"authorization": f"Bearer {admin_token}"}) as c:
        teams = (await c.get("/v1/admin/teams", params={"name": "demo"})).json()
        rows = teams.get("data", teams) if isinstance(teams, dict) else teams
        team_id = (
            rows[0]["team_id"] if rows else (await c.post("/v1/admin/teams", json={"name": "demo"})).json()["team_id"]
        )
        key = (await c.post("/v1/admin/keys", json={"team_id": team_id, "name": "demo"})).json()
    print(
        f"""
Demo ready (mock upstream at {mock_url}).
  team: demo ({team_id})   key: {key["key"]}

  curl {proxy_url}/chat/completions -H "Authorization: Bearer {key["key"]}" \\
       -H "Content-Type: application/json" \\
       -d '{{"model": "gpt-4.1", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python: OpenAI(base_url="{proxy_url}", api_key="{key["key"]}")
  usage:  curl "{billing_url}/v1/usage?group_by=model" -H "Authorization: Bearer {key["key"]}"

Ctrl-C stops everything.""",
        flush=True,
    )


async def run_proxy() -> None:
    from services.proxy.app import create_app
    from services.proxy.settings import ProxySettings

    s = ProxySettings()
    bootstrap = _require_bootstrap(s)
    config = load_or_exit(s)
    await _serve_alone(create_app(s, config, bootstrap), s.proxy_host, s.proxy_port, "proxy")


async def run_billing() -> None:
    from services.billing.app import create_app
    from services.billing.settings import BillingSettings

    s = BillingSettings()
    bootstrap = _require_bootstrap(s)
    config = load_or_exit(s)
    async with clickhouse(s) as store:
        await check_prices_or_exit(store, config, "billing")
        # The topics are made when the broker is first reached, not before serving: billing starts (and serves
        # invoices, usage and admin writes) while the broker is away.
        app = create_app(
            s, config, store, bootstrap, prepare_broker=lambda: ensure_topics(bootstrap, s.usage_partitions)
        )
        await _serve_alone(app, s.billing_host, s.billing_port, "billing")


async def run_meter_alone() -> None:
    from services.meter.consumer import run_meter
    from services.meter.health import MeterHealth
    from services.meter.settings import MeterSettings

    s = MeterSettings()
    bootstrap = _require_bootstrap(s)
    config = load_or_exit(s)
    stop = asyncio.Event()
    health = MeterHealth(stop)
    # Listening before the slow start-up steps: probes see "alive, not started" rather than a refused connection.
    async with _meter_http(s, health):
        health.phase = "creating Kafka topics"
        await ensure_topics(bootstrap, s.usage_partitions)
        install_stop_signals(stop)
        health.phase = "opening ClickHouse"
        async with clickhouse(s) as store:
            health.phase = "checking prices"
            await check_prices_or_exit(store, config, "meter")
            health.phase = "starting the consumer"
            await run_meter(s, config, store, bootstrap, stop, health.started)


@contextlib.asynccontextmanager
async def _meter_http(s: MeterSettings, health: MeterHealth) -> AsyncIterator[None]:
    from services.meter.health import serving

    async with contextlib.AsyncExitStack() as stack:
        if s.http_port is not None:
            try:
                bound = await stack.enter_async_context(serving(health, s.meter_http_host, s.http_port))
            except OSError as err:
                print(f"tollway: the meter cannot listen on {s.meter_http_host}:{s.http_port} "
                      f"(TOLLWAY_METER_HTTP_HOST/_PORT): {err}", file=sys.stderr)  # fmt: skip
                raise SystemExit(2) from None
            print(f"tollway meter: /metrics /healthz /readyz on http://{s.meter_http_host}:{bound}", flush=True)
        yield


async def run_mock() -> None:
    from services.mock_upstream.app import create_app
    from services.mock_upstream.settings import MockSettings

    s = MockSettings()
    await _serve_alone(create_app(s), s.mock_host, s.mock_port, "mock-upstream")


def _require_bootstrap(s: CommonSettings) -> str:
    if not s.kafka_bootstrap:
        print("tollway: set TOLLWAY_KAFKA_BOOTSTRAP (the bundled broker runs only under `tollway up`)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    return s.kafka_bootstrap


async def _serve_alone(app: Any, host: str, port: int, name: str) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    srv = make_server(app, host, port)
    task = await start_server(srv, name)
    print(f"tollway {name} listening on http://{host}:{port}", flush=True)
    await wait_any(stop, task)
    await stop_server(srv, task)
