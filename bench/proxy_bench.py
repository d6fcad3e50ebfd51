"""Proxy overhead: the same wrk load, direct to the mock and through each gateway, scenario by scenario.

Scenarios (issue 7): c=1 vs the instant mock (added latency), c=32 and c=256 vs the 50 ms mock (added latency
and throughput vs direct), c=64 vs the instant mock (max throughput per core, with the gateway's CPU use),
a streamed call (time to first token), and for Tollway the cache-hit path. Anthropic's /v1/messages gets
the same c=1 and c=64 runs and a streamed TTFT, in the same run as chat (`run_messages`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import orjson

from bench import streaming
from bench.loadgen import chat_body, messages_body, run_wrk
from bench.targets import Target, probe


@dataclass(frozen=True)
class Scenario:
    name: str
    connections: int
    mock: str  # "instant" | "50ms"
    label: str


SCENARIOS = (
    Scenario("c1_instant", 1, "instant", "c=1, instant mock"),
    Scenario("c32_50ms", 32, "50ms", "c=32, 50 ms mock"),
    Scenario("c256_50ms", 256, "50ms", "c=256, 50 ms mock"),
    Scenario("max_instant", 64, "instant", "c=64, instant mock (max)"),
)
CACHE_SCENARIOS = (
    Scenario("cache_c1", 1, "instant", "cache hit, c=1"),
    Scenario("cache_max", 64, "instant", "cache hit, c=64"),
)
CACHE_HEADERS = {"X-Tollway-Cache": "true"}


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def measure(t: Target, sc: Scenario, duration_s: float, warmup_s: float, body: dict | None = None,
            extra_headers: dict[str, str] | None = None, url: str | None = None) -> dict:  # fmt: skip
    raw = orjson.dumps(body or chat_body(t.models[sc.mock]))
    headers = {**t.headers_for(sc.mock), **(extra_headers or {})}
    url = url or t.urls[sc.mock]
    if warmup_s > 0:
        run_wrk(url, raw, headers, sc.connections, warmup_s)
    cpu0, t0 = (t.proc.cpu_seconds() if t.proc else 0.0), time.monotonic()
    res = run_wrk(url, raw, headers, sc.connections, duration_s)
    wall = time.monotonic() - t0
    out = res.as_dict()
    if t.proc:
        # a gateway at 100% of its core is the bottleneck; well below, the mock or the client is
        cpu = (t.proc.cpu_seconds() - cpu0) / wall
        out["gateway_cpu"] = round(cpu, 3)
        out["rps_per_core"] = round(res.rps / cpu, 1) if cpu > 0.05 else None
    out["load_avg"] = load_avg()
    return out


def run_target(t: Target, duration_s: float, warmup_s: float, stream_calls: int, log=print) -> dict:
    """Every scenario against one target (started by the caller), direct included."""
    out: dict = {"scenarios": {}}
    for kind in ("instant", "50ms"):
        probe(t, kind, chat_body(t.models[kind]))
    for sc in SCENARIOS:
        log(f"  {t.name}: {sc.label} ...")
        out["scenarios"][sc.name] = measure(t, sc, duration_s, warmup_s)
    if t.name == "floor":  # forwards whole bodies only (bench/floor_app.py): no streaming to measure
        return out
    log(f"  {t.name}: streaming, {stream_calls} calls at c=1 ...")
    try:
        body = orjson.dumps(chat_body(t.models["instant"], stream=True))
        out["stream"] = streaming.measure(t.urls["instant"], body, t.headers_for("instant"), stream_calls)
    except Exception as err:  # a peer that cannot stream to the mock must not sink the whole run
        out["stream"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    return out


def run_cache(t: Target, duration_s: float, warmup_s: float, log=print) -> dict:
    """Tollway's cache-hit path: a deterministic body (temperature 0) asked for again and again."""
    body = chat_body(t.models["instant"], temperature=0)
    probe(t, "instant", body, CACHE_HEADERS)
    second = probe(t, "instant", body, CACHE_HEADERS)
    state = second.headers.get("x-tollway-cache")
    out: dict = {"header": state}
    if state != "hit":
        out["error"] = f"no cache hit (x-tollway-cache: {state!r}); the proxy has no cache yet?"
        return out
    for sc in CACHE_SCENARIOS:
        log(f"  {t.name}: {sc.label} ...")
        out[sc.name] = measure(t, sc, duration_s, warmup_s, body=body, extra_headers=CACHE_HEADERS)
    return out


MESSAGES_SCENARIOS = (SCENARIOS[0], SCENARIOS[3])  # c=1 and c=64 against the instant mock


def run_messages(t: Target, duration_s: float, warmup_s: float, stream_calls: int, log=print) -> dict:
    """/v1/messages: the same c=1 and c=64 scenarios as chat, and a streamed call's TTFT at c=1."""
    out: dict = {"scenarios": {}}
    url, model, headers = t.messages["instant"], t.messages_models["instant"], t.messages_headers
    for sc in MESSAGES_SCENARIOS:
        log(f"  {t.name}: /v1/messages {sc.label} ...")
        # the chat auth header is replaced, not joined: a Messages caller sends only its x-api-key
        out["scenarios"][sc.name] = measure(Target(t.name, t.urls, t.models, proc=t.proc), sc, duration_s, warmup_s,
                                            body=messages_body(model), extra_headers=headers, url=url)  # fmt: skip
    log(f"  {t.name}: /v1/messages streaming, {stream_calls} calls at c=1 ...")
    try:
        body = orjson.dumps(messages_body(model, stream=True))
        out["stream"] = streaming.measure(url, body, headers, stream_calls, first=streaming.MESSAGES_FIRST,
                                          done=streaming.MESSAGES_DONE)  # fmt: skip
    except Exception as err:
        out["stream"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    return out


def responses_body(model: str, *, stream: bool = False) -> dict:
    """The chat body's prompt as a Responses API request (the same ~1 KB, the same output cap)."""
    chat = chat_body(model)
    system, user = (m["content"] for m in chat["messages"])
    body = {"model": model, "instructions": system, "input": user, "temperature": chat["temperature"],
            "max_output_tokens": chat["max_tokens"], "user": chat["user"]}  # fmt: skip
    return {**body, "stream": True} if stream else body


def run_responses(t: Target, duration_s: float, warmup_s: float, stream_calls: int, log=print) -> dict:
    """/v1/responses in the same run as chat: req/s at c=64 against the instant mock, and streamed TTFT at c=1."""
    url = t.urls["instant"].removesuffix("/chat/completions") + "/responses"
    rt = dataclasses.replace(t, urls={**t.urls, "instant": url})
    body = responses_body(t.models["instant"])
    probe(rt, "instant", body)
    out: dict = {"scenarios": {}}
    log(f"  {t.name}: /v1/responses c=64, instant mock ...")
    out["scenarios"]["max_instant"] = measure(rt, SCENARIOS[-1], duration_s, warmup_s, body=body)
    log(f"  {t.name}: /v1/responses streaming, {stream_calls} calls at c=1 ...")
    try:
        raw = orjson.dumps(responses_body(t.models["instant"], stream=True))
        out["stream"] = streaming.measure(url, raw, t.headers_for("instant"), stream_calls,
                                          first=streaming.RESPONSES_FIRST, done=streaming.RESPONSES_DONE)  # fmt: skip
    except Exception as err:
        out["stream"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    return out
