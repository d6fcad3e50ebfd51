"""`tollway up --demo` as a real child process on free ports, with its own data dir and broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tollway.broker import free_port

REPO = Path(__file__).resolve().parents[2]
TOLLWAY = str(Path(sys.executable).with_name("tollway"))


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    proxy_url: str
    billing_url: str
    admin_token: str
    log_path: Path

    def cli(self, *args: str) -> dict:
        out = subprocess.run([TOLLWAY, *args], env=self.env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def new_key(self, team: str, timeout_s: float = 2.0) -> dict:
        """Create a key with the CLI and return once the proxy accepts it (control-topic propagation)."""
        created = self.cli("keys", "create", "--team", team)
        t0 = time.monotonic()
        while True:
            r = httpx.get(f"{self.proxy_url}/models", headers={"authorization": f"Bearer {created['key']}"})
            if r.status_code == 200:
                created["active_after_s"] = time.monotonic() - t0
                return created
            assert time.monotonic() - t0 < timeout_s, f"new key not accepted within {timeout_s}s"
            time.sleep(0.01)

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events


def stack_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update(
        TOLLWAY_PROXY_PORT=str(free_port()),
        TOLLWAY_BILLING_PORT=str(free_port()),
        TOLLWAY_MOCK_PORT=str(free_port()),
        TOLLWAY_DATA_DIR=str(tmp / "data"),
        TOLLWAY_CONFIG=str(REPO / "tollway.yaml"),
        TOLLWAY_ADMIN_TOKEN="e2e-admin-token",
        TOLLWAY_LOG_FORMAT="json",
        **extra,
    )
    env["TOLLWAY_BILLING_URL"] = f"http://127.0.0.1:{env['TOLLWAY_BILLING_PORT']}"
    return env


def start_stack(tmp: Path, env: dict[str, str]) -> Stack:
    log_path = tmp / "tollway.log"
    proc = subprocess.Popen([TOLLWAY, "up", "--demo"], env=env, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT, cwd=tmp)  # fmt: skip
    s = Stack(proc, env, f"http://127.0.0.1:{env['TOLLWAY_PROXY_PORT']}/v1", env["TOLLWAY_BILLING_URL"],
              env["TOLLWAY_ADMIN_TOKEN"], log_path)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"tollway up exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(s.proxy_url.removesuffix("/v1") + "/readyz", timeout=1).status_code == 200:
                return s
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"tollway up not ready in 60s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


def stop_stack(s: Stack) -> int:
    if s.proc.poll() is None:
        s.proc.send_signal(signal.SIGINT)
        try:
            s.proc.wait(30)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()
    return s.proc.returncode


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    s = start_stack(tmp, stack_env(tmp))
    yield s
    stop_stack(s)
