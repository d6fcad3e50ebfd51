"""A month in the life of a finance team, on real processes: `tollway up --demo` (bundled tansu broker, embedded
ClickHouse) started six times on one data dir under a shifted clock (libfaketime), the official OpenAI and
Anthropic SDKs, the CLI.

Timeline (the shifted clock; the real date does not matter):
  Jan 20  team acme is created on plan `team` and makes calls.
  Feb 08  fresh broker, the spool's retention long past. acme: plain calls, prompt-cache tokens, a response-cache
          hit, a call whose provider reports no usage (estimated), another model. Agent traffic: /v1/responses
          (openai SDK: a flex-tier call with cached, reasoning and web-search usage, a stream, a follow-up GET)
          and /v1/messages (anthropic SDK: a prompt-cache write at 1 h and 5 m breakpoints read back by a stream,
          web searches, a prompt over the long-context threshold). A proxy with a skewed clock sends an event
          dated May: it must be dead-lettered, never roll the quota month; the operator re-feeds it with the clock
          corrected.
  (stopped) an in-place edit of prices in force (gpt-4.1's input, claude's 1-hour cache write) must stop
          start-up; a dated price change instead (gpt-4.1 from Feb 1, retroactive, its flex tier and web search
          too), then `tollway rerate --period 2027-02`, twice (the second run adds nothing).
  Feb 16  team beta is created mid-month; acme makes agent calls, then moves to plan `starter` mid-month.
  (stopped) claude-sonnet-4.5 changes price from Feb 20 in every dimension (a new entry): its lines split.
  Feb 25  traffic shaped like Feb 16's (a fresh broker hands out the same offsets); quota must equal the ledger.
  Mar 10  finalizing February before January is refused (order), so is the open March; Jan and Feb are
          finalized and every surface is compared; then late February events arrive and must show as
          "late usage" lines on March's draft, February's invoice unchanged.
  (stopped) gpt-4.1-mini gets cheaper from Feb 20, after February was invoiced: rerate February and March.
  Apr 05  March is finalized, carrying acme's late usage and beta's re-rating (and rounding) lines; February's
          reconciliation counts what was carried.

Every expected figure is recomputed here from the YAML prices (parsed with PyYAML, Decimal: base rates, service
tiers, long-context tiers, fees, baselines) and what each SDK call reported, in every dimension (uncached input,
cache read, cache write 5m / 1h, output, request fee, web search), and compared with: `GET /v1/usage` (exact,
per dimension and per model), `GET /v1/quota` (exact), `GET /v1/invoices` JSON and CSV (a line per model, price
entry, dimension and unit price, rounded once, half-even, totals = sums), `GET /v1/reports/roi` (JSON and CSV,
actual and baseline), `GET /v1/reconcile` and `tollway reconcile` (`ok`, exact metered amounts, rounded billable
and invoiced). Disagreements are collected and reported together, so one run shows every surface that is wrong.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
import yaml

from tests.e2e.conftest import TOLLWAY, Stack, stack_env, start_stack, stop_stack
from tests.support.month import (
    DIMENSIONS,
    FAKETIME_LIB,
    Call,
    Catalog,
    Checks,
    FakeClock,
    ItemKey,
    Ledger,
    amount,
    cents,
    crafted_event,
    dead_letters,
    month_bounds,
    produce,
    prorated_fee,
)

BASE_CONFIG = Path(__file__).with_name("month_in_the_life.yaml")
USAGE_TOPIC, DLQ_TOPIC = "tollway.usage.v1", "tollway.usage.dlq"
JAN, FEB, MAR = "2027-01", "2027-02", "2027-03"
CLAUDE = "claude-sonnet-4.5"


@dataclass
class Team:
    team_id: str
    name: str
    key: str
    key_id: str


def D(v: Any) -> Decimal:
    return Decimal(str(v))


def dec(v: Any) -> Decimal | None:
    """A money field that an older build may not have (None then, so the check fails instead of the test)."""
    return None if v is None else Decimal(str(v))


class Month:
    """The stack across restarts (one data dir, fixed ports and proxy instance), the calls made, the checks."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "tollway.yaml"
        shutil.copy(BASE_CONFIG, self.config)
        self.env = stack_env(tmp, TOLLWAY_SPOOL_RETAIN_S="0.1", TOLLWAY_PROXY_INSTANCE="month-proxy",
                             TOLLWAY_ROLLUP_INTERVAL_S="1", TOLLWAY_QUOTA_COMMIT_DELAY_S="1",
                             TOLLWAY_METER_SESSION_TIMEOUT_MS="3000", TOLLWAY_BATCH_MAX_WAIT_MS="20")  # fmt: skip
        self.env["TOLLWAY_CONFIG"] = str(self.config)
        self.ledger = Ledger()
        self.checks = Checks()
        self.plans: dict[str, list[tuple[datetime, str]]] = defaultdict(list)  # team -> (from, plan)
        self.stack: Stack | None = None
        self.clock = FakeClock(0)
        self.bootstrap = ""

    # -- processes ---------------------------------------------------------------------------------------

    def faked(self, at: datetime) -> dict[str, str]:
        self.clock = FakeClock.at(at)
        return {**self.env, **self.clock.env()}

    @contextmanager
    def running(self, at: datetime) -> Iterator[Stack]:
        began = time.monotonic()
        s = start_stack(self.tmp, self.faked(at))
        self.stack = s
        self.bootstrap = self.printed_bootstrap(s)
        started = time.monotonic() - began
        try:
            yield s
        finally:
            rc = stop_stack(s)
            self.reap_broker()
            self.stack = None
            self.checks.eq(f"`tollway up` at {at:%b %d} stops cleanly (exit code)", rc, 0)
            print(
                f"run {at:%b %d}: {time.monotonic() - began:.1f} s ({started:.1f} s to start), "
                f"{len(self.checks.failures)} disagreements so far"
            )
            # What the next start's fresh broker will get: only the segments not yet past retention.
            kept = sorted((self.tmp / "data" / "proxy" / "spool" / "month-proxy").glob("*.seg"))
            self.checks.true(f"spool after {at:%b %d}: acknowledged segments past retention deleted", len(kept) <= 2,
                             [p.name for p in kept])  # fmt: skip

    @staticmethod
    def printed_bootstrap(s: Stack) -> str:
        """The bundled broker's address from the line `tollway up` prints (it can follow /readyz by a moment)."""
        deadline = time.monotonic() + 10
        while not (found := re.findall(r"Tollway is up: .* kafka (\S+)", s.log_path.read_text())):
            assert time.monotonic() < deadline, "`tollway up` never printed its Kafka address"
            time.sleep(0.05)
        return found[-1]

    def reap_broker(self) -> None:
        try:
            pid = int((self.tmp / "data" / "broker.pid").read_text())
            if b"broker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def tollway(self, *args: str, at: datetime | None = None) -> subprocess.CompletedProcess[str]:
        """A CLI command on the shifted clock: `at` between runs, the running stack's clock otherwise."""
        env = self.faked(at) if at is not None else {**self.env, **self.clock.env()}
        return subprocess.run([TOLLWAY, *args], env=env, capture_output=True, text=True, timeout=120, cwd=self.tmp)

    def start_refused(self, at: datetime) -> tuple[bool, str]:
        """Start `tollway up` and report whether it refused (exited) rather than became ready; a start that
        succeeds is stopped at once, before anything is sent through it."""
        log = self.tmp / "refused.log"
        env = self.faked(at)
        proc = subprocess.Popen([TOLLWAY, "up", "--demo"], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                cwd=self.tmp)  # fmt: skip
        ready = f"http://127.0.0.1:{env['TOLLWAY_PROXY_PORT']}/readyz"
        deadline = time.monotonic() + 60
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(ready, timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            refused = proc.poll() is not None and proc.returncode != 0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.reap_broker()
        return refused, log.read_text()

    # -- the billing API ---------------------------------------------------------------------------------

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        assert self.stack is not None
        headers = {"authorization": f"Bearer {token or self.stack.admin_token}", **kw.pop("headers", {})}
        return httpx.request(method, self.stack.billing_url + path, headers=headers, timeout=60, **kw)

    def get(self, path: str, **params: str) -> Any:
        r = self.api("GET", path, params=params)
        assert r.status_code == 200, f"GET {path} {params}: {r.status_code} {r.text[:500]}"
        return r.json()

    def create_team(self, name: str, plan: str | None = None) -> Team:
        before = self.clock.now()
        r = self.api("POST", "/v1/admin/teams", json={"name": name} | ({"plan": plan} if plan else {}))
        assert r.status_code == 201, r.text
        team_id = r.json()["team_id"]
        after = self.clock.now()
        self.plans[team_id].append((before + (after - before) / 2, r.json()["plan"]))
        k = self.api("POST", "/v1/admin/keys", json={"team_id": team_id, "name": f"{name}-key"})
        assert k.status_code == 201, k.text
        team = Team(team_id, name, k.json()["key"], k.json()["key_id"])
        self.wait_key(team)
        return team

    def wait_key(self, team: Team) -> None:
        assert self.stack is not None
        deadline = time.monotonic() + 10
        while (
            httpx.get(f"{self.stack.proxy_url}/models", headers={"authorization": f"Bearer {team.key}"}).status_code
            != 200
        ):
            assert time.monotonic() < deadline, "the new key was not accepted by the proxy within 10 s"
            time.sleep(0.02)

    def change_plan(self, team: Team, plan: str) -> None:
        before = self.clock.now()
        r = self.api("PATCH", f"/v1/admin/teams/{team.team_id}", json={"plan": plan})
        assert r.status_code == 200, r.text
        after = self.clock.now()
        self.plans[team.team_id].append((before + (after - before) / 2, plan))

    # -- calls -------------------------------------------------------------------------------------------

    def chat(self, team: Team, model: str, text: str, *, cached: int = 0, usage: bool = True,
             temperature: float | None = None, label: str = "") -> Call:  # fmt: skip
        """One call through the proxy with the official SDK; the Call holds what the response reported."""
        assert self.stack is not None
        client = openai.OpenAI(base_url=self.stack.proxy_url, api_key=team.key, max_retries=0)
        messages = [{"role": "user", "content": text}]
        mock: dict[str, Any] = {}
        if cached:
            mock["cached_tokens"] = cached
        if not usage:
            mock["usage"] = False
        extra: dict[str, Any] = {"extra_body": {"mock": mock}} if mock else {}
        if temperature is not None:
            extra["temperature"] = temperature
        at = self.clock.now()
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, **extra)
        r = raw.parse()
        hit = raw.headers.get("x-tollway-cache") == "hit"
        if r.usage is not None:
            details = r.usage.prompt_tokens_details
            call = Call(team.team_id, at, model, r.usage.prompt_tokens, r.usage.completion_tokens,
                        (details.cached_tokens or 0) if details else 0, hit, label)  # fmt: skip
        else:
            # No usage from the provider: billed at the proxy's documented estimate (~4 characters a token).
            content = r.choices[0].message.content or ""
            call = Call(team.team_id, at, model, max(1, len(orjson.dumps(messages)) // 4), (len(content) + 3) // 4,
                        0, hit, label or "estimated")  # fmt: skip
        self.ledger.calls.append(call)
        return call

    def messages(self, team: Team, text: str, *, stream: bool = False, system: list[dict[str, Any]] | None = None,
                 mock: dict[str, Any] | None = None, label: str = "") -> Call:  # fmt: skip
        """One /v1/messages call with the official `anthropic` SDK (plain, or streamed to its final message); the
        Call holds the usage the SDK read: input + cache reads + cache writes = the prompt, the 5m / 1h split."""
        assert self.stack is not None
        client = anthropic.Anthropic(base_url=self.stack.proxy_url.removesuffix("/v1"), api_key=team.key,
                                     max_retries=0)  # fmt: skip
        kw: dict[str, Any] = {"model": CLAUDE, "max_tokens": 256, "messages": [{"role": "user", "content": text}]}
        if system is not None:
            kw["system"] = system
        if mock:
            kw["extra_body"] = {"mock": mock}
        at = self.clock.now()
        if stream:
            with client.messages.stream(**kw) as s:
                streamed = "".join(s.text_stream)
                final = s.get_final_message()
            self.checks.true(f"{label or text}: the stream's text is its final message's", bool(streamed) and
                             streamed == "".join(b.text for b in final.content if b.type == "text"))  # fmt: skip
        else:
            final = client.messages.create(**kw)
        u = final.usage
        read, write = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
        split = u.cache_creation
        w1h = split.ephemeral_1h_input_tokens if split else 0
        w5m = split.ephemeral_5m_input_tokens if split else write
        call = Call(team.team_id, at, CLAUDE, u.input_tokens + read + write, u.output_tokens, read, label=label,
                    cache_write=w5m, cache_write_1h=w1h, tier=u.service_tier or "",
                    web_search=u.server_tool_use.web_search_requests if u.server_tool_use else 0)  # fmt: skip
        self.ledger.calls.append(call)
        return call

    def responses(self, team: Team, text: str, *, stream: bool = False, mock: dict[str, Any] | None = None,
                  reasoning: bool = False, label: str = "") -> tuple[Call, str]:  # fmt: skip
        """One /v1/responses call with the official `openai` SDK (plain, or `responses.stream` to its final
        response): (the Call as the SDK saw its usage, the response id)."""
        assert self.stack is not None
        client = openai.OpenAI(base_url=self.stack.proxy_url, api_key=team.key, max_retries=0)
        kw: dict[str, Any] = {"model": "gpt-4.1", "input": text}
        if reasoning:
            kw["reasoning"] = {"effort": "low"}
        if mock:
            kw["extra_body"] = {"mock": mock}
        at = self.clock.now()
        if stream:
            with client.responses.stream(**kw) as s:
                streamed = "".join(ev.delta for ev in s if ev.type == "response.output_text.delta")
                r = s.get_final_response()
            self.checks.true(f"{label or text}: the stream's text is its final response's",
                             bool(streamed) and streamed == r.output_text)  # fmt: skip
        else:
            r = client.responses.create(**kw)
        u = r.usage
        assert u is not None, "a Responses call without usage"
        call = Call(team.team_id, at, "gpt-4.1", u.input_tokens, u.output_tokens, u.input_tokens_details.cached_tokens,
                    label=label, reasoning=u.output_tokens_details.reasoning_tokens, tier=r.service_tier or "",
                    web_search=sum(1 for o in r.output if o.type == "web_search_call"))  # fmt: skip
        self.ledger.calls.append(call)
        return call, r.id

    def retrieve(self, team: Team, response_id: str, want: Call) -> None:
        """A follow-up GET of a stored response: the same usage back, billed nothing (an event of no model)."""
        assert self.stack is not None
        client = openai.OpenAI(base_url=self.stack.proxy_url, api_key=team.key, max_retries=0)
        at = self.clock.now()
        got = client.responses.retrieve(response_id)
        self.checks.eq("GET /v1/responses/{id}: the stored response's usage",
                       (got.id, got.usage.input_tokens if got.usage else None), (response_id, want.prompt))  # fmt: skip
        self.ledger.calls.append(Call(team.team_id, at, "", 0, 0, label="responses.get"))

    def send_events(self, events: list[dict[str, Any]]) -> None:
        produce(self.bootstrap, USAGE_TOPIC, [(e["team_id"].encode(), orjson.dumps(e)) for e in events])

    def wait_billed(self, team: Team, period: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """Usage of a team-month once the meter has written every call the ledger holds for it."""
        want = len(self.ledger.of(team.team_id, period))
        lo, hi = month_range(period)
        deadline = time.monotonic() + timeout_s
        while True:
            u = self.get("/v1/usage", team=team.team_id, **{"from": lo, "to": hi}, group_by="model")
            if u["totals"]["requests"] >= want or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.checks.eq(f"{team.name} {period}: requests billed (usage API) vs answered", u["totals"]["requests"], want)
        return u

    # -- expectations ------------------------------------------------------------------------------------

    def catalog(self) -> Catalog:
        return Catalog(self.config)

    def fee_spans(self, team: Team, period: str) -> list[tuple[str, datetime, datetime, Decimal]]:
        """(plan, from, to, monthly fee) for each plan with a fee the team was on during the period, by this
        test's clock: from the team's creation, split at each plan change."""
        catalog, history = self.catalog(), self.plans[team.team_id]
        lo, hi = month_bounds(period)
        out = []
        for i, (start, plan) in enumerate(history):
            end = history[i + 1][0] if i + 1 < len(history) else hi
            start, end = max(start, lo), min(end, hi)
            if end > start and catalog.fees[plan]:
                out.append((plan, start, end, catalog.fees[plan]))
        return out

    # -- comparisons -------------------------------------------------------------------------------------

    def check_usage(self, team: Team, period: str, usage: dict[str, Any] | None = None) -> None:
        calls, catalog = self.ledger.of(team.team_id, period), self.catalog()
        if usage is None:
            lo, hi = month_range(period)
            usage = self.get("/v1/usage", team=team.team_id, **{"from": lo, "to": hi}, group_by="model")
        tag = f"{team.name} {period}"
        self.checks.eq(f"{tag}: usage API totals.cost_usd (exact)", D(usage["totals"]["cost_usd"]),
                       Ledger.exact(calls, catalog))  # fmt: skip
        billed = [c for c in calls if c.billable]
        hits = [c for c in calls if c.cache_hit]

        def billed_sum(dim: str) -> int:
            return sum(c.quantities()[dim] for c in billed)

        want_counts = {
            "requests": len(calls), "prompt_tokens": sum(c.prompt for c in calls),
            "completion_tokens": sum(c.completion for c in calls), "cached_tokens": sum(c.cached for c in calls),
            "billed_requests": len(billed), "billed_input_tokens": billed_sum("input"),
            "billed_cached_input_tokens": billed_sum("cached_input"), "billed_output_tokens": billed_sum("output"),
            "cache_hits": len(hits), "cache_hit_prompt_tokens": sum(c.prompt for c in hits),
            "cache_hit_completion_tokens": sum(c.completion for c in hits),
            "cache_write_tokens": sum(c.cache_write for c in calls),
            "cache_write_1h_tokens": sum(c.cache_write_1h for c in calls),
            "web_search_requests": sum(c.web_search for c in calls),
            "billed_cache_write_tokens": billed_sum("cache_write"),
            "billed_cache_write_1h_tokens": billed_sum("cache_write_1h"),
            "billed_fee_requests": billed_sum("request"), "billed_web_search_requests": billed_sum("web_search"),
        }  # fmt: skip
        self.checks.eq(f"{tag}: usage API totals (requests and tokens, billed and cache-hit apart, every dimension)",
                       {k: usage["totals"].get(k) for k in want_counts}, want_counts)  # fmt: skip
        self.checks.eq(f"{tag}: usage API totals cost_<dimension>_usd (exact)", dimension_costs(usage["totals"]),
                       {d: Ledger.exact(calls, catalog, component=d) for d in DIMENSIONS})  # fmt: skip
        by_model = {g["model"]: g for g in usage["groups"]}
        for model in sorted({c.model for c in calls}):
            g = by_model.get(shown(model))
            self.checks.eq(f"{tag}: usage API {shown(model)} cost_usd (exact)", D(g["cost_usd"]) if g else None,
                           Ledger.exact(calls, catalog, model))  # fmt: skip
            self.checks.eq(f"{tag}: usage API {shown(model)} cost_<dimension>_usd (exact)",
                           dimension_costs(g) if g else None,
                           {d: Ledger.exact(calls, catalog, model, d) for d in DIMENSIONS})  # fmt: skip

    def check_quota(self, team: Team, period: str) -> None:
        calls, catalog = self.ledger.of(team.team_id, period), self.catalog()
        want_usd, want_tokens = Ledger.exact(calls, catalog), Ledger.tokens(calls)
        deadline = time.monotonic() + 10  # the quota loop converges to the ledger: wait on it, briefly
        while True:
            q = self.get("/v1/quota", team=team.team_id)
            used = q["team"]["used"]
            if (q["period"], D(used["usd"]), used["tokens"]) == (period, want_usd, want_tokens):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        tag = f"{team.name} {period}"
        self.checks.eq(f"{tag}: quota period", q["period"], period)
        self.checks.eq(f"{tag}: quota used.usd (exact) vs ledger", D(used["usd"]), want_usd)
        self.checks.eq(f"{tag}: quota used.tokens vs ledger", used["tokens"], want_tokens)

    def check_roi(self, team: Team, period: str) -> None:
        """Per model: actual = the ledger rounded once; baseline = every call (cache hits too) at the baseline rates
        (tier and long context chosen per call), or at its own price without a baseline; the traffic's counts."""
        calls, catalog = self.ledger.of(team.team_id, period), self.catalog()
        tag = f"{team.name} {period} ROI"
        roi = self.get("/v1/reports/roi", team=team.team_id, period=period)
        rows = {m["model"]: m for m in roi["models"]}
        for model in sorted({c.model for c in calls}):
            row, of = rows.get(shown(model)), [c for c in calls if c.model == model]
            got = D(row["actual_cost_usd"]) if row else None
            self.checks.eq(f"{tag}: {shown(model)} actual_cost_usd", got, cents(Ledger.exact(calls, catalog, model)))
            if row is None:
                continue
            self.checks.eq(f"{tag}: {shown(model)} baseline_cost_usd", D(row["baseline_cost_usd"]),
                           cents(Ledger.baseline(calls, catalog, model)))  # fmt: skip
            self.checks.eq(f"{tag}: {shown(model)} requests, cache hits, prompt, cached and completion tokens",
                           tuple(row[k] for k in ("requests", "cache_hits", "prompt_tokens", "cached_tokens",
                                                  "completion_tokens")),
                           (len(of), sum(c.cache_hit for c in of), sum(c.prompt for c in of),
                            sum(min(c.cached, c.prompt) for c in of), sum(c.completion for c in of)))  # fmt: skip
        self.checks.eq(f"{tag}: actual_cost_usd = sum of its model rows", D(roi["actual_cost_usd"]),
                       sum((D(m["actual_cost_usd"]) for m in roi["models"]), Decimal(0)))  # fmt: skip
        r = self.api("GET", "/v1/reports/roi", params={"team": team.team_id, "period": period},
                     headers={"accept": "text/csv"})  # fmt: skip
        table = list(csv.DictReader(io.StringIO(r.text)))
        body, total = [x for x in table if x["model"] != "TOTAL"], [x for x in table if x["model"] == "TOTAL"]
        self.checks.eq(f"{tag} CSV: one TOTAL row", len(total), 1)
        if total:
            for col in ("actual_cost_usd", "baseline_cost_usd", "savings_usd", "cache_savings_usd"):
                self.checks.eq(f"{tag} CSV: TOTAL {col} = sum of rows", D(total[0][col]),
                               sum((D(x[col]) for x in body), Decimal(0)))  # fmt: skip
            for col in ("actual_cost_usd", "baseline_cost_usd"):
                self.checks.eq(f"{tag} CSV: TOTAL {col} = JSON {col}", D(total[0][col]), D(roi[col]))

    def check_reconcile(self, period: str, teams: list[Team], state: str = "invoiced",
                        billed: dict[ItemKey, tuple[int, Decimal]] | None = None) -> dict[str, Any]:  # fmt: skip
        """Per team and model: metered (exact) = the ledger; billable = its lines rounded once; invoiced (and what
        the next open invoice carries) to the cent. `billed`: the lines finalized so far, when `state` says the
        rest is carried (adjustment_pending)."""
        catalog = self.catalog()
        deadline = time.monotonic() + 10  # rollups are recomputed every second: wait for them to catch up
        while True:
            rec = self.get("/v1/reconcile", period=period)
            if D(rec["totals"]["rollup_difference_usd"]) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        self.checks.true(f"reconcile {period}: ok", rec["ok"] is True,
                         orjson.dumps({k: rec.get(k) for k in ("ok", "sequence_gaps", "problems", "totals")}).decode()[:3000])  # fmt: skip
        self.checks.eq(f"reconcile {period}: sequence gaps", rec["sequence_gaps"], 0)
        rows = {(r["team_id"], r["model"]): r for r in rec["rows"]}
        for team in teams:
            calls = self.ledger.of(team.team_id, period)
            lines = Ledger.lines(calls, catalog)
            for model in sorted({c.model for c in calls}):
                row = rows.get((team.team_id, model))
                tag = f"reconcile {period} {team.name} {model}"
                if not self.checks.true(f"{tag}: row present", row is not None, sorted(rows)):
                    continue
                billable = sum((a for (m, *_), (_, a) in lines.items() if m == model), Decimal(0))
                self.checks.eq(
                    f"{tag}: metered_usd (exact)", dec(row.get("metered_usd")), Ledger.exact(calls, catalog, model)
                )
                self.checks.eq(f"{tag}: billable_usd (lines rounded once)", dec(row.get("billable_usd")), billable)
                invoiced = billable
                if billed is not None:
                    invoiced = sum((a for (m, *_), (_, a) in billed.items() if m == model), Decimal(0))
                self.checks.eq(f"{tag}: invoice_state", row.get("invoice_state"),
                               "invoiced" if invoiced == billable else state)  # fmt: skip
                if billed is not None:
                    self.checks.eq(f"{tag}: carried_usd (on the next invoice)", dec(row.get("carried_usd")),
                                   billable - invoiced)  # fmt: skip
                self.checks.eq(f"{tag}: invoiced_usd", dec(row.get("invoiced_usd")), invoiced)
        return rec

    def check_invoice(self, inv: dict[str, Any], team: Team, period: str, status: str,
                      adjustments: list[Adjustment] = ()) -> None:  # fmt: skip
        """Usage lines keyed by (model, component, unit price), plan fees, adjustment lines; totals = sums."""
        tag = f"{team.name} {period} invoice"
        catalog = self.catalog()
        self.checks.eq(f"{tag}: status", inv["status"], status)
        want_usage = sorted((m, comp, price, q, a) for (m, _, comp, price), (q, a)
                            in Ledger.lines(self.ledger.of(team.team_id, period), catalog).items())  # fmt: skip
        got_usage = sorted((x["model"], x["component"], line_price(x), x["quantity"], D(x["amount_usd"]))
                           for x in inv["lines"] if x["type"] == "usage")  # fmt: skip
        self.checks.eq(f"{tag}: usage lines (model, component, unit price, quantity, amount)", got_usage, want_usage)
        # Plan fees: the spans must start at the team's creation and split at the plan change (this test's clock,
        # within 2 s: the product floors to the second); each amount = fee x seconds of its span / seconds of the
        # month, rounded once.
        spans = self.fee_spans(team, period)
        got_fees = [x for x in inv["lines"] if x["type"] == "plan_fee"]
        self.checks.eq(f"{tag}: plan fee lines, one per plan in force", [x.get("plan") for x in got_fees],
                       [p for p, *_ in spans])  # fmt: skip
        fees = [cents(prorated_fee(fee, a, b, period)) for _, a, b, fee in spans]
        if [x.get("plan") for x in got_fees] == [p for p, *_ in spans]:
            fees = []
            for x, (plan, a, b, fee) in zip(got_fees, spans, strict=True):
                lo, hi = instant(x["from"]), instant(x["to"])
                self.checks.true(f"{tag}: {plan} fee span [{x['from']}, {x['to']}) vs [{a}, {b})",
                                 abs(lo - a) <= timedelta(seconds=2) and abs(hi - b) <= timedelta(seconds=2))  # fmt: skip
                fees.append(cents(prorated_fee(fee, lo, hi, period)))
                self.checks.eq(f"{tag}: {plan} fee amount (prorated by the second)", D(x["amount_usd"]), fees[-1])
        want_adj = sorted(adjustments)
        got_adj = sorted((x["adjusts"]["period"], x["adjusts"]["model"], x["adjusts"]["component"], line_price(x),
                          x["quantity"], D(x["amount_usd"]), x.get("reason"))
                         for x in inv["lines"] if x["type"] == "adjustment")  # fmt: skip
        self.checks.eq(f"{tag}: adjustment lines (period, model, component, unit price, tokens, amount, cause)",
                       sorted(got_adj), sorted(want_adj))  # fmt: skip
        want_total = (
            sum((a for *_, a in want_usage), Decimal(0))
            + sum(fees, Decimal(0))
            + sum((a for *_, a, _ in want_adj), Decimal(0))
        )
        self.checks.eq(f"{tag}: total_usd", D(inv["total_usd"]), want_total)
        self.checks.eq(f"{tag}: total_usd = sum of its lines", D(inv["total_usd"]),
                       sum((D(x["amount_usd"]) for x in inv["lines"]), Decimal(0)))  # fmt: skip
        r = self.api("GET", f"/v1/invoices/{inv['invoice_id']}", headers={"accept": "text/csv"})
        self.checks.eq(f"{tag} CSV: status", r.status_code, 200)
        rows = list(csv.DictReader(io.StringIO(r.text)))
        by_line = {int(x["line"]): x for x in rows if x["line"]}
        for x in inv["lines"]:
            got = by_line.get(x["line"])
            self.checks.eq(f"{tag} CSV line {x['line']} (type, component, quantity, unit price, amount)",
                           csv_line(got) if got else None,
                           (x["type"], x.get("component", ""), D(x["quantity"]),
                            line_price(x) if x["type"] != "plan_fee" else D(x["unit_price_usd"]),
                            D(x["amount_usd"])))  # fmt: skip
        totals = [x for x in rows if x["type"] == "total"]
        self.checks.eq(f"{tag} CSV: total row", [D(x["amount_usd"]) for x in totals], [want_total])

    def invoice(self, team: Team, period: str) -> dict[str, Any]:
        data = self.get("/v1/invoices", team=team.team_id, period=period)["data"]
        assert len(data) == 1, data
        return data[0]

    def finalize(self, team: Team, period: str) -> httpx.Response:
        return self.api("POST", "/v1/admin/invoices/finalize", json={"period": period, "team": team.team_id})


Adjustment = tuple[
    str, str, str, Decimal, int, Decimal, str
]  # period, model, component, unit price, qty, amount, cause


def adjustments(period: str, billed: dict[ItemKey, tuple[int, Decimal]], known: list[Call], now: list[Call],
                catalog: Catalog) -> list[Adjustment]:  # fmt: skip
    """The lines a later invoice carries for closed `period`, per item (model, price entry, component, unit price),
    by the rule docs/metering.md states: with B billed so far, T the quantity now and K the quantity of the events
    known when the period was billed, "late usage" T - K and "re-rating" K - B, each amount rounded once, and a
    0-quantity "rounding" line keeping the item's cumulative amount at round(T x unit)."""
    t_items, k_items = Ledger.items(now, catalog), Ledger.items(known, catalog)
    out = []
    for key in sorted(set(t_items) | set(k_items) | set(billed)):
        t, k = t_items.get(key, 0), k_items.get(key, 0)
        b_qty, b_amount = billed.get(key, (0, Decimal(0)))
        late, rerate = cents(amount(key, t - k)), cents(amount(key, k - b_qty))
        rounding = cents(amount(key, t)) - b_amount - late - rerate
        for cause, qty, amt in (
            ("late usage", t - k, late),
            ("re-rating", k - b_qty, rerate),
            ("rounding", 0, rounding),
        ):
            if qty or amt:
                out.append((period, key[0], key[2], key[3], qty, amt, cause))
    return out


# The price field of a line, by its component's basis (docs/metering.md: per 1M tokens, per request, per 1K).
PRICE_FIELD = {d: "unit_price_usd_per_1m" for d in DIMENSIONS} | {"request": "unit_price_usd_per_request",
                                                                   "web_search": "unit_price_usd_per_1k"}  # fmt: skip


def line_price(x: dict[str, Any]) -> Decimal | None:
    comp = x["adjusts"]["component"] if x["type"] == "adjustment" else x["component"]
    return dec(x.get(PRICE_FIELD[comp]))


def csv_line(row: dict[str, str]) -> tuple[str, str, Decimal, Decimal | None, Decimal]:
    """What a CSV row says of its line: the one price column holds the line's price in its basis."""
    return (
        row["type"],
        row["component"],
        D(row["quantity"]),
        dec(row["unit_price_usd_per_1m"] or None),
        D(row["amount_usd"]),
    )


def dimension_costs(g: dict[str, Any]) -> dict[str, Decimal | None]:
    """A usage report's cost by dimension (cost_<dimension>_usd), None where the field is missing."""
    return {d: dec(g.get(f"cost_{d}_usd")) for d in DIMENSIONS}


def shown(model: str) -> str:
    """How reports name a billed model: a call that names none (a follow-up GET) is `(unknown)`."""
    return model or "(unknown)"


def agent_calls(m: Month, team: Team, day: str) -> None:
    """Mid- and late-month agent traffic, one shape for both runs (a fresh broker hands out the same offsets): a
    Messages stream with cache reads and 1-hour writes (the mock's directives), a plain flex-tier Responses call."""
    c = m.messages(team, f"{day}: what did the agents spend?", stream=True,
                   mock={"input_tokens": 150, "cached_tokens": 20, "cache_write_1h_tokens": 40}, label=f"{day} messages stream")  # fmt: skip
    m.checks.eq(f"{day}: the Messages stream reports its cache read and 1-hour write", (c.cached, c.cache_write_1h),
                (20, 40))  # fmt: skip
    r, _ = m.responses(team, f"{day}: and on Responses?", mock={"service_tier": "flex", "input_tokens": 80, "cached_tokens": 4},
                       label=f"{day} responses flex")  # fmt: skip
    m.checks.eq(f"{day}: the Responses call reports the flex tier", r.tier, "flex")


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def month_range(period: str) -> tuple[str, str]:
    """`from`/`to` for the usage API: the first and the last day (a bare `to` date covers its whole day)."""
    y, m = int(period[:4]), int(period[5:7])
    last = datetime(y + (m == 12), m % 12 + 1, 1) - timedelta(days=1)
    return f"{period}-01", last.strftime("%Y-%m-%d")


def error_code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def printed_json(stdout: str) -> Any:
    """The indented JSON document a CLI command prints last (log lines may come before it)."""
    start = 0 if stdout.startswith("{\n") else stdout.rfind("\n{\n") + 1
    return orjson.loads(stdout[start:])


def edit_config(path: Path, edit: Any) -> None:
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def t(month: int, day: int, hour: int) -> datetime:
    return datetime(2027, month, day, hour, 0, tzinfo=UTC)


@pytest.mark.slow
def test_a_month_in_the_life_every_surface_agrees_to_the_cent(tmp_path: Path) -> None:
    assert FAKETIME_LIB.exists(), "libfaketime is missing: `make system-deps` (Debian package faketime)"
    m = Month(tmp_path)
    ck = m.checks
    try:
        # Jan 20: acme is created (plan `team`) and makes its first calls.
        with m.running(t(1, 20, 10)):
            acme = m.create_team("acme")
            for i in range(3):
                m.chat(acme, "gpt-4.1", f"January question {i}: how do we bill {i} things?", cached=4 if i == 1 else 0)
            m.check_usage(acme, JAN, m.wait_billed(acme, JAN))

        # Feb 08: a fresh broker, the spool's retention long past; the first half of the month.
        with m.running(t(2, 8, 9)):
            for i in range(4):
                m.chat(acme, "gpt-4.1", f"February question {i}: what is {i} plus {i * 7}?", cached=6 if i == 2 else 0)
            m.chat(acme, "gpt-4.1-mini", "Summarise the ledger in one line please")
            m.chat(acme, "gpt-4.1", "Answer me without usage numbers please", usage=False)
            miss = m.chat(acme, "gpt-4.1", "Cache me: the same prompt twice", temperature=0)
            hit = m.chat(acme, "gpt-4.1", "Cache me: the same prompt twice", temperature=0)
            ck.true("Feb 08: the repeated temperature-0 call is a cache hit", hit.cache_hit and not miss.cache_hit)

            # Agent traffic through the official SDKs, in every dimension each API reports. Responses (gpt-4.1): a
            # flex-tier call with cached, reasoning and web-search usage, a stream, a follow-up GET of the first.
            flex, flex_id = m.responses(acme, "Who invoices agent traffic? Search the web.", reasoning=True,
                                        mock={"input_tokens": 200, "cached_tokens": 16, "web_search_requests": 2,
                                              "service_tier": "flex"},
                                        label="responses: flex, cached, reasoning, web search")  # fmt: skip
            ck.eq("Feb 08: the Responses call reports its tier, cache reads, reasoning and searches",
                  (flex.tier, flex.cached, flex.reasoning > 0, flex.web_search), ("flex", 16, True, 2))  # fmt: skip
            m.responses(acme, "Stream me a short story about a ledger", stream=True, mock={"cached_tokens": 8},
                        label="responses: stream")  # fmt: skip
            m.retrieve(acme, flex_id, flex)
            # Messages (claude-sonnet-4.5): a system prompt written to the prompt cache at two breakpoints (1 h and
            # 5 m), then read back by a stream; two web searches (a prompt over the baseline's long-context
            # threshold, not the price's); a prompt over the price's long-context threshold.
            system = [{"type": "text", "text": "You are acme's terse billing assistant. " * 12,
                       "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                      {"type": "text", "text": "Answer in one line. " * 12, "cache_control": {"type": "ephemeral"}}]  # fmt: skip
            wrote = m.messages(acme, "What does a cache write cost?", system=system, label="messages: cache writes")
            read = m.messages(acme, "And a cache read?", system=system, stream=True, label="messages: cache read")
            ck.true("Feb 08: the first Messages call writes the cache at both TTLs, the stream reads all of it",
                    wrote.cache_write > 0 and wrote.cache_write_1h > 0 and wrote.cached == 0
                    and read.cached == wrote.cache_write + wrote.cache_write_1h, (wrote, read))  # fmt: skip
            web = m.messages(acme, "Search the web twice", mock={"web_search_requests": 2, "input_tokens": 500},
                             label="messages: web search")  # fmt: skip
            long = m.messages(acme, "A very long prompt", mock={"input_tokens": 900}, label="messages: long context")
            ck.eq("Feb 08: web searches as the SDK saw them; the long prompt is over the long-context threshold",
                  (web.web_search, long.prompt), (2, 900))  # fmt: skip

            # A proxy whose clock runs three months ahead sends one event: dead-lettered, no quota roll-over.
            skewed_at = m.clock.now() + timedelta(days=89)
            future = crafted_event(acme.team_id, acme.key_id, skewed_at, "gpt-4.1", 40, 20, "skewed-proxy", 1)
            m.send_events([future])
            m.wait_billed(acme, FEB)
            deadline = time.monotonic() + 15
            while True:
                dead = [d for d in dead_letters(m.bootstrap, DLQ_TOPIC) if future["event_id"].encode() in d["value"]]
                if dead or time.monotonic() > deadline:
                    break
            ck.eq("future-dated event (+89 days) is dead-lettered, with a reason", [bool(d.get("reason")) for d in dead],
                  [True])  # fmt: skip
            ck.eq("the future-dated event never rolls the quota month", m.get("/v1/quota", team=acme.team_id)["period"],
                  FEB)  # fmt: skip
            if dead:
                # The operator's fix (docs/metering.md): correct the cause, re-feed the dead letter's bytes.
                fixed, fixed_at = orjson.loads(dead[0]["value"]), m.clock.now()
                fixed["occurred_at"] = fixed_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                m.send_events([fixed])
                m.ledger.calls.append(Call(acme.team_id, fixed_at, "gpt-4.1", 40, 20, label="re-fed dead letter"))
            m.check_usage(acme, FEB, m.wait_billed(acme, FEB))
            m.check_quota(acme, FEB)
        feb_at_old_prices = m.ledger.of(acme.team_id, FEB)
        old_catalog = m.catalog()

        # Between runs: an in-place edit of a price already in force must stop start-up, saying what to do.
        pristine = m.config.read_text()

        # (the second edit touches only an agent dimension: a 1-hour cache write price that has priced usage)
        def edit_in_place(raw: dict[str, Any]) -> None:
            raw["models"]["gpt-4.1"]["prices"][0].update(input="2470")
            raw["models"][CLAUDE]["prices"][0].update(cache_write_1h="6010")

        edit_config(m.config, edit_in_place)
        refused, out = m.start_refused(t(2, 16, 11))
        ck.true("an in-place edit of an in-force price stops start-up", refused, out[-900:])
        ck.true("... with a message naming both edited prices, a new price entry and `tollway rerate`",
                refused and "rerate" in out and "gpt-4.1 " in out and CLAUDE in out, out[-900:])  # fmt: skip
        m.config.write_text(pristine)

        # The right way: a new entry (a discount effective Feb 1, retroactive), then `tollway rerate`, twice.
        edit_config(m.config, lambda raw: raw["models"]["gpt-4.1"]["prices"].append(
            {"effective_from": "2027-02-01", "input": "1975", "output": "6419", "cached_input": "494", "web_search": "8000",
             "service_tiers": {"flex": {"input": "987.5", "output": "3209.5", "cached_input": "247"}}}))  # fmt: skip
        new_catalog = m.catalog()
        first = m.tollway("rerate", "--period", FEB, at=t(2, 16, 11))
        assert first.returncode == 0, first.stderr[-2000:]
        r1 = printed_json(first.stdout)
        changed = [c for c in feb_at_old_prices if c.billable and c.model == "gpt-4.1" and c.has_tokens]
        ck.eq("rerate Feb: events adjusted", r1["adjusted"], len(changed))
        ck.eq("rerate Feb: delta_total_usd (exact)", D(r1["delta_total_usd"]),
              Ledger.exact(changed, new_catalog) - Ledger.exact(changed, old_catalog))  # fmt: skip
        second = m.tollway("rerate", "--period", FEB, at=t(2, 16, 11))
        assert second.returncode == 0, second.stderr[-2000:]
        ck.eq("rerate is idempotent: the second run adjusts nothing", printed_json(second.stdout)["adjusted"], 0)

        # Feb 16: beta is created mid-month; acme moves to `starter` mid-month.
        with m.running(t(2, 16, 12)):
            beta = m.create_team("beta")
            gamma = m.create_team("gamma", plan="enterprise")  # no fee: a later credit nets the next document negative
            m.chat(gamma, "gpt-4.1-mini", "Gamma's first question of the month")
            for i in range(2):
                m.chat(beta, "gpt-4.1-mini", f"Beta's question {i}: where is the invoice?")
            for i in range(2):
                m.chat(acme, "gpt-4.1", f"Mid-month question {i} at the new price", cached=3 if i else 0)
            agent_calls(m, acme, "Feb 16")
            m.change_plan(acme, "starter")
            m.check_usage(acme, FEB, m.wait_billed(acme, FEB))
            m.check_usage(beta, FEB, m.wait_billed(beta, FEB))

        # Between runs: claude-sonnet-4.5 changes price from Feb 20 (a new entry, every dimension moves): its Feb 16
        # calls keep the old unit prices, Feb 25's take the new ones, so February's lines split by unit price.
        edit_config(m.config, lambda raw: raw["models"][CLAUDE]["prices"].append(
            {"effective_from": "2027-02-20", "input": "2504", "output": "12520", "cached_input": "250.4",
             "cache_write": "3130", "cache_write_1h": "5008", "request": "0.075", "web_search": "9000",
             "long_context": {"above_prompt_tokens": 600, "input": "5008", "output": "18780"}}))  # fmt: skip

        # Feb 25: the month's last calls; month-to-date quota must be the ledger.
        with m.running(t(2, 25, 8)):
            # The same shape as Feb 16's traffic (as many calls per team, the last one acme's before the restart):
            # a fresh broker hands out the same offsets.
            for i in range(2):
                m.chat(acme, "gpt-4.1", f"Late-month question number {i}")
            agent_calls(m, acme, "Feb 25")
            m.chat(beta, "gpt-4.1", "Beta tries the big model once")
            m.chat(beta, "gpt-4.1-mini", "And the small one again")
            m.chat(gamma, "gpt-4.1-mini", " ".join(f"word{i % 17}" for i in range(400)))
            for team in (acme, beta, gamma):
                m.check_usage(team, FEB, m.wait_billed(team, FEB))
                m.check_quota(team, FEB)

        # Mar 10: close January and February, in order; then late February events arrive.
        with m.running(t(3, 10, 12)):
            m.wait_key(acme)
            for i in range(2):
                m.chat(acme, "gpt-4.1-mini", f"March question {i}")
            m.wait_billed(acme, MAR)
            r = m.finalize(acme, FEB)
            ck.eq("finalizing February before January is refused", (r.status_code, error_code(r)),
                  (409, "period_out_of_order"))  # fmt: skip
            r = m.finalize(acme, MAR)
            ck.eq("finalizing the open month (March) is refused", (r.status_code, error_code(r)), (409, "period_open"))
            for period in (JAN, FEB):
                r = m.finalize(acme, period)
                ck.eq(f"finalize acme {period}", r.status_code, 200)
            for team in (beta, gamma):
                r = m.finalize(team, FEB)
                ck.eq(f"finalize {team.name} 2027-02 (its first month)", r.status_code, 200)

            m.check_invoice(m.invoice(acme, JAN), acme, JAN, "finalized")
            for team in (acme, beta, gamma):
                m.check_invoice(m.invoice(team, FEB), team, FEB, "finalized")
                m.check_usage(team, FEB)
                m.check_roi(team, FEB)
            m.check_reconcile(JAN, [acme])
            m.check_reconcile(FEB, [acme, beta, gamma])
            numbers = [
                m.invoice(team, p)["number"] for team, p in ((acme, JAN), (acme, FEB), (beta, FEB), (gamma, FEB))
            ]
            ck.eq("invoice numbers are unique", len(set(numbers)), 4)
            # The month exercised what it is about: every dimension billed, each set of rates used, claude's lines
            # split by the Feb 20 price (else the agreement above would prove less than it says).
            acme_feb = m.ledger.of(acme.team_id, FEB)
            ck.eq("acme's February bills every dimension", {k[2] for k in Ledger.items(acme_feb, m.catalog())},
                  set(DIMENSIONS))  # fmt: skip
            ck.eq("acme's February is priced at base, flex and long-context rates",
                  {c.unit(m.catalog()).tier for c in acme_feb if c.has_tokens}, {"", "flex", "long_context"})  # fmt: skip
            ck.eq("claude's February lines are at two price entries",
                  {k[1] for k in Ledger.items(acme_feb, m.catalog()) if k[0] == CLAUDE},
                  {date(2025, 9, 29), date(2027, 2, 20)})  # fmt: skip
            feb_invoice = m.invoice(acme, FEB)
            billed_feb = Ledger.lines(m.ledger.of(acme.team_id, FEB), m.catalog())

            # Late events: a proxy's spool that could reach no broker until now delivers two February calls.
            late_at = t(2, 27, 15)
            late = [crafted_event(acme.team_id, acme.key_id, late_at + timedelta(minutes=i), "gpt-4.1", 300 + i, 90,
                                  "late-proxy", i + 1) for i in range(2)]  # fmt: skip
            m.send_events(late)
            m.ledger.calls += [Call(acme.team_id, late_at + timedelta(minutes=i), "gpt-4.1", 300 + i, 90, label="late")
                               for i in range(2)]  # fmt: skip
            m.check_usage(acme, FEB, m.wait_billed(acme, FEB))
            m.check_roi(acme, FEB)
            m.check_reconcile(FEB, [acme], "adjustment_pending", billed_feb)
            m.check_reconcile(FEB, [beta, gamma])
            m.check_quota(acme, MAR)
            known_feb = [c for c in m.ledger.of(acme.team_id, FEB) if c.label != "late"]
            late_lines = adjustments(FEB, billed_feb, known_feb, m.ledger.of(acme.team_id, FEB), m.catalog())
            ck.true("the late events change February's billable items", bool(late_lines))
            m.check_invoice(m.invoice(acme, MAR), acme, MAR, "draft", late_lines)
            ck.eq("February's finalized invoice is unchanged by the late events", m.invoice(acme, FEB), feb_invoice)

        # Between runs: gpt-4.1-mini gets cheaper from Feb 20, after February was invoiced: re-rate both months.
        billed_beta_feb = Ledger.lines(m.ledger.of(beta.team_id, FEB), m.catalog())
        billed_gamma_feb = Ledger.lines(m.ledger.of(gamma.team_id, FEB), m.catalog())
        edit_config(m.config, lambda raw: raw["models"]["gpt-4.1-mini"]["prices"].append(
            {"effective_from": "2027-02-20", "input": "330", "output": "1320", "cached_input": "82"}))  # fmt: skip
        for period in (FEB, MAR):
            out = m.tollway("rerate", "--period", period, at=t(4, 5, 11))
            assert out.returncode == 0, out.stderr[-2000:]
        beta_feb = m.ledger.of(beta.team_id, FEB)
        rerated = adjustments(FEB, billed_beta_feb, beta_feb, beta_feb, m.catalog())
        ck.true("the price change moves beta's February mini call to the new unit price", bool(rerated))
        gamma_feb = m.ledger.of(gamma.team_id, FEB)
        credited = adjustments(FEB, billed_gamma_feb, gamma_feb, gamma_feb, m.catalog())
        credit = -sum((a for *_, a, _ in credited), Decimal(0))
        ck.true("gamma's February is now worth less than it was invoiced", credit > 0, credited)

        # Apr 05: March is closed, carrying February's late usage (acme) and re-rating (beta); February's
        # reconciliation now counts the adjustments carried to March.
        with m.running(t(4, 5, 12)):
            for team in (acme, beta, gamma):
                r = m.finalize(team, MAR)
                ck.eq(f"finalize {team.name} 2027-03", r.status_code, 200)
            m.check_invoice(m.invoice(acme, MAR), acme, MAR, "finalized", late_lines)
            m.check_invoice(m.invoice(beta, MAR), beta, MAR, "finalized", rerated)
            # gamma's March holds nothing but the credit: a numbered credit note naming the invoice it credits.
            note, feb_gamma = m.invoice(gamma, MAR), m.invoice(gamma, FEB)
            m.check_invoice(note, gamma, MAR, "finalized", credited)
            ck.eq(
                "gamma 2027-03 is a credit note",
                (note.get("kind"), str(note.get("number"))[:3]),
                ("credit_note", "CN-"),
            )
            ck.eq("gamma's credit note: credit_usd", dec(note.get("credit_usd")), credit)
            ck.eq("gamma's credit note credits February's invoice",
                  [(c["invoice_id"], c["invoice_number"], c["period"], D(c["amount_usd"])) for c in note.get("credits") or []],
                  [(feb_gamma["invoice_id"], feb_gamma["number"], FEB, -credit)])  # fmt: skip
            for team in (acme, beta, gamma):
                m.check_usage(team, FEB)
                m.check_roi(team, FEB)
            m.check_usage(acme, MAR)
            m.check_reconcile(FEB, [acme, beta, gamma])
            m.check_reconcile(MAR, [acme])
            cli = m.tollway("reconcile", "--period", FEB)
            ck.eq("`tollway reconcile --period 2027-02` exits 0 (ok)", cli.returncode, 0)
    finally:
        if m.stack is not None and m.stack.proc.poll() is None:
            m.stack.proc.kill()
            m.stack.proc.wait()
        m.reap_broker()
    print(f"\nmonth in the life: {ck.passed} checks agreed, {len(ck.failures)} disagreed")
    assert not ck.failures, "\n".join(["surfaces disagree with the recomputed ledger:", *ck.failures])
