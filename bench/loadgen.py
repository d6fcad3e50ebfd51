"""The load generator: wrk (Debian) with a Lua script for the POST body and a JSON summary, in its own process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.procs import LOAD_CPU, pinned

MARK = "WRKJSON "

# The same ~1 KB chat body for every target: a system prompt and a user turn, non-zero temperature so
# that no gateway answers it from a cache.
SYSTEM = (
    "You are a careful assistant for an internal engineering team. Answer concisely, cite the document "
    "section you relied on, and say so plainly when the context does not contain the answer. "
)
USER = (
    "Here is the context for the question. The billing pipeline has three stages: the proxy emits one "
    "usage event per call to a Kafka topic; the meter prices each event and writes it to ClickHouse; the "
    "billing service keeps month-to-date totals in memory and signals the proxy when a team crosses its "
    "quota. Invoices are computed from ClickHouse, which is the source of truth. Question: which stage "
    "decides that a team is over its quota, and how quickly does the proxy learn about it? Please keep "
    "the answer to three sentences and mention the topic names involved in the signal path."
)


def chat_body(model: str, *, stream: bool = False, temperature: float = 0.7) -> dict:
    body: dict = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        "temperature": temperature,
        "max_tokens": 64,
        "user": "bench-user",
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def messages_body(model: str, *, stream: bool = False) -> dict:
    """The same prompt as chat_body, as an Anthropic Messages request."""
    body: dict = {"model": model, "system": SYSTEM, "messages": [{"role": "user", "content": USER}],
                  "temperature": 0.7, "max_tokens": 64, "metadata": {"user_id": "bench-user"}}  # fmt: skip
    if stream:
        body["stream"] = True
    return body


LUA = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{mark}{{"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,"connect":%d,' ..
    '"read":%d,"write":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f}}\\n', summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read,
    e.write, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def lua_script(body: bytes, headers: dict[str, str]) -> str:
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    return LUA.format(body=body.decode(), headers=lines, mark=MARK)


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    errors: int  # non-2xx/3xx responses plus socket errors and timeouts
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def parse(stdout: str) -> WrkResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{stdout[-2000:]}")
    d = json.loads(line[len(MARK) :])
    dur = d["duration_us"] / 1e6
    errors = d["non2xx"] + d["connect"] + d["read"] + d["write"] + d["timeout"]
    return WrkResult(
        requests=d["requests"], duration_s=round(dur, 3), rps=round(d["requests"] / dur, 1) if dur else 0.0,
        errors=errors, p50_ms=d["p50_us"] / 1000, p90_ms=d["p90_us"] / 1000, p99_ms=d["p99_us"] / 1000,
        p999_ms=d["p999_us"] / 1000, max_ms=d["max_us"] / 1000, mean_ms=round(d["mean_us"] / 1000, 3),
    )  # fmt: skip


def ensure_wrk() -> str:
    """wrk from Debian; installed on first use when we are root (idempotent)."""
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() != 0:
        raise RuntimeError("wrk is missing: sudo apt-get install -y wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env, capture_output=True)
    path = shutil.which("wrk")
    if not path:
        raise RuntimeError("apt-get install wrk did not put wrk on PATH")
    return path


def run_wrk(url: str, body: bytes, headers: dict[str, str], connections: int, duration_s: float,
            threads: int | None = None, timeout_s: float = 10.0) -> WrkResult:  # fmt: skip
    wrk = ensure_wrk()
    threads = threads or (1 if connections < 64 else 2)
    threads = min(threads, connections)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua_script(body, {"Content-Type": "application/json", **headers}))
        script = f.name
    try:
        cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s", f"--timeout={timeout_s:g}s",
               "-s", script, url]  # fmt: skip
        out = subprocess.run(pinned(cmd, LOAD_CPU), capture_output=True, text=True, timeout=duration_s + 60)
    finally:
        Path(script).unlink(missing_ok=True)
    return parse(out.stdout)
