"""Attribution end to end on `tollway up --demo`: the official OpenAI SDK sends `user`, `safety_identifier`,
`metadata` and the X-Tollway-Tags header; the usage API's end-user and tag groupings, the invoice breakdown,
the chargeback CSV (API and CLI) and the dashboard's filters (in real Chromium) all agree with amounts
recomputed here from the usage the SDK was told and tollway.yaml's gpt-4.1 price, typed in again."""

from __future__ import annotations

import csv
import io
import subprocess
import time
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
from openai import OpenAI

from tests.e2e.conftest import TOLLWAY, Stack
from tests.e2e.test_dashboard_browser import page, sign_in, wait_for_text  # noqa: F401 (page is a fixture)

INPUT, CACHED, OUTPUT = Decimal("2.00"), Decimal("0.50"), Decimal("8.00")  # gpt-4.1, USD per 1M tokens
NONE = "(none)"


def cost(usage: Any) -> Decimal:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return (Decimal(usage.prompt_tokens - cached) * INPUT + Decimal(cached) * CACHED
            + Decimal(usage.completion_tokens) * OUTPUT) / 1_000_000  # fmt: skip


def key_with_tags(stack: Stack, team: str, tags: dict[str, str]) -> dict[str, Any]:
    """A key whose admin metadata is `tags` (billing's admin API; the CLI has no metadata flag)."""
    first = stack.new_key(team)  # creates the team
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    r = httpx.post(f"{stack.billing_url}/v1/admin/keys", json={"team_id": first["team_id"], "metadata": tags},
                   headers=admin)  # fmt: skip
    assert r.status_code in (200, 201), r.text
    created = r.json()
    deadline = time.monotonic() + 10
    while (
        httpx.get(f"{stack.proxy_url}/models", headers={"authorization": f"Bearer {created['key']}"}).status_code != 200
    ):
        assert time.monotonic() < deadline, "key not accepted"
        time.sleep(0.02)
    return created


def wait_usage(stack: Stack, headers: dict[str, str], requests: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        body = httpx.get(f"{stack.billing_url}/v1/usage", headers=headers).json()
        if body["totals"]["requests"] >= requests:
            return
        assert time.monotonic() < deadline, f"usage has {body['totals']['requests']} of {requests} calls"
        time.sleep(0.2)


def calls_and_reports(stack: Stack, key: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The SDK calls, then every report checked against them: (calls per label, calls made)."""
    client = OpenAI(base_url=stack.proxy_url, api_key=key["key"], max_retries=0)
    plan = [  # (kwargs for create, header tags, end user, project)
        ({"user": "alice", "metadata": {"project": "apollo"}}, "env=prod", "alice", "apollo"),
        ({"user": "alice", "metadata": {"project": "zeus", "cost_centre": "not-mine"}}, None, "alice", "zeus"),
        ({"safety_identifier": "bob"}, "project=apollo", "bob", "apollo"),
        ({"user": "carol", "metadata": {"project": "from-body"}}, "project=zeus", "carol", "zeus"),
        ({}, None, None, None),
    ]
    exact = {"end_user": defaultdict(Decimal), "project": defaultdict(Decimal)}
    requests = {"end_user": defaultdict(int), "project": defaultdict(int)}
    for i, (kwargs, header, end_user, project) in enumerate(plan):
        mock = {"input_tokens": 100_003 + 9_753 * i, "cached_tokens": 4_321 * i, "stream_chunks": 2_222 + 51 * i}
        headers = {"X-Tollway-Tags": header} if header else None
        r = client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": f"call {i}"}],
                                           extra_body={"mock": mock}, extra_headers=headers, **kwargs)  # fmt: skip
        c = cost(r.usage)
        for dim, label in (("end_user", end_user or NONE), ("project", project or NONE)):
            exact[dim][label] += c
            requests[dim][label] += 1
    total = sum(exact["end_user"].values(), Decimal(0))

    # a tag over the bounds is refused by the proxy before any upstream call, in OpenAI's shape
    bad = httpx.post(f"{stack.proxy_url}/chat/completions", headers={"authorization": f"Bearer {key['key']}"},
                     json={"model": "gpt-4.1", "messages": [{"role": "user", "content": "x"}],
                           "metadata": {"k" * 65: "v"}})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_tag"
    requests["end_user"][NONE] += 1  # still an event (status error, zero tokens), with no end user

    kh = {"Authorization": f"Bearer {key['key']}"}
    wait_usage(stack, kh, len(plan) + 1)
    for group_by, field, dim in (("end_user", "end_user", "end_user"), ("tag:project", "tag_value", "project")):
        body = httpx.get(f"{stack.billing_url}/v1/usage", params={"group_by": group_by}, headers=kh).json()
        got = {g[field]: Decimal(g["cost_usd"]) for g in body["groups"]}
        assert got == dict(exact[dim]), group_by
        assert Decimal(body["totals"]["cost_usd"]) == total
    by_cc = httpx.get(f"{stack.billing_url}/v1/usage", params={"group_by": "tag:cost_centre"}, headers=kh).json()
    assert [g["tag_value"] for g in by_cc["groups"]] == ["cc-9"]  # the admin's tag won over the caller's

    period = datetime.now(UTC).strftime("%Y-%m")
    inv = httpx.get(f"{stack.billing_url}/v1/invoices/draft_{key['team_id']}_{period}",
                    params={"breakdown": "tag:project"}, headers=kh).json()  # fmt: skip
    rows = {r["tag_value"]: r for r in inv["breakdown"]["rows"]}
    assert {k: Decimal(r["exact_usd"]) for k, r in rows.items()} == dict(exact["project"])
    assert sum(Decimal(r["amount_usd"]) for r in rows.values()) == Decimal(inv["usage_usd"])
    assert Decimal(inv["usage_usd"]) == sum(Decimal(ln["amount_usd"]) for ln in inv["lines"] if ln["type"] == "usage")

    cb = httpx.get(f"{stack.billing_url}/v1/reports/chargeback", params={"by": "end_user"}, headers=kh)
    assert cb.status_code == 200, cb.text
    lines = list(csv.DictReader(io.StringIO(cb.text)))
    assert lines[-1]["end_user"] == "TOTAL" and lines[-1]["amount_usd"] == inv["usage_usd"]
    assert {r["end_user"]: Decimal(r["exact_usd"]) for r in lines[:-1]} == dict(exact["end_user"])
    assert {r["end_user"]: int(r["requests"]) for r in lines[:-1]} == dict(requests["end_user"])
    out = subprocess.run([TOLLWAY, "report", "chargeback", "--team", key["team_id"], "--by", "tag:project"],
                         env=stack.env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    cli_rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert cli_rows[-1]["tag:project"] == "TOTAL" and cli_rows[-1]["amount_usd"] == inv["usage_usd"]
    assert {r["tag:project"]: r["amount_usd"] for r in cli_rows[:-1]} == {k: r["amount_usd"] for k, r in rows.items()}

    return {"exact": exact, "requests": requests}, len(plan) + 1


async def test_sdk_tags_and_end_users_agree_everywhere(stack: Stack, page: Any) -> None:  # noqa: F811
    key = key_with_tags(stack, "attribution-team", {"cost_centre": "cc-9"})
    seen, made = calls_and_reports(stack, key)
    exact, requests = seen["exact"], seen["requests"]

    # the dashboard, filtered by tag and then by end user: KPIs, charts and the key table follow
    await sign_in(page, stack.billing_url + "/dashboard", key["key"])
    await page.select_option("#range", "24h")
    await page.fill("#filter-tag", "project=apollo")
    await wait_for_text(page, "#kpi-requests", str(requests["project"]["apollo"]))
    assert "project=apollo" in await page.text_content("#filter-note")
    spend = await page.evaluate("() => Chart.getChart(document.getElementById('chart-spend')).data.datasets[0].data")
    assert abs(sum(Decimal(str(v)) for v in spend) - exact["project"]["apollo"]) < Decimal("1e-9")
    key_rows = await page.eval_on_selector_all("#keys tbody tr", "rs => rs.map(r => r.children[3].textContent)")
    assert key_rows == [str(requests["project"]["apollo"])]
    await page.fill("#filter-tag", "")
    await page.fill("#filter-user", "alice")
    await wait_for_text(page, "#kpi-requests", str(requests["end_user"]["alice"]))
    await page.fill("#filter-user", "")
    await wait_for_text(page, "#kpi-requests", str(made))  # unfiltered again: the rollups' count
    assert page.problems == []
