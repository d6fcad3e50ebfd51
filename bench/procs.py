"""Child processes of a bench run: started pinned to a core, waited on until they answer, CPU-accounted, stopped."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# The proxy under test gets core 0; load generator, mocks, broker and billing share core 1.
PROXY_CPU = "0"
LOAD_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: list[str], cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if cpu is not None and can_pin() else cmd


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """user+system CPU of this process and all its descendants (LiteLLM and npm spawn children)."""
        return sum(_cpu_of(p) for p in _tree(self.pid))

    def stop(self, timeout_s: float = 15.0) -> None:
        if not self.alive():
            return
        # the child leads its own session: signal its group, so wrappers (taskset, npx) pass it on
        try:
            os.killpg(self.pid, signal.SIGINT)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)


def start(name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None, cpu: str | None = None,
          cwd: Path | None = None) -> Proc:  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    popen = subprocess.Popen(pinned(cmd, cpu), env=env, cwd=cwd, stdout=open(log_path, "ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return Proc(name, popen, log_path)


def wait_http(proc: Proc, url: str, timeout_s: float = 60.0, ok: tuple[int, ...] = (200,),
              headers: dict[str, str] | None = None) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code in ok:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not answering {url} within {timeout_s}s:\n{proc.log_tail()}")
        time.sleep(0.1)


def wait_port(proc: Proc, port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not listening on {port} within {timeout_s}s")
        time.sleep(0.05)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the comm field: state is [0], utime [11], stime [12] (fields 14 and 15 of proc(5))
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
