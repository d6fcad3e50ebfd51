"""Hostile and unlucky input to billing, against the real broker and the real ClickHouse engine: values that
cannot travel are refused at the door, a stored row billing cannot use never stops a start, a change made
while the broker is away still reaches the proxies, bodies are capped and read only for a known caller,
and one caller's request rate and reports are bounded."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import httpx
import pytest
from prometheus_client import REGISTRY

from schemas.config import load_config
from schemas.keys import hash_key
from services.billing.accounts import KEY_COLUMNS, TEAM_COLUMNS, Accounts
from services.billing.app import create_app
from services.billing.report_budget import ReportBudgetExceeded, ReportStore
from services.billing.settings import BillingSettings
from services.proxy.auth import KeyView
from services.proxy.control import ControlListener
from tests.support.billing import ADMIN, ADMIN_TOKEN, FINANCE, FINANCE_TOKEN, running_billing
from tests.support.waiting import eventually
from tollway.broker import BundledBroker
from tollway.servers import bound_port, make_server, start_server, stop_server
from tollway.topics import ensure_topics


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_error(resp: httpx.Response, status: int, field: str | None = None) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "code"}
    if field is not None:
        assert field in err["message"], err
    return err


@asynccontextmanager
async def proxy_view(bootstrap: str) -> AsyncIterator[KeyView]:
    """The proxy's own key view, fed by its own control listener (as a proxy replica runs it)."""
    view = KeyView()
    stop = asyncio.Event()
    listener = ControlListener(bootstrap, view.apply)
    task = asyncio.create_task(listener.run(stop))
    try:
        yield view
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)


# -- 1. limits and money: bounded at the API, never stored out of range ---------------------------------

BAD_LIMITS = [
    ("rpd", 18446744073709551616),
    ("tokens_per_month", 1e30),
    ("rpm", 2**53),
    ("budget_usd_per_month", 1e30),
    ("budget_usd_per_month", "NaN"),
    ("budget_usd_per_month", "0.0000001"),
]


@pytest.mark.parametrize(("field", "value"), BAD_LIMITS)
async def test_out_of_range_limits_are_422_naming_the_field_and_nothing_is_stored(billing, store, unique, field,
                                                                                  value):  # fmt: skip
    team = (await billing.post("/v1/admin/teams", json={"name": f"t-{unique}", "limits": {"rpm": 5}},
                               headers=ADMIN)).json()  # fmt: skip
    key = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
    bad = {"limits": {field: value}}
    for method, path, body in [
        ("PATCH", f"/v1/admin/teams/{team['team_id']}", bad),
        ("PATCH", f"/v1/admin/keys/{key['key_id']}", bad),
        ("POST", "/v1/admin/teams", {"name": f"u-{unique}", **bad}),
        ("POST", "/v1/admin/keys", {"team_id": team["team_id"], **bad}),
    ]:
        r = await billing.request(method, path, json=body, headers=ADMIN)
        err = assert_error(r, 422, f"limits.{field}")
        assert err["type"] == "invalid_request_error"

    fresh = Accounts(store, load_config("tollway.yaml"))
    await fresh.load()
    assert fresh.find_team(team["team_id"]).limits.model_dump(exclude_none=True) == {"rpm": 5}
    assert fresh.get_key(key["key_id"]).limits.model_dump(exclude_none=True) == {}
    assert fresh.find_team(f"u-{unique}") is None and len(fresh.keys()) == 1


# -- 2. a stored row billing cannot use: logged, counted, and billing starts and serves -----------------


async def test_start_survives_stored_rows_it_cannot_use(store, bootstrap, unique):
    now = datetime.now(UTC)
    good_secret = f"tw-good-{unique}"
    await store.insert_rows("teams", [
        ["team_huge", f"huge-{unique}", None, '{"rpd": 18446744073709551616, "rpm": 5}', now, 1],
        ["team_float", f"float-{unique}", None, '{"tokens_per_month": 1e30}', now, 1],
        ["team_junk", f"junk-{unique}", None, "not json", now, 1],
    ], TEAM_COLUMNS)  # fmt: skip
    await store.insert_rows("api_keys", [
        ["key_huge", hash_key(good_secret), "tw-good...", "team_huge", None, None,
         '{"budget_usd_per_month": 1e30, "tpm": 7}', {}, None, False, now, 1],
    ], KEY_COLUMNS)  # fmt: skip
    before = sample("tollway_billing_stored_unusable_total", table="teams", field="limits")

    async with proxy_view(bootstrap) as view, running_billing(store, bootstrap) as billing:
        assert (await billing.get("/healthz")).status_code == 200
        teams = {t["team_id"]: t for t in (await billing.get("/v1/admin/teams", headers=ADMIN)).json()["data"]}
        # The unusable field is left out (the plan's limit applies); the usable ones are kept.
        assert teams["team_huge"]["limits"] == {"rpm": 5}
        assert teams["team_float"]["limits"] == {} and teams["team_junk"]["limits"] == {}
        keys = (await billing.get("/v1/admin/keys", params={"team": "team_huge"}, headers=ADMIN)).json()["data"]
        assert [k["limits"] for k in keys] == [{"tpm": 7}]
        # Still serving writes, and the proxies got the full state.
        r = await billing.patch("/v1/admin/teams/team_huge", json={"limits": {"rpd": 1000}}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["published"] is True
        await eventually(lambda: asyncio.sleep(0, view), lambda v: v.lookup(good_secret) is not None)
        await eventually(lambda: asyncio.sleep(0, view), lambda v: v.teams.get("team_huge") is not None
                         and v.teams["team_huge"].limits.rpd == 1000)  # fmt: skip
    assert sample("tollway_billing_stored_unusable_total", table="teams", field="limits") - before == 3


# -- 3. the control outbox: a change made while the broker is away reaches the proxies -------------------


@pytest.fixture
def own_broker(tmp_path) -> Iterator[BundledBroker]:
    """A broker of this test's own, so pausing it troubles no other test."""
    b = BundledBroker(log_path=tmp_path / "tansu.log")
    b.start()
    try:
        yield b
    finally:
        if b.proc is not None and b.proc.poll() is None:
            os.kill(b.proc.pid, signal.SIGCONT)
        b.stop()


async def test_revocation_made_while_the_broker_is_stopped_reaches_the_proxy_without_a_billing_restart(
    store, own_broker
):
    bootstrap = own_broker.bootstrap
    await ensure_topics(bootstrap, usage_partitions=1)
    async with proxy_view(bootstrap) as view, running_billing(store, bootstrap, control_publish_wait_s=0.5) as billing:
        team = (await billing.post("/v1/admin/teams", json={"name": "outbox"}, headers=ADMIN)).json()
        key = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
        await eventually(lambda: asyncio.sleep(0, view), lambda v: v.lookup(key["key"]) is not None)

        assert own_broker.proc is not None
        os.kill(own_broker.proc.pid, signal.SIGSTOP)  # the broker stops answering; its log stays
        r = await billing.delete(f"/v1/admin/keys/{key['key_id']}", headers=ADMIN)
        assert r.status_code == 202, r.text
        assert r.json() == {"key_id": key["key_id"], "revoked": True, "published": False, "will_retry": True}
        assert view.lookup(key["key"]) is not None  # the proxy cannot know yet

        os.kill(own_broker.proc.pid, signal.SIGCONT)
        await eventually(lambda: asyncio.sleep(0, view), lambda v: v.lookup(key["key"]) is None, timeout_s=60)
        assert sample("tollway_billing_control_outbox") == 0


async def test_after_the_bundled_broker_restarts_empty_a_new_proxy_gets_the_whole_view_and_the_revocation(
    store, tmp_path
):
    """The bundled broker keeps memory only: a restart loses every control message. Billing notices (the
    outage, or an ack at a lower offset than before) and republishes the full state, so a proxy that starts
    now holds every key, revoked ones revoked, without billing restarting."""
    first = BundledBroker(log_path=tmp_path / "first.log")
    first.start()
    second = BundledBroker(port=first.port, log_path=tmp_path / "second.log")
    try:
        await ensure_topics(first.bootstrap, usage_partitions=1)
        async with running_billing(store, first.bootstrap, control_publish_wait_s=0.5) as billing:
            team = (await billing.post("/v1/admin/teams", json={"name": "restart"}, headers=ADMIN)).json()
            keys = [(await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
                    for _ in range(3)]  # fmt: skip
            first.kill()
            r = await billing.delete(f"/v1/admin/keys/{keys[0]['key_id']}", headers=ADMIN)
            assert r.status_code == 202 and r.json()["will_retry"] is True
            second.start()
            await ensure_topics(second.bootstrap, usage_partitions=1)
            async with proxy_view(second.bootstrap) as view:
                await eventually(lambda: asyncio.sleep(0, view), lambda v: v.snapshots_seen >= 1, timeout_s=60)
                assert view.lookup(keys[0]["key"]) is None
                assert all(view.lookup(k["key"]) is not None for k in keys[1:])
                assert team["team_id"] in view.teams
    finally:
        second.stop()
        first.stop()


async def test_billing_starts_with_no_broker_serves_reads_and_writes_and_catches_up_when_one_appears(store, tmp_path):
    """An operator restarts billing during a broker outage: it must not crash-loop. It starts, answers
    reads (invoices, usage, quota), saves admin writes (202, queued) and says it is degraded; when a broker
    appears, the topics are made and the queued writes and the full state reach a proxy, without a restart."""
    broker = BundledBroker(log_path=tmp_path / "late.log")  # its port is free: nothing listens there yet
    prepared: list[bool] = []

    async def prepare() -> None:
        await ensure_topics(broker.bootstrap, usage_partitions=1)
        prepared.append(True)

    try:
        settings = BillingSettings(admin_token=ADMIN_TOKEN, finance_token=FINANCE_TOKEN, control_publish_wait_s=0.5)
        app = create_app(settings, load_config("tollway.yaml"), store, broker.bootstrap, prepare_broker=prepare)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://billing") as billing:
                team = await billing.post("/v1/admin/teams", json={"name": f"late-{tmp_path.name}"}, headers=ADMIN)
                assert team.status_code == 202 and team.json()["will_retry"] is True, team.text
                tid = team.json()["team_id"]
                key = (await billing.post("/v1/admin/keys", json={"team_id": tid}, headers=ADMIN)).json()
                assert key["published"] is False
                for path in (f"/v1/invoices/draft_{tid}_{datetime.now(UTC):%Y-%m}", f"/v1/quota?team={tid}",
                             f"/v1/usage?team={tid}"):  # fmt: skip
                    r = await billing.get(path, headers=FINANCE)
                    assert r.status_code == 200, (path, r.text)
                ready = await billing.get("/readyz")
                assert ready.status_code == 503 and ready.json()["checks"] == {
                    "clickhouse": True, "control_publisher": False, "usage_stream": False}  # fmt: skip
                assert prepared == []

                broker.start()
                ok = await eventually(lambda: billing.get("/readyz"), lambda r: r.status_code == 200, timeout_s=60)
                assert all(ok.json()["checks"].values()) and prepared == [True]
                async with proxy_view(broker.bootstrap) as view:
                    await eventually(lambda: asyncio.sleep(0, view), lambda v: v.snapshots_seen >= 1, timeout_s=30)
                    assert view.lookup(key["key"]) is not None and tid in view.teams
    finally:
        broker.stop()


# -- 4. bodies: an unknown caller's body is never read; every body is capped ----------------------------


class CountingBody:
    """A request body the test can see being pulled, chunk by chunk."""

    def __init__(self, chunks: int, size: int = 1 << 20) -> None:
        self.total = chunks
        self.chunk = b"x" * size
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.total):
            self.read += 1
            yield self.chunk


async def test_unauthenticated_body_is_refused_401_before_any_of_it_is_read(billing):
    body = CountingBody(chunks=64)  # 64 MiB if it were read
    r = await billing.post("/v1/admin/teams", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 401)
    assert body.read <= 1, f"{body.read} MiB of an unauthenticated body were read"
    wrong = CountingBody(chunks=64)
    r = await billing.post("/v1/admin/teams", content=wrong, headers={"Authorization": "Bearer nope"})
    assert_error(r, 401)
    assert wrong.read <= 1


async def test_oversized_body_is_413_before_reading_it(billing, unique):
    body = CountingBody(chunks=8)
    r = await billing.post("/v1/admin/teams", content=body,
                           headers={**ADMIN, "Content-Length": str(8 << 20), "Content-Type": "application/json"})  # fmt: skip
    assert assert_error(r, 413)["code"] == "payload_too_large"
    assert body.read <= 1
    chunked = CountingBody(chunks=64)  # no Content-Length: counted while read, refused past the cap
    r = await billing.post("/v1/admin/teams", content=chunked, headers=ADMIN)
    assert_error(r, 413)
    assert chunked.read <= 2
    ok = await billing.post("/v1/admin/teams", json={"name": f"small-{unique}"}, headers=ADMIN)
    assert ok.status_code == 201, ok.text


# -- 5. names reject control characters ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["evil\x1b[31mred", "two\nlines", "nul\x00", "rtl\u202egnp.exe", "del\x7f", "c1\x85"])
async def test_names_with_control_characters_are_422_naming_the_field(billing, unique, name):
    assert_error(await billing.post("/v1/admin/teams", json={"name": name}, headers=ADMIN), 422, "name")
    team = (await billing.post("/v1/admin/teams", json={"name": f"ok-{unique}"}, headers=ADMIN)).json()
    r = await billing.post("/v1/admin/keys", json={"team_id": team["team_id"], "name": name}, headers=ADMIN)
    assert_error(r, 422, "name")
    key = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
    assert_error(await billing.patch(f"/v1/admin/keys/{key['key_id']}", json={"name": name}, headers=ADMIN), 422,
                 "name")  # fmt: skip


async def test_names_in_any_script_are_fine(billing, unique):
    r = await billing.post("/v1/admin/teams", json={"name": f"Équipe 東京 🚀 {unique}"}, headers=ADMIN)
    assert r.status_code == 201, r.text


# -- 6. per-caller rate limits and report budgets -------------------------------------------------------


async def test_a_team_over_its_request_rate_gets_429_with_retry_after_and_others_are_unaffected(store, bootstrap,
                                                                                               unique):  # fmt: skip
    async with running_billing(store, bootstrap, api_team_rate_per_s=0.5, api_team_burst=3) as billing:
        keys = []
        for name in ("a", "b"):
            team = (await billing.post("/v1/admin/teams", json={"name": f"{name}-{unique}"}, headers=ADMIN)).json()
            k = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
            keys.append({"Authorization": f"Bearer {k['key']}"})
        for _ in range(3):
            assert (await billing.get("/v1/quota", headers=keys[0])).status_code == 200
        r = await billing.get("/v1/quota", headers=keys[0])
        err = assert_error(r, 429)
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
        assert (await billing.get("/v1/quota", headers=keys[1])).status_code == 200  # another team
        assert (await billing.get("/v1/admin/teams", headers=ADMIN)).status_code == 200  # staff bucket


async def test_one_caller_gets_a_bounded_number_of_reports_in_flight(store, bootstrap, unique):
    async with running_billing(store, bootstrap, api_reports_in_flight=1) as billing:
        team = (await billing.post("/v1/admin/teams", json={"name": f"r-{unique}"}, headers=ADMIN)).json()
        k = (await billing.post("/v1/admin/keys", json={"team_id": team["team_id"]}, headers=ADMIN)).json()
        own = {"Authorization": f"Bearer {k['key']}"}
        busy = asyncio.create_task(store.query("SELECT sleep(2)"))  # the engine is busy: reports queue behind it
        await asyncio.sleep(0.1)
        first, second = await asyncio.gather(billing.get("/v1/usage", headers=own),
                                             billing.get("/v1/usage", headers=own))  # fmt: skip
        await busy
        assert first.status_code == 200, first.text
        err = assert_error(second, 429)
        assert err["code"] == "rate_limit_exceeded" and second.headers["retry-after"] == "1"
        assert (await billing.get("/v1/usage", headers=own)).status_code == 200  # the slot is free again


async def test_report_queries_carry_clickhouse_limits_and_a_query_past_them_is_a_clear_503(store):
    settings = BillingSettings(report_max_execution_s=0.5, report_max_memory_bytes=64 << 20, report_max_threads=1)
    reports = ReportStore(store, settings)
    (applied,) = await reports.query_dicts(
        "SELECT getSetting('max_execution_time') AS t, getSetting('max_memory_usage') AS m, "
        "getSetting('max_threads') AS th"
    )
    assert (float(applied["t"]), int(applied["m"]), int(applied["th"])) == (0.5, 64 << 20, 1)
    began = asyncio.get_running_loop().time()
    with pytest.raises(ReportBudgetExceeded) as err:
        await reports.query("SELECT sum(number) FROM numbers(1000000000000)")
    assert err.value.status == 503 and "budget" in err.value.message
    assert asyncio.get_running_loop().time() - began < 5
    # Writes and plain reads of the metering path are not touched.
    assert await store.query("SELECT getSetting('max_execution_time')") != [(0.5,)]


def test_billing_api_reads_reports_through_the_budgeted_store(engine):
    app = create_app(BillingSettings(), load_config("tollway.yaml"), engine, "127.0.0.1:9")
    assert isinstance(app.state.store, ReportStore)


# -- 7. the same over a real server: a 200 MB body costs the process next to nothing ---------------------


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def post_huge(port: int, headers: dict[str, str], size: int) -> tuple[int, float]:
    """POST `size` bytes over a raw socket, writing while the answer may already be on its way; returns the
    status and the seconds until it arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /v1/admin/teams HTTP/1.1\r\nHost: billing\r\nContent-Length: {size}\r\n{head}\r\n".encode())
    chunk = b"x" * (1 << 20)
    began = asyncio.get_running_loop().time()

    async def send_body() -> None:
        try:
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server answered and closed: exactly what should happen

    sender = asyncio.create_task(send_body())
    try:
        status_line = await asyncio.wait_for(reader.readline(), 30)
        took = asyncio.get_running_loop().time() - began
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    return int(status_line.split()[1]), took


async def test_real_server_refuses_200mb_bodies_fast_with_bounded_memory(store, bootstrap):
    settings = BillingSettings(admin_token="admin-token-for-tests", quota_group="q-hostile-rss")
    server = make_server(create_app(settings, load_config("tollway.yaml"), store, bootstrap), "127.0.0.1", 0)
    task = await start_server(server, "billing-under-test")
    try:
        port = bound_port(server)
        size = 200 << 20
        before = rss_bytes()
        status, took = await post_huge(port, {"Content-Type": "application/json"}, size)
        assert status == 401 and took < 5
        status, took = await post_huge(port, {"Authorization": "Bearer admin-token-for-tests"}, size)
        assert status == 413 and took < 5
        grown = rss_bytes() - before
        print(f"200 MB bodies: 401 and 413, RSS grew {grown / 2**20:.1f} MiB")
        assert grown < 50 << 20, f"RSS grew {grown / 2**20:.0f} MiB for two refused 200 MB bodies"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:  # still serving
            r = await client.get("/healthz")
            assert r.status_code == 200
    finally:
        await stop_server(server, task)
