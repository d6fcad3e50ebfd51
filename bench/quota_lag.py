"""Quota lag and overshoot, measured on the real path: bundled broker, embedded ClickHouse, billing, two
proxies and the mock upstream in one process.

Lag (per trial): a fresh key with a monthly token limit is driven over it through proxy A; proxy B is then
polled until its first 429 insufficient_quota. `cross-proxy lag` = B's first 429 - end of A's crossing call
(the billing signal path: usage topic -> billing -> control topic -> proxy). `same-proxy lag` = A's first
429 - the same instant (local counting). The same again for an end-user budget (issue 16): a fresh end user
of one team gets a monthly token budget, and calls with `user` set to it cross it. Overshoot: 40 concurrent calls with little quota left; tokens
billed beyond the limit, against the reservation bound (one call's worst case).

    .venv/bin/python bench/quota_lag.py [--trials 100] [--bursts 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.clickhouse import Store
from schemas.config import GatewayConfig, parse_config
from services.billing.app import create_app as billing_app
from services.billing.settings import BillingSettings
from services.mock_upstream.app import create_app as mock_app
from services.mock_upstream.settings import MockSettings
from services.proxy.app import create_app as proxy_app
from services.proxy.settings import ProxySettings
from tollway.broker import BundledBroker
from tollway.logs import configure_logging
from tollway.servers import serving
from tollway.topics import ensure_topics

ADMIN = {"Authorization": "Bearer bench-admin"}


def gateway_config(upstream_url: str) -> GatewayConfig:
    """gpt-4.1 at its list price, served by the mock upstream; no plan limit but the keys' own."""
    return parse_config({
        "providers": {"mock": {"base_url": upstream_url, "timeout_s": 5}},
        "models": {"gpt-4.1": {"routes": [{"provider": "mock"}], "prices": [
            {"effective_from": "2025-04-14", "input": "2.00", "output": "8.00", "cached_input": "0.50"}]}},
        "plans": {"default": {}},
        "default_plan": "default",
    })  # fmt: skip


def chat(max_tokens: int) -> dict:
    return {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": max_tokens}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def mk(app, base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base, timeout=30)


async def wait_active(c: httpx.AsyncClient, secret: str) -> None:
    while (await c.get("/v1/models", headers={"authorization": f"Bearer {secret}"})).status_code != 200:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


async def main(trials: int, bursts: int) -> None:
    configure_logging("warning", "console")
    tmp = Path(tempfile.mkdtemp(prefix="quota-bench-"))
    broker = BundledBroker(log_path=tmp / "tansu.log")
    bootstrap = broker.start()
    await ensure_topics(bootstrap, 4)
    store = Store(f"chdb://{tmp / 'ch'}", "tollway")
    await store.open()
    await store.migrate()
    try:
        async with serving(mock_app(MockSettings()), "mock-upstream") as upstream:
            config = gateway_config(f"{upstream}/v1")
            billing = billing_app(BillingSettings(admin_token="bench-admin", quota_update_interval_ms=20), config,
                                  store, bootstrap)  # fmt: skip
            apps = [proxy_app(ProxySettings(data_dir=tmp / n, proxy_instance=n), config, bootstrap) for n in "ab"]
            async with (
                billing.router.lifespan_context(billing),
                apps[0].router.lifespan_context(apps[0]),
                apps[1].router.lifespan_context(apps[1]),
            ):
                async with (
                    mk(billing, "http://billing") as b,
                    mk(apps[0], "http://a") as pa,
                    mk(apps[1], "http://b") as pb,
                ):
                    await run(b, pa, pb, apps, trials, bursts)
    finally:
        await store.close()
        broker.stop()


async def end_user_lags(b, pa, pb, apps, team_id: str, trials: int) -> tuple[list[float], list[float]]:
    """Crossing -> first 429 for an end user's budget: A's (local counting) and B's (billing's signal)."""
    key = (await b.post("/v1/admin/keys", json={"team_id": team_id, "name": "end-users"}, headers=ADMIN)).json()
    h = {"authorization": f"Bearer {key['key']}"}
    await wait_active(pa, key["key"])
    await wait_active(pb, key["key"])
    cross, same = [], []
    for i in range(trials):
        user = f"user-{i}"
        r = await b.post("/v1/admin/budgets", json={"team_id": team_id, "scope": "end_user", "value": user,
                         "tokens_per_month": 100}, headers=ADMIN)  # fmt: skip
        assert r.status_code == 201, r.text
        entity = ("end_user", f"{team_id}:{user}")
        while not all(app.state.proxy.quota.budgets.get(entity) for app in apps):  # over the control topic  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        used = 0
        while used < 100:
            r = await pa.post("/v1/chat/completions", json={**chat(8), "user": user}, headers=h)
            used += r.json()["usage"]["total_tokens"]
        t0 = time.perf_counter()
        r = await pa.post("/v1/chat/completions", json={**chat(1), "user": user}, headers=h)
        assert r.status_code == 429
        same.append(time.perf_counter() - t0)
        while (await pb.post("/v1/chat/completions", json={**chat(1), "user": user}, headers=h)).status_code != 429:
            pass
        cross.append(time.perf_counter() - t0)
    return cross, same


async def run(b, pa, pb, apps, trials: int, bursts: int) -> None:
    app_a = apps[0]
    team = (await b.post("/v1/admin/teams", json={"name": "bench"}, headers=ADMIN)).json()
    cross, same = [], []
    for i in range(trials):
        key = (await b.post("/v1/admin/keys", json={"team_id": team["team_id"], "name": f"lag{i}",
                            "limits": {"tokens_per_month": 100}}, headers=ADMIN)).json()  # fmt: skip
        h = {"authorization": f"Bearer {key['key']}"}
        await wait_active(pa, key["key"])
        await wait_active(pb, key["key"])
        used = 0
        while used < 100:
            used += (await pa.post("/v1/chat/completions", json=chat(8), headers=h)).json()["usage"]["total_tokens"]
        t0 = time.perf_counter()
        r = await pa.post("/v1/chat/completions", json=chat(1), headers=h)
        assert r.status_code == 429
        same.append(time.perf_counter() - t0)
        while (await pb.post("/v1/chat/completions", json=chat(1), headers=h)).status_code != 429:
            pass
        cross.append(time.perf_counter() - t0)
    over, bound = [], app_a.state.proxy.quota.worst_case(chat(16))[0]
    for i in range(bursts):
        key = (await b.post("/v1/admin/keys", json={"team_id": team["team_id"], "name": f"burst{i}",
                            "limits": {"tokens_per_month": 300}}, headers=ADMIN)).json()  # fmt: skip
        h = {"authorization": f"Bearer {key['key']}"}
        await wait_active(pa, key["key"])
        spent = 0
        while spent < 240:
            spent += (await pa.post("/v1/chat/completions", json=chat(8), headers=h)).json()["usage"]["total_tokens"]
        replies = await asyncio.gather(*(pa.post("/v1/chat/completions", json=chat(16), headers=h) for _ in range(40)))
        spent += sum(r.json()["usage"]["total_tokens"] for r in replies if r.status_code == 200)
        over.append(spent - 300)
    eu_cross, eu_same = await end_user_lags(b, pa, pb, apps, team["team_id"], trials)
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    print(f"trials={trials}")
    for name, c, s in (("key limit", cross, same), ("end-user budget", eu_cross, eu_same)):
        print(f"{name:>15}: cross-proxy crossing->first 429 (billing signal path): p50 {ms(pct(c, .5))}  "
              f"p99 {ms(pct(c, .99))}  max {ms(max(c))}")  # fmt: skip
        print(f"{name:>15}: same-proxy crossing->first 429 (local counting):       p50 {ms(pct(s, 0.5))}  "
              f"p99 {ms(pct(s, 0.99))}")  # fmt: skip
    print(f"overshoot over {bursts} bursts of 40 concurrent calls (limit 300 tokens): max {max(over)} tokens, "
          f"mean {statistics.mean(over):.1f}; reservation bound {bound} tokens")  # fmt: skip
    print(
        "targets: p50 <= 100 ms, p99 <= 500 ms ->",
        "MET" if all(pct(c, 0.5) <= 0.1 and pct(c, 0.99) <= 0.5 for c in (cross, eu_cross)) else "MISSED",
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--bursts", type=int, default=10)
    a = ap.parse_args()
    asyncio.run(main(a.trials, a.bursts))
