"""`tollway keys` against a real billing server (uvicorn on a free port): a new team name creates the
team once, and later calls reuse it."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from schemas.clickhouse import Store
from schemas.config import load_config
from services.billing.app import create_app
from services.billing.settings import BillingSettings
from tollway import budgets_cli as budgets_cli_module
from tollway import keys_cli
from tollway.broker import free_port
from tollway.servers import make_server

TOKEN = "admin-token-for-cli-tests"


@pytest.fixture
async def billing_url(store: Store, bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    port = free_port()
    app = create_app(BillingSettings(admin_token=TOKEN), load_config("tollway.yaml"), store, bootstrap)
    server = make_server(app, "127.0.0.1", port)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(20):
        while not server.started:  # set once the lifespan ran and the socket listens
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("TOLLWAY_BILLING_URL", url)
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", TOKEN)
    yield url
    server.should_exit = True
    await task


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tollway")
    keys_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(keys_cli.run, parse(*argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_keys_create_makes_the_team_once_then_reuses_it(billing_url, capsys, unique):
    code, out, err = await cli(capsys, "keys", "create", "--team", f"acme-{unique}", "--plan", "free")
    assert code == 0, err
    first = json.loads(out)
    assert first["key"].startswith("tw-") and first["key_id"] and first["team_id"]
    assert first["team_created"] is True and first["plan"] == "free"

    code, out, err = await cli(capsys, "keys", "create", "--team", f"acme-{unique}", "--name", "second")
    assert code == 0, err
    second = json.loads(out)
    assert second["team_id"] == first["team_id"] and second["team_created"] is False
    assert second["key_id"] != first["key_id"] and second["name"] == "second"

    code, out, _ = await cli(capsys, "keys", "create", "--team", first["team_id"])
    assert code == 0 and json.loads(out)["team_id"] == first["team_id"]

    async with httpx.AsyncClient(base_url=billing_url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        teams = (await c.get("/v1/admin/teams", params={"name": f"acme-{unique}"})).json()["data"]
        assert [t["team_id"] for t in teams] == [first["team_id"]]
        assert teams[0]["plan"] == "free"
        # The key works against billing itself: it reads its own team's usage.
        r = await c.get("/v1/usage", headers={"Authorization": f"Bearer {first['key']}"})
        assert r.status_code == 200 and r.json()["team_id"] == first["team_id"]


async def test_keys_list_and_revoke(billing_url, capsys, unique):
    code, out, _ = await cli(capsys, "keys", "create", "--team", f"t-{unique}")
    created = json.loads(out)

    code, out, _ = await cli(capsys, "keys", "list", "--team", f"t-{unique}")
    assert code == 0
    listed = json.loads(out)
    assert [k["key_id"] for k in listed] == [created["key_id"]]
    assert created["key"] not in out

    code, out, _ = await cli(capsys, "keys", "revoke", created["key_id"])
    assert code == 0
    assert json.loads(out) == {"key_id": created["key_id"], "revoked": True, "published": True, "will_retry": False}
    _, out, _ = await cli(capsys, "keys", "list")
    assert [k["revoked"] for k in json.loads(out) if k["key_id"] == created["key_id"]] == [True]


async def test_api_errors_go_to_stderr_with_exit_code_1(billing_url, capsys, monkeypatch):
    code, out, err = await cli(capsys, "keys", "revoke", "key_does_not_exist")
    assert code == 1 and out == ""
    assert "404" in err and "key_does_not_exist" in err

    code, out, err = await cli(capsys, "keys", "create", "--team", "x", "--plan", "gold")
    assert code == 1 and "unknown plan 'gold'" in err

    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", "wrong")
    code, _, err = await cli(capsys, "keys", "list")
    assert code == 1 and "401" in err and "wrong" not in err

    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN")
    code, _, err = await cli(capsys, "keys", "list")
    assert code == 1 and "TOLLWAY_ADMIN_TOKEN is not set" in err


async def test_unreachable_billing_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setenv("TOLLWAY_BILLING_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", TOKEN)
    code, out, err = await cli(capsys, "keys", "list")
    assert code == 1 and out == "" and "cannot reach billing" in err


async def test_invoices_and_roi_cli_show_export_and_finalize(billing_url, capsys, unique):
    from tollway import invoices_cli, report_cli

    code, out, err = await cli(capsys, "keys", "create", "--team", f"inv-{unique}", "--tokens-per-month", "5000",
                               "--expires-at", "2099-01-01T00:00:00Z")  # fmt: skip
    assert code == 0, err
    key = json.loads(out)
    assert key["limits"] == {"tokens_per_month": 5000} and key["expires_at"] == "2099-01-01T00:00:00Z"
    tid = key["team_id"]

    def parse_all(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog="tollway")
        sub = parser.add_subparsers(dest="command", required=True)
        invoices_cli.register(sub)
        report_cli.register(sub)
        return parser.parse_args(argv)

    async def run(module, *argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(module.run, parse_all(*argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = await run(invoices_cli, "invoices", "show", "--team", tid, "--period", "2026-08")
    assert code == 0, err
    (draft,) = json.loads(out)
    assert draft["status"] == "draft" and draft["total_usd"] == "0.00"  # no fee before the team existed
    code, out, err = await run(invoices_cli, "invoices", "export", "--team", tid, "--period", "2026-08")
    assert code == 0 and out.startswith("invoice_id,") and "total" in out
    code, out, err = await run(invoices_cli, "invoices", "finalize", "--period", "2026-08", "--team", tid)
    assert code == 0, err
    (fin,) = json.loads(out)
    assert fin["number"].startswith("TW-") and fin["created"] is True
    code, out, err = await run(invoices_cli, "invoices", "show", "--id", fin["invoice_id"])
    assert code == 0 and json.loads(out)["content_hash"] == fin["content_hash"]
    code, out, err = await run(report_cli, "report", "roi", "--team", tid, "--period", "2026-08")
    assert code == 0 and json.loads(out)["savings_usd"] == "0.00"
    code, out, err = await run(report_cli, "report", "roi", "--team", tid, "--period", "2026-08", "--csv")
    assert code == 0 and out.splitlines()[-1].split(",")[2] == "TOTAL"


async def budgets_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="tollway")
    budgets_cli_module.register(parser.add_subparsers(dest="command", required=True))
    code = await asyncio.to_thread(budgets_cli_module.run, parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_budgets_set_list_delete_by_team_name(billing_url, capsys, unique):
    code, out, err = await cli(capsys, "keys", "create", "--team", f"b-{unique}")
    team_id = json.loads(out)["team_id"]
    code, out, err = await budgets_cli(capsys, "budgets", "set", "--team", f"b-{unique}", "--end-user", "alice",
                                       "--usd", "2.50", "--daily-alert-usd", "1")  # fmt: skip
    assert code == 0, err
    got = json.loads(out)
    assert (got["team_id"], got["scope"], got["value"], got["budget_usd_per_month"]) == (team_id, "end_user", "alice",
                                                                                          "2.5")  # fmt: skip
    code, out, err = await budgets_cli(capsys, "budgets", "set", "--team", team_id, "--tag", "project=apollo",
                                       "--tokens", "1000")  # fmt: skip
    assert code == 0, err
    code, out, _ = await budgets_cli(capsys, "budgets", "list", "--team", team_id)
    assert sorted((b["scope"], b["value"]) for b in json.loads(out)) == [("end_user", "alice"), ("tag", "apollo")]
    code, out, err = await budgets_cli(capsys, "budgets", "delete", "--team", team_id, "--tag", "project=apollo")
    assert code == 0 and json.loads(out)["deleted"] is True, err
    code, out, err = await budgets_cli(capsys, "budgets", "set", "--team", team_id, "--default-end-user")
    assert code == 1 and out == "" and "budget_usd_per_month or tokens_per_month" in err
    code, _, err = await budgets_cli(capsys, "budgets", "set", "--team", team_id, "--tag", "apollo", "--usd", "1")
    assert code == 1 and "NAME=VALUE" in err
