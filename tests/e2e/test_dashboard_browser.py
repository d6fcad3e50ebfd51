"""The built-in dashboard in a real headless Chromium against `tollway up --demo`: it renders, shows calls
made through the proxy moments ago, scopes a team key to its team, and logs no console errors.

Needs Debian's `chromium` and the `playwright` package (its driver only; the system browser is used).
A screenshot is kept in tests/artifacts/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.e2e.conftest import Stack

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's probe runs it: no sandbox as root, and no background calls to the (closed) internet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def _require_browser() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        async_playwright = None
    missing = [what for what, ok in (("chromium", CHROMIUM), ("playwright", async_playwright)) if not ok]
    if missing:
        message = f"dashboard browser test needs {' and '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return async_playwright


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Any]:
    async_playwright = _require_browser()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1440, "height": 1300})
        pg = await context.new_page()
        pg.problems = []  # console errors and uncaught exceptions, checked at the end of each test
        pg.on("console", lambda m: pg.problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        pg.on("pageerror", lambda e: pg.problems.append(f"pageerror: {e}"))
        try:
            yield pg
        finally:
            await browser.close()


def call(stack: Stack, key: str, n: int, model: str = "gpt-4.1") -> None:
    client = OpenAI(base_url=stack.proxy_url, api_key=key, max_retries=0)
    for i in range(n):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"dashboard call {i}"}])


async def sign_in(page: Any, url: str, token: str) -> None:
    await page.goto(url)
    await page.fill("#token", token)
    await page.click("#login-form button[type=submit]")
    try:
        await page.wait_for_selector("body[data-loaded]", timeout=15_000)
    except Exception:
        raise AssertionError(f"dashboard did not load: {await page.text_content('#error')!r} {page.problems}") from None


async def wait_for_text(page: Any, selector: str, wanted: str, timeout_s: float = 30) -> None:
    """Click Refresh until `selector` reads `wanted` (rollups follow the meter within seconds)."""
    deadline = timeout_s * 1000
    waited = 0
    while (await page.text_content(selector)) != wanted:
        if waited > deadline:
            raise AssertionError(f"{selector} is {await page.text_content(selector)!r}, wanted {wanted!r}")
        before = await page.get_attribute("body", "data-loaded")
        await page.click("#refresh")
        # Polled from here: the page's CSP forbids the string evaluation wait_for_function would use.
        while await page.get_attribute("body", "data-loaded") == before and waited <= deadline:
            await page.wait_for_timeout(100)
            waited += 100
        await page.wait_for_timeout(400)
        waited += 400


async def test_dashboard_renders_fresh_usage_without_console_errors(stack: Stack, page: Any) -> None:
    team_key = stack.cli("keys", "create", "--team", "browser-team")["key"]
    other_key = stack.cli("keys", "create", "--team", "other-team")["key"]
    call(stack, team_key, 3)
    call(stack, team_key, 2, model="gpt-4.1-mini")
    call(stack, other_key, 1)
    url = stack.billing_url + "/dashboard"

    # Staff view: every team, charts drawn, numbers that include the calls just made.
    await sign_in(page, url, stack.admin_token)
    await page.select_option("#range", "24h")
    await wait_for_text(page, "#kpi-requests", "6")
    assert (await page.text_content("#scope")) == "signed in as admin"
    assert (await page.text_content("#kpi-spend")).startswith("$")
    teams = await page.eval_on_selector_all("#team option", "os => os.map(o => o.textContent)")
    assert {"browser-team", "other-team"} <= set(teams)
    for chart in ("chart-spend", "chart-traffic", "chart-teams", "chart-models"):
        drawn = await page.evaluate(f"() => !!Chart.getChart(document.getElementById('{chart}'))")
        assert drawn, f"{chart} was not drawn"
    assert await page.locator("#keys tbody tr").count() >= 2
    assert await page.evaluate("() => sessionStorage.length") == 1  # the token lives in this tab only
    assert "token" not in page.url and stack.admin_token not in page.url
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # More calls through the proxy show up after a refresh.
    call(stack, team_key, 2)
    await wait_for_text(page, "#kpi-requests", "8")

    # A team key sees its own team only, with its quota and ROI.
    await page.click("#signout")
    await sign_in(page, url, team_key)
    await wait_for_text(page, "#kpi-requests", "7")
    assert (await page.text_content("#scope")) == "team browser-team"
    assert await page.locator("#team").is_hidden()
    for section, selector in (("#quota", "#quota .gauge"), ("#roi", "#roi .roi")):
        try:
            await page.wait_for_selector(selector, timeout=10_000)
        except Exception:
            raise AssertionError(f"{section}: {await page.text_content(section)!r} {page.problems}") from None
    assert await page.locator("#quota .gauge").count() >= 2
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-team.png"), full_page=True)

    assert page.problems == []
