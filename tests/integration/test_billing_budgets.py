"""End-user and tag budgets on the real broker and ClickHouse engine: billing counts budgeted end users and
tag values from the usage stream and the ledger, signals exhausted on the control topic, alerts once per
threshold (named) and once per day over the daily threshold, keeps it all across a restart; proxies refuse an
exhausted end user or tag value with 429 insufficient_quota and keep serving everyone else."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from schemas.control import ALERTS_TOPIC, CONTROL_TOPIC
from tests.integration.test_billing_quota import (
    alerts_for,
    chat,
    produce,
    quota_signals,
    read_topic,
    running_proxy,
    wait_admitted,
)
from tests.support.billing import ADMIN, running_billing
from tests.support.events import make_event
from tests.support.metered import meter
from tests.support.stack import gateway_config, mock_upstream
from tests.support.waiting import eventually


def budget_billing(store, bootstrap, group: str, config=None):
    return running_billing(store, bootstrap, config=config, wait_quota=True, quota_group=group,
                           quota_update_interval_ms=20, quota_converge_s=0.2, quota_settle_s=0.1)  # fmt: skip


async def new_team(billing: httpx.AsyncClient, name: str, plan: str | None = "enterprise", **limits) -> str:
    r = await billing.post("/v1/admin/teams", json={"name": name, "plan": plan, "limits": limits},
                           headers=ADMIN)  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()["team_id"]


async def budget_of(billing: httpx.AsyncClient, tid: str, **match) -> dict:
    data = (await billing.get("/v1/admin/budgets", params={"team": tid}, headers=ADMIN)).json()["data"]
    (found,) = [b for b in data if all(b[k] == v for k, v in match.items())]
    return found


async def test_end_user_and_tag_budgets_exhaust_alert_named_and_survive_a_restart(store, bootstrap, unique):
    group = f"b-{unique}"
    async with budget_billing(store, bootstrap, group) as billing:
        tid = await new_team(billing, f"bud-{unique}", daily_alert_usd="0.000001")
        for body in ({"scope": "end_user", "value": "alice", "tokens_per_month": 1000, "daily_alert_usd": "0.000001"},
                     {"scope": "tag", "tag": "project", "value": "apollo", "tokens_per_month": 2000}):  # fmt: skip
            r = await billing.post("/v1/admin/budgets", json={"team_id": tid, **body}, headers=ADMIN)
            assert r.status_code == 201 and r.json()["published"], r.text
        tags = {"project": "apollo"}
        events = [make_event(tid, end_user="alice", metadata=tags, prompt_tokens=300, completion_tokens=100)
                  for _ in range(3)] + [make_event(tid, end_user="bob", prompt_tokens=5000, completion_tokens=0)]  # fmt: skip
        await produce(bootstrap, [*events, events[0]])  # one redelivered
        await meter(store, events)
        alice = f"{tid}:alice"
        raw = await read_topic(bootstrap, CONTROL_TOPIC, lambda s: bool(quota_signals(s, alice)))
        (sig,) = quota_signals(raw, alice)
        assert sig.scope == "end_user" and sig.reason == "tokens_per_month" and sig.used_tokens == 1200
        assert quota_signals(raw, f"{tid}:bob") == []  # no budget: never an entity
        assert quota_signals(raw, f"{tid}:project=apollo") == []  # 1200 of 2000
        got = await budget_of(billing, tid, scope="end_user", value="alice")
        assert got["state"] == "exhausted" and got["used"]["tokens"] == 1200
        assert (await budget_of(billing, tid, scope="tag", value="apollo"))["used"]["tokens"] == 1200
        # The quota API answers for one budget too: what is left of a customer's or a project's month.
        ask = lambda **p: billing.get("/v1/quota", params={"team": tid, **p}, headers=ADMIN)  # noqa: E731
        mine = (await ask(end_user="alice")).json()["budget"]
        assert (mine["scope"], mine["id"], mine["state"], mine["reason"]) == ("end_user", alice, "exhausted",
                                                                              "tokens_per_month")  # fmt: skip
        assert mine["limits"]["tokens_per_month"] == 1000 and mine["used"]["tokens"] == 1200
        assert mine["remaining"] == {"tokens": 0}
        project = (await ask(tag="project", value="apollo")).json()["budget"]
        assert (
            project["state"] == "ok" and project["used"]["tokens"] == 1200 and project["remaining"] == {"tokens": 800}
        )
        assert (await ask(end_user="bob")).json()["budget"] is None  # no budget limits bob
        assert "budget" not in (await ask()).json()
        for bad in ({"tag": "project"}, {"value": "apollo"}, {"end_user": "alice", "tag": "project", "value": "x"}):
            r = await ask(**bad)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text

        def done(s: list) -> bool:
            return len(alerts_for(s, alice)) >= 4 and len(alerts_for(s, tid)) >= 1

        raw = await read_topic(bootstrap, ALERTS_TOPIC, done)
        mine = alerts_for(raw, alice)
        monthly = sorted(a["threshold_pct"] for a in mine if a["metric"] == "tokens")
        daily = [a for a in mine if a["metric"] == "daily_usd"]
        assert monthly == [50, 80, 100] and len(daily) == 1
        assert {(a["scope"], a["end_user"], a["team_id"]) for a in mine} == {("end_user", "alice", tid)}
        assert daily[0]["period"] == datetime.now(UTC).date().isoformat()
        apollo = alerts_for(raw, f"{tid}:project=apollo")
        assert sorted(a["threshold_pct"] for a in apollo) == [50]
        assert {(a["tag"], a["value"]) for a in apollo} == {("project", "apollo")}
        assert [a["metric"] for a in alerts_for(raw, tid)] == ["daily_usd"]  # the team's own daily threshold

    # An operator restarts billing: the budgets, their month-to-date (from the ledger) and the exhausted state
    # come back; no alert is sent twice; more spend counts on top.
    async with budget_billing(store, bootstrap, group) as billing:
        got = await budget_of(billing, tid, scope="end_user", value="alice")
        assert got["state"] == "exhausted" and got["used"]["tokens"] == 1200
        quota = billing._transport.app.state.quota  # type: ignore[attr-defined]
        assert quota.state_of(("end_user", alice))[0] == "exhausted"
        more = make_event(tid, metadata=tags, prompt_tokens=700, completion_tokens=100)
        await produce(bootstrap, [more])
        await eventually(lambda: budget_of(billing, tid, scope="tag", value="apollo"),
                         lambda b: b["state"] == "exhausted" and b["used"]["tokens"] == 2000)  # fmt: skip
        r = await billing.delete("/v1/admin/budgets", params={"team_id": tid, "scope": "end_user", "value": "alice"},
                                 headers=ADMIN)  # fmt: skip
        assert r.status_code == 200 and r.json()["deleted"], r.text
        raw = await read_topic(bootstrap, CONTROL_TOPIC, lambda s: any(x.reason == "restored"
                                                                      for x in quota_signals(s, alice)))  # fmt: skip
        assert quota.state_of(("end_user", alice))[0] == "ok"
    rows = await store.query(
        "SELECT metric, count() FROM {db}.quota_alerts FINAL WHERE entity_id = {e:String} GROUP BY metric ORDER BY metric",
        parameters={"e": alice},
    )
    assert [tuple(r) for r in rows] == [("daily_usd", 1), ("tokens", 3)]
    # The team's daily threshold was crossed again after the restart (the apollo call), in the same pass that
    # alerted apollo's 80 and 100%: the day's claim came back with the restart, so it was not sent again.
    apollo = f"{tid}:project=apollo"
    raw = await read_topic(bootstrap, ALERTS_TOPIC, lambda s: len(alerts_for(s, apollo)) >= 3)
    assert sorted(a["threshold_pct"] for a in alerts_for(raw, apollo)) == [50, 80, 100]
    assert [a["metric"] for a in alerts_for(raw, tid)] == ["daily_usd"]


async def test_budget_api_refuses_bad_input_in_the_api_shape(store, bootstrap, unique):
    async with budget_billing(store, bootstrap, f"v-{unique}") as billing:
        tid = await new_team(billing, f"val-{unique}")
        for body, status in (
            ({"team_id": tid, "scope": "tag", "value": "apollo", "budget_usd_per_month": "1"}, 400),
            ({"team_id": tid, "scope": "end_user", "value": "alice"}, 400),
            ({"team_id": tid, "scope": "end_user", "value": "a", "budget_usd_per_month": "-1"}, 400),
            ({"team_id": tid, "scope": "end_user", "value": "a", "budget_usd_per_month": "1e12"}, 400),
            ({"team_id": tid, "scope": "end_user", "value": "a", "budget_usd_per_month": "0.0000001"}, 400),
            ({"team_id": tid, "scope": "end_user", "value": "a", "tokens_per_month": True}, 422),
            ({"team_id": tid, "scope": "end_user", "value": "a" * 257, "tokens_per_month": 5}, 400),
            ({"team_id": tid, "scope": "end_user", "value": "a", "tokens_per_month": 5, "deleted": True}, 422),
            ({"team_id": tid, "scope": "tag", "tag": "a=b", "value": "c", "tokens_per_month": 5}, 400),
            ({"team_id": tid, "scope": "end_user", "value": "a\u202e", "tokens_per_month": 5}, 400),
            ({"team_id": tid, "scope": "project", "value": "a", "tokens_per_month": 5}, 400),
            ({"team_id": "team_nope", "scope": "end_user", "value": "a", "tokens_per_month": 5}, 404),
        ):
            r = await billing.post("/v1/admin/budgets", json=body, headers=ADMIN)
            assert r.status_code == status, (body, r.text)
            assert set(r.json()["error"]) >= {"message", "type", "code"}
        r = await billing.post("/v1/admin/budgets", json={"team_id": tid, "scope": "end_user", "tokens_per_month": 5})
        assert r.status_code == 401
        r = await billing.delete("/v1/admin/budgets", params={"team_id": tid, "scope": "tag", "tag": "x", "value": "y"},
                                 headers=ADMIN)  # fmt: skip
        assert r.status_code == 404 and r.json()["error"]["code"] == "budget_not_found"
        assert (await billing.get("/v1/admin/budgets", params={"team": tid}, headers=ADMIN)).json()["data"] == []


async def test_proxy_refuses_an_exhausted_end_user_and_tag_value_and_serves_the_rest(store, bootstrap, unique,
                                                                                     tmp_path):  # fmt: skip
    async with (
        mock_upstream() as upstream,
        budget_billing(store, bootstrap, f"p-{unique}", gateway_config("http://unused")) as billing,
        running_proxy(bootstrap, upstream, tmp_path / "a", f"a-{unique}") as (proxy_a, app_a),
        running_proxy(bootstrap, upstream, tmp_path / "b", f"b-{unique}") as (proxy_b, app_b),
    ):
        tid = await new_team(billing, f"prox-{unique}", plan=None)
        plain = (await billing.post("/v1/admin/keys", json={"team_id": tid}, headers=ADMIN)).json()
        tagged = (await billing.post("/v1/admin/keys", json={"team_id": tid, "metadata": {"project": "apollo"}},
                                     headers=ADMIN)).json()  # fmt: skip
        for body in ({"scope": "end_user", "value": "alice", "tokens_per_month": 200},
                     {"scope": "tag", "tag": "project", "value": "apollo", "tokens_per_month": 300}):  # fmt: skip
            assert (await billing.post("/v1/admin/budgets", json={"team_id": tid, **body},
                                       headers=ADMIN)).status_code == 201  # fmt: skip
        mine = (("end_user", f"{tid}:alice"), ("tag", f"{tid}:project=apollo"))  # (the topic has others')
        for client, app in ((proxy_a, app_a), (proxy_b, app_b)):
            await wait_admitted(client, plain["key"])
            await wait_admitted(client, tagged["key"])
            gate = app.state.proxy.quota  # type: ignore[attr-defined]
            await eventually(lambda g=gate: _asyncify([g.budgets.get(e) for e in mine]), lambda bs: all(bs))

        async def spend_until_refused(proxy, secret: str, user: str | None) -> dict:
            h = {"authorization": f"Bearer {secret}"}
            for _ in range(200):
                r = await proxy.post("/v1/chat/completions", json={**chat(), **({"user": user} if user else {})},
                                     headers=h)  # fmt: skip
                if r.status_code == 429:
                    return r.json()
                assert r.status_code == 200, r.text
            raise AssertionError("never refused")

        for secret, user in ((plain["key"], "alice"), (tagged["key"], None)):
            err = await spend_until_refused(proxy_a, secret, user)
            assert err["error"]["code"] == "insufficient_quota"
            # Proxy B learns it from billing's signal.
            h = {"authorization": f"Bearer {secret}"}
            body = {**chat(1), **({"user": user} if user else {})}
            await eventually(lambda h=h, body=body: proxy_b.post("/v1/chat/completions", json=body, headers=h),
                             lambda r: r.status_code == 429, timeout_s=10, interval_s=0.01)  # fmt: skip
        h = {"authorization": f"Bearer {plain['key']}"}
        for proxy in (proxy_a, proxy_b):
            r = await proxy.post("/v1/chat/completions", json={**chat(), "user": "bob"}, headers=h)
            assert r.status_code == 200, r.text  # bob has no budget: served
        gate = app_a.state.proxy.quota  # type: ignore[attr-defined]
        assert ("end_user", f"{tid}:bob") not in gate.states


async def _asyncify(value):
    return value


async def test_a_default_budget_set_mid_month_is_seeded_from_the_ledger_for_each_end_user(store, bootstrap, unique):
    async with budget_billing(store, bootstrap, f"d-{unique}") as billing:
        tid = await new_team(billing, f"def-{unique}")
        spent = [make_event(tid, end_user="u1", prompt_tokens=600, completion_tokens=0),
                 make_event(tid, end_user="u2", prompt_tokens=100, completion_tokens=0)]  # fmt: skip
        await produce(bootstrap, spent)
        await meter(store, spent)
        quota = billing._transport.app.state.quota  # type: ignore[attr-defined]
        await eventually(lambda: _asyncify(quota.book.get(("team", tid)).tokens), lambda t: t == 700)
        assert quota.book.get(("end_user", f"{tid}:u1")).tokens == 0  # no budget yet: not an entity
        r = await billing.post("/v1/admin/budgets", json={"team_id": tid, "scope": "end_user", "tokens_per_month": 500,
                                                          "daily_alert_usd": "0.000001"},
                               headers=ADMIN)  # fmt: skip
        assert r.status_code == 201 and r.json()["default"] is True, r.text
        raw = await read_topic(bootstrap, CONTROL_TOPIC, lambda s: bool(quota_signals(s, f"{tid}:u1")))
        (sig,) = quota_signals(raw, f"{tid}:u1")
        assert (sig.scope, sig.used_tokens, sig.limit_tokens) == ("end_user", 600, 500)
        assert quota_signals(raw, f"{tid}:u2") == [] and quota.book.get(("end_user", f"{tid}:u2")).tokens == 100

        # The daily threshold was set after today's spend: it counts the whole day, so both alert at once.
        def daily_for_both(seen: list) -> bool:
            return all(any(a["metric"] == "daily_usd" for a in alerts_for(seen, f"{tid}:{u}")) for u in ("u1", "u2"))

        raw = await read_topic(bootstrap, ALERTS_TOPIC, daily_for_both)
        for u in ("u1", "u2"):
            assert [a["metric"] for a in alerts_for(raw, f"{tid}:{u}")].count("daily_usd") == 1
        # A later call of a new end user counts against the default from the stream.
        await produce(bootstrap, [make_event(tid, end_user="u3", prompt_tokens=500, completion_tokens=0)])
        raw = await read_topic(bootstrap, CONTROL_TOPIC, lambda s: bool(quota_signals(s, f"{tid}:u3")))
        assert quota_signals(raw, f"{tid}:u3")[0].reason == "tokens_per_month"
