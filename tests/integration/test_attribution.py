"""Attribution through the real pieces: calls to the proxy app (mock upstream behind it, keys from billing over
the broker), their events read back off the broker, metered by the meter's own decode, pricing and writer into
the ClickHouse engine, then read through billing's usage API, invoice breakdown and chargeback CSV. Every
expected amount is recomputed here from the usage the provider returned and the price typed in again."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.clickhouse import Store
from schemas.events import USAGE_TOPIC
from schemas.periods import period_of
from schemas.prices import PriceBook
from services.meter.reference import decode_and_price
from services.meter.writer import UsageWriter
from services.proxy.app import create_app as proxy_app
from services.proxy.settings import ProxySettings
from tests.support.billing import ADMIN, FINANCE, running_billing
from tests.support.events import make_event
from tests.support.metered import meter
from tests.support.stack import gateway_config, mock_upstream, wait_key_active

PRICE = {"input": Decimal("2.00"), "cached": Decimal("0.50"), "output": Decimal("8.00")}  # gateway_config's gpt-4.1


def cost_of(usage: dict[str, Any]) -> Decimal:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return (Decimal(usage["prompt_tokens"] - cached) * PRICE["input"] + Decimal(cached) * PRICE["cached"]
            + Decimal(usage["completion_tokens"]) * PRICE["output"]) / 1_000_000  # fmt: skip


async def usage_events_of(bootstrap: str, team_id: str, n: int, timeout_s: float = 20.0) -> list[Any]:
    """The team's records on the usage topic (every partition, from the start), once there are n."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # fetches the metadata partitions_for_topic reads
        tps = [TopicPartition(USAGE_TOPIC, p) for p in sorted(consumer.partitions_for_topic(USAGE_TOPIC) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        mine: list[Any] = []
        async with asyncio.timeout(timeout_s):
            while len(mine) < n:
                for records in (await consumer.getmany(*tps, timeout_ms=200)).values():
                    mine += [r for r in records if orjson.loads(r.value)["team_id"] == team_id]
        return mine
    finally:
        await consumer.stop()


async def test_tagged_calls_land_with_tags_and_end_user_and_every_grouping_agrees(store: Store, bootstrap: str,
                                                                                   tmp_path: Path, unique: str):  # fmt: skip
    async with mock_upstream() as upstream:
        config = gateway_config(upstream)
        async with running_billing(store, bootstrap, config=config, quota_group=f"q-{unique}") as billing:
            team = (await billing.post("/v1/admin/teams", json={"name": f"attr-{unique}"}, headers=ADMIN)).json()
            tid = team["team_id"]
            key = (await billing.post("/v1/admin/keys", json={"team_id": tid, "metadata": {"cost_centre": "cc-1"}},
                                      headers=ADMIN)).json()  # fmt: skip
            other = (await billing.post("/v1/admin/teams", json={"name": f"other-{unique}"}, headers=ADMIN)).json()
            other_key = (await billing.post("/v1/admin/keys", json={"team_id": other["team_id"]},
                                            headers=ADMIN)).json()  # fmt: skip

            settings = ProxySettings(data_dir=tmp_path, proxy_instance=f"attr-{unique}")
            app = proxy_app(settings, config, bootstrap)
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as px:
                    await wait_key_active(px, key["key"])
                    auth = {"authorization": f"Bearer {key['key']}"}

                    async def chat(extra: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
                        body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": f"hi {uuid.uuid4()}"}]}
                        return await px.post("/v1/chat/completions", json={**body, **extra},
                                             headers={**auth, **(headers or {})})  # fmt: skip

                    # refused before any upstream work, in OpenAI's error shape, naming the tag
                    async with httpx.AsyncClient() as c:
                        served_before = (await c.get(upstream.removesuffix("/v1") + "/mock/stats")).json()
                    bad = await chat({"metadata": {"bad key!": "x"}})
                    assert bad.status_code == 400, bad.text
                    err = bad.json()["error"]
                    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_tag"
                    assert "bad key!" in err["message"]
                    too_many = await chat({}, {"x-tollway-tags": ",".join(f"t{i}=v" for i in range(17))})
                    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "invalid_tag"
                    async with httpx.AsyncClient() as c:
                        served_after = (await c.get(upstream.removesuffix("/v1") + "/mock/stats")).json()
                    assert served_after["requests_served"] == served_before["requests_served"]

                    plan = [  # (body extra, headers, expected end user, expected tags)
                        ({"user": "alice", "metadata": {"project": "apollo"}}, {"x-tollway-tags": "env=prod"},
                         "alice", {"project": "apollo", "env": "prod", "cost_centre": "cc-1"}),
                        ({"user": "alice"}, {"x-tollway-tags": "project=zeus"},
                         "alice", {"project": "zeus", "cost_centre": "cc-1"}),
                        ({"safety_identifier": "bob", "metadata": {"project": "apollo", "cost_centre": "evil"}}, {},
                         "bob", {"project": "apollo", "cost_centre": "cc-1"}),
                        ({"metadata": {"user_id": "carol", "project": "apollo"}}, {},
                         "carol", {"project": "apollo", "cost_centre": "cc-1"}),  # user_id: the end user, no tag
                        ({}, {}, None, {"cost_centre": "cc-1"}),
                    ]  # fmt: skip
                    calls = []
                    for i, (extra, headers, end_user, tags) in enumerate(plan):
                        # token counts whose costs have sub-cent parts, so the breakdown's rounding has work
                        mock = {"input_tokens": 1_234_567 + 111_111 * i, "cached_tokens": 12_345 * i,
                                "stream_chunks": 3_333 + 77 * i}  # fmt: skip
                        r = await chat({**extra, "mock": mock}, headers)
                        assert r.status_code == 200, r.text
                        calls.append((r.headers["x-request-id"], cost_of(r.json()["usage"]), end_user, tags))
                    records = await usage_events_of(bootstrap, tid, len(calls) + 2)

            batch, dead = decode_and_price(records, PriceBook(config))
            assert not dead
            assert await UsageWriter(store).insert(batch, asyncio.Event())

            stored = await store.query_dicts(
                "SELECT request_id, end_user, metadata, status FROM {db}.usage_events FINAL WHERE team_id = {t:String}",
                parameters={"t": tid},
            )
            by_request = {r["request_id"]: r for r in stored}
            for rid, _, end_user, tags in calls:
                assert by_request[rid]["end_user"] == (end_user or "") and dict(by_request[rid]["metadata"]) == tags
            assert sorted(r["status"] for r in stored) == ["error", "error"] + ["ok"] * len(calls)

            exact_by: dict[str, dict[str, Decimal]] = {"end_user": defaultdict(Decimal), "tag:project": defaultdict(Decimal),
                                                       "tag:cost_centre": defaultdict(Decimal)}  # fmt: skip
            for _, cost, end_user, tags in calls:
                exact_by["end_user"][end_user or "(none)"] += cost
                exact_by["tag:project"][tags.get("project", "(none)")] += cost
                exact_by["tag:cost_centre"][tags["cost_centre"]] += cost
            total = sum((c for _, c, _, _ in calls), Decimal(0))
            now = datetime.now(UTC)
            span = {"from": (now - timedelta(days=1)).date().isoformat(), "to": now.date().isoformat()}
            kh = {"Authorization": f"Bearer {key['key']}"}

            by_model = (await billing.get("/v1/usage", params={**span, "group_by": "model"}, headers=kh)).json()
            assert sum(Decimal(g["cost_usd"]) for g in by_model["groups"]) == total
            for group_by, field in (("end_user", "end_user"), ("tag:project", "tag_value"),
                                    ("tag:cost_centre", "tag_value")):  # fmt: skip
                r = await billing.get("/v1/usage", params={**span, "group_by": group_by}, headers=kh)
                assert r.status_code == 200, r.text
                body = r.json()
                got = {g[field]: Decimal(g["cost_usd"]) for g in body["groups"]}
                assert got == dict(exact_by[group_by]), group_by
                assert Decimal(body["totals"]["cost_usd"]) == total == sum(got.values())
            bad_group = await billing.get("/v1/usage", params={**span, "group_by": "tag:no way"}, headers=kh)
            assert bad_group.status_code == 400

            # the dashboard's filtered views read the same calls from the ledger
            for params, expected in (({"end_user": "alice"}, exact_by["end_user"]["alice"]),
                                     ({"end_user": "(none)"}, exact_by["end_user"]["(none)"]),
                                     ({"tag": "project=apollo"}, exact_by["tag:project"]["apollo"]),
                                     ({"tag": "project=(none)"}, exact_by["tag:project"]["(none)"]),
                                     ({"tag": "project=apollo", "end_user": "bob"}, calls[2][1])):  # fmt: skip
                r = await billing.get("/v1/dashboard/data", params={**span, **params}, headers=kh)
                assert r.status_code == 200, r.text
                dash = r.json()
                assert Decimal(dash["totals"]["cost_usd"]) == expected, params
                assert sum(Decimal(m["cost_usd"]) for m in dash["by_model"]) == expected
                assert sum(Decimal(p["cost_usd"]) for p in dash["series"]) == expected
                assert sum(k["requests"] for k in dash["by_key"]) == dash["totals"]["requests"]
            bad_filter = await billing.get("/v1/dashboard/data", params={**span, "tag": "project"}, headers=kh)
            assert bad_filter.status_code == 400

            # the invoice's usage amount, split by project to the cent
            period = period_of(now)
            inv = await billing.get(f"/v1/invoices/draft_{tid}_{period}", params={"breakdown": "tag:project"},
                                    headers=FINANCE)  # fmt: skip
            assert inv.status_code == 200, inv.text
            doc = inv.json()
            section = doc["breakdown"]
            assert section["by"] == "tag:project"
            assert sum(Decimal(r["amount_usd"]) for r in section["rows"]) == Decimal(doc["usage_usd"])
            assert section["total_usd"] == doc["usage_usd"]
            assert {r["tag_value"]: Decimal(r["exact_usd"]) for r in section["rows"]} == dict(exact_by["tag:project"])
            for r in section["rows"]:  # one usage line per component here: each label within a cent per line
                lines = sum(1 for line in doc["lines"] if line["type"] == "usage")
                assert abs(Decimal(r["amount_usd"]) - Decimal(r["exact_usd"])) < Decimal("0.01") * lines

            # the chargeback CSV: its TOTAL is the invoice's usage amount; a team key reads only its own team
            for headers, params in ((kh, {"by": "end_user"}), (FINANCE, {"team": tid, "by": "end_user"})):
                cb = await billing.get("/v1/reports/chargeback", params={"period": period, **params}, headers=headers)
                assert cb.status_code == 200, cb.text
                assert cb.headers["content-type"].startswith("text/csv")
                rows = list(csv.DictReader(io.StringIO(cb.text)))
                assert rows[-1]["end_user"] == "TOTAL" and rows[-1]["amount_usd"] == doc["usage_usd"]
                assert {r["end_user"]: Decimal(r["exact_usd"]) for r in rows[:-1]} == dict(exact_by["end_user"])
                assert sum(Decimal(r["amount_usd"]) for r in rows[:-1]) == Decimal(doc["usage_usd"])
            # the organisation's file (staff, no team): this team's rows as in its own file, each team footing
            # to its own invoice, and an ALL row summing the teams (other tests' teams may share the store)
            org = await billing.get("/v1/reports/chargeback", params={"period": period, "by": "tag:cost_centre"},
                                    headers=FINANCE)  # fmt: skip
            assert org.status_code == 200, org.text
            org_rows = list(csv.DictReader(io.StringIO(org.text)))
            mine = [r for r in org_rows if r["team_id"] == tid]
            assert {r["tag:cost_centre"]: r["amount_usd"] for r in mine} == {"cc-1": doc["usage_usd"],
                                                                             "TOTAL": doc["usage_usd"]}  # fmt: skip
            team_totals = [r for r in org_rows if r["tag:cost_centre"] == "TOTAL" and r["team_id"] != "ALL"]
            for r in team_totals:
                inv_of = await billing.get(f"/v1/invoices/draft_{r['team_id']}_{period}", headers=FINANCE)
                assert r["amount_usd"] == inv_of.json()["usage_usd"], r
            (everyone,) = [r for r in org_rows if r["team_id"] == "ALL"]
            assert org_rows[-1] == everyone
            assert Decimal(everyone["amount_usd"]) == sum(Decimal(r["amount_usd"]) for r in team_totals)
            org_json = (await billing.get("/v1/reports/chargeback", params={"period": period, "by": "tag:cost_centre",
                                                                           "format": "json"}, headers=FINANCE)).json()  # fmt: skip
            (mine_json,) = [d for d in org_json["data"] if d["team_id"] == tid]
            assert mine_json["usage_usd"] == doc["usage_usd"] and org_json["usage_usd"] == everyone["amount_usd"]
            foreign = await billing.get("/v1/reports/chargeback", params={"team": tid, "by": "end_user"},
                                        headers={"Authorization": f"Bearer {other_key['key']}"})  # fmt: skip
            assert foreign.status_code == 403
            bad_by = await billing.get("/v1/reports/chargeback", params={"team": tid, "by": "project"}, headers=FINANCE)
            assert bad_by.status_code == 400


async def test_breakdown_of_a_finalized_invoice_reads_what_it_billed_and_foots(billing, store: Store, unique: str):
    """Many labels with sub-cent shares across two models; a late event after finalization is in neither the
    finalized invoice nor its breakdown (it is billed on the next invoice)."""
    team = (await billing.post("/v1/admin/teams", json={"name": f"fin-{unique}"}, headers=ADMIN)).json()
    tid = team["team_id"]
    march = datetime(2026, 3, 5, 12, tzinfo=UTC)
    events = [
        make_event(tid, occurred_at=march + timedelta(hours=i), end_user=f"user-{i % 7}",
                   metadata={"project": ["apollo", "zeus", "hermes"][i % 3]} if i % 4 else {},
                   served_model="gpt-4.1" if i % 2 else "gpt-4.1-mini", requested_model="gpt-4.1",
                   prompt_tokens=10_007 * (i + 1), completion_tokens=3_001 * (i + 2), cached_tokens=499 * i)
        for i in range(40)
    ]  # fmt: skip
    await meter(store, events)
    r = await billing.post("/v1/admin/invoices/finalize", json={"period": "2026-03", "team": tid}, headers=ADMIN)
    assert r.status_code == 200, r.text
    invoice_id = r.json()["data"][0]["invoice_id"]
    await meter(store, [make_event(tid, occurred_at=march, end_user="late-user", metadata={"project": "late"},
                                   prompt_tokens=900_000, completion_tokens=90_000)])  # fmt: skip

    for by, field in (("end_user", "end_user"), ("tag:project", "tag_value")):
        doc = (await billing.get(f"/v1/invoices/{invoice_id}", params={"breakdown": by}, headers=FINANCE)).json()
        assert doc["status"] == "finalized"
        rows = doc["breakdown"]["rows"]
        labels = {r[field] for r in rows}
        assert "late-user" not in labels and "late" not in labels
        assert sum(Decimal(r["amount_usd"]) for r in rows) == Decimal(doc["usage_usd"])
        assert sum(r["requests"] for r in rows) == len(events)
        usage_lines = sum(1 for line in doc["lines"] if line["type"] == "usage")
        for r in rows:
            assert abs(Decimal(r["amount_usd"]) - Decimal(r["exact_usd"])) < Decimal("0.01") * usage_lines
        exact_total = sum((Decimal(r["exact_usd"]) for r in rows), Decimal(0))
        assert exact_total == sum(Decimal(line["exact_amount_usd"]) for line in doc["lines"] if line["type"] == "usage")
    tags = {r["tag_value"] for r in doc["breakdown"]["rows"]}
    assert tags == {"apollo", "zeus", "hermes", "(none)"}
