"""Several uvicorn servers in one event loop, stopped by their owner (the runtime holds the signals), each
with the connection limits of `ServerSettings` (tollway/http_guard.py enforces them)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tollway import http_guard


class StartupError(Exception):
    """A server that cannot start for a reason the operator fixes (port taken, bad address): one line, exit 2."""


class ServerSettings(BaseSettings):
    """Limits every HTTP server of the process applies (proxy, billing, mock upstream), per server.

    Sized so that 2,000 slow connections cost tens of MB, not hundreds, and are cut within seconds, while a
    real client (headers in one packet, a 4 MiB body at >140 KB/s) never meets them. See docs/operations.md.
    """

    model_config = SettingsConfigDict(env_prefix="TOLLWAY_HTTP_", frozen=True, extra="ignore")

    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)  # request line + headers -> 431 beyond
    header_timeout_s: float = Field(10.0, gt=0, le=600)  # connect (or first byte) -> headers complete -> 408
    body_timeout_s: float = Field(30.0, gt=0, le=3600)  # headers complete -> body complete -> 408
    keepalive_timeout_s: float = Field(5.0, gt=0, le=600)  # idle between requests -> closed
    max_connections: int = Field(4096, ge=1, le=1_000_000)  # open connections per server -> 503 beyond

    def limits(self) -> http_guard.Limits:
        return http_guard.Limits(self.max_header_bytes, self.header_timeout_s, self.body_timeout_s,
                                 self.max_connections)  # fmt: skip


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner, who stops it with `should_exit = True`, and sweeps
    its connections' deadlines once a second."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn swaps in its own SIGINT/SIGTERM handlers here and re-raises them on exit; with
        # several servers in one loop that would steal the runtime's ordered shutdown.
        yield

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0:  # uvicorn ticks every 0.1 s
            http_guard.sweep(self.server_state.connections, asyncio.get_running_loop().time())
        return await super().on_tick(counter)


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# httptools parses HTTP in C (h11 is pure Python); uvloop only matters where the CLI made the loop
# (tollway/cli.py), the setting just tells uvicorn not to fight it. Both optional: h11/asyncio otherwise.
HTTP_IMPL = "httptools" if _available("httptools") else "h11"
LOOP_IMPL = "uvloop" if _available("uvloop") else "asyncio"


def make_server(app: Any, host: str, port: int, settings: ServerSettings | None = None) -> QuietServer:
    s = settings or ServerSettings()
    _raise_open_files_limit()
    # httptools through the guarded protocol; h11 (only for the bench's variant) has just its own header cap
    http: Any = http_guard.protocol_for(s.limits()) if HTTP_IMPL == "httptools" else HTTP_IMPL
    # proxy_headers off: nothing here reads the client address, and uvicorn's X-Forwarded-* middleware was ~2%
    # of the proxy's CPU per call; no Server header either (it names the implementation, and costs bytes).
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=10, loop=LOOP_IMPL, http=http, proxy_headers=False,
                            server_header=False, timeout_keep_alive=s.keepalive_timeout_s,
                            h11_max_incomplete_event_size=s.max_header_bytes)  # fmt: skip
    return QuietServer(config)


def _raise_open_files_limit() -> None:
    """The soft open-files limit (often 1,024) up to the hard one: the connection cap, not EMFILE, should decide."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


_ADDRESS_SETTINGS = {"proxy": "TOLLWAY_PROXY_HOST / TOLLWAY_PROXY_PORT",
                      "billing": "TOLLWAY_BILLING_HOST / TOLLWAY_BILLING_PORT",
                      "mock-upstream": "TOLLWAY_MOCK_HOST / TOLLWAY_MOCK_PORT"}  # fmt: skip


def bind(host: str, port: int, name: str = "") -> socket.socket:
    """The listening socket, bound here so that a taken port is a one-line StartupError naming the setting to
    change (uvicorn would log and sys.exit(1) inside the server task)."""
    sock = None
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]  # fmt: skip
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as err:
        if sock is not None:
            sock.close()
        hint = _ADDRESS_SETTINGS.get(name)
        raise StartupError(f"{name + ' ' if name else ''}cannot listen on {host}:{port}: {err.strerror or err}"
                           + (f" (set {hint})" if hint else "")) from None  # fmt: skip
    sock.set_inheritable(True)
    return sock


def bound_port(server: uvicorn.Server) -> int:
    """The port actually bound once `server.started` (differs from the config when it asked for 0)."""
    return server.servers[0].sockets[0].getsockname()[1]


async def start_server(server: QuietServer, name: str, timeout_s: float = 30.0) -> asyncio.Task[None]:
    """Run `server.serve()` as a task and return once it listens (or raise if it died starting)."""
    sock = bind(server.config.host, server.config.port, name)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not server.started:
        if task.done():
            try:
                task.result()
            except BaseException as err:  # uvicorn calls sys.exit(1) when the app's lifespan fails
                raise RuntimeError(f"{name} failed to start: {err!r}") from None
            raise RuntimeError(f"{name} exited during start-up")
        if loop.time() > deadline:
            server.should_exit = True
            raise RuntimeError(f"{name} did not start within {timeout_s}s")
        await asyncio.sleep(0.02)
    return task


async def stop_server(server: QuietServer, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def serving(app: Any, name: str, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """`app` on a real uvicorn server (a free port by default) for the block; yields its base URL."""
    server = make_server(app, host, port)
    task = await start_server(server, name)
    try:
        yield f"http://{host}:{bound_port(server)}"
    finally:
        await stop_server(server, task)
