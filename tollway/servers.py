"""Several uvicorn servers in one event loop, stopped by their owner (the runtime holds the signals)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import uvicorn


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner, who stops it with `should_exit = True`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn swaps in its own SIGINT/SIGTERM handlers here and re-raises them on exit; with
        # several servers in one loop that would steal the runtime's ordered shutdown.
        yield


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# httptools parses HTTP in C (h11 is pure Python); uvloop only matters where the CLI made the loop
# (tollway/cli.py), the setting just tells uvicorn not to fight it. Both optional: h11/asyncio otherwise.
HTTP_IMPL = "httptools" if _available("httptools") else "h11"
LOOP_IMPL = "uvloop" if _available("uvloop") else "asyncio"


def make_server(app: Any, host: str, port: int) -> QuietServer:
    # proxy_headers off: nothing here reads the client address, and uvicorn's X-Forwarded-* middleware was ~2%
    # of the proxy's CPU per call; no Server header either (it names the implementation, and costs bytes).
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=10, loop=LOOP_IMPL, http=HTTP_IMPL, proxy_headers=False,
                            server_header=False)  # fmt: skip
    return QuietServer(config)


def bound_port(server: uvicorn.Server) -> int:
    """The port actually bound once `server.started` (differs from the config when it asked for 0)."""
    return server.servers[0].sockets[0].getsockname()[1]


async def start_server(server: QuietServer, name: str, timeout_s: float = 30.0) -> asyncio.Task[None]:
    """Run `server.serve()` as a task and return once it listens (or raise if it died starting)."""
    task = asyncio.create_task(server.serve(), name=name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not server.started:
        if task.done():
            try:
                task.result()
            except BaseException as err:  # uvicorn calls sys.exit(1) when the port is taken
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
