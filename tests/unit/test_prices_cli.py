"""`tollway prices import|check` on the real catalogs: the bundled genai-prices data and a LiteLLM
`model_prices_and_context_window.json` excerpt (tests/data/litellm_model_prices.json; its gemini-2.5-flash
input is 0.33, a price change against tollway.yaml and a decimal no binary float holds)."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price

from schemas.config import load_config
from schemas.price_catalog import book_at
from tollway.cli import main

REPO = Path(__file__).resolve().parents[2]
LITELLM = REPO / "tests" / "data" / "litellm_model_prices.json"
TODAY = date(2026, 12, 2)


def prices(argv: list[str], capsys, today: date = TODAY) -> tuple[int, str, str]:
    from tollway import cli, prices_cli

    args = cli.build_parser().parse_args(["prices", *argv])
    rc = prices_cli.run(args, today=today)
    out = capsys.readouterr()
    return rc, out.out, out.err


def without_claude_prices(text: str) -> str:
    """The repo's tollway.yaml with claude-sonnet-4.5's whole `prices:` list (every entry) taken out."""
    out = re.sub(r"(        model: claude-sonnet-4-5\n)    prices:\n(?:      .*\n)+", r"\1    # priced by the catalog\n",
                 text, count=1)  # fmt: skip
    assert out != text
    return out


@pytest.fixture
def book(tmp_path: Path) -> Path:
    """The repo's tollway.yaml with gpt-4.1 at an old price, claude-sonnet-4.5 unpriced and a model the
    catalogs cannot name."""
    text = (REPO / "tollway.yaml").read_text()
    text = text.replace('input: "2.00", output: "8.00", cached_input: "0.50"}', 'input: "2.50", output: "10.00"}', 1)
    # and the entry in force today (gpt-4.1's, the first block entry) at that old price too
    text = text.replace(
        '        input: "2.00"\n        output: "8.00"\n', '        input: "2.50"\n        output: "10.00"\n', 1
    )
    text = without_claude_prices(text)
    text = text.replace(
        "  text-embedding-3-small:",
        "  house-model:   # our own deployment name\n    routes:\n      - provider: openai\n        model: ft-house-7\n"
        "  text-embedding-3-small:",
    )
    p = tmp_path / "tollway.yaml"
    p.write_text(text)
    cfg = load_config(p)
    assert cfg.models["claude-sonnet-4.5"].prices == [] and cfg.models["gpt-4.1"].prices[0].input == Decimal("2.50")
    return p


def per_million(model: str, provider: str, **usage: int) -> Decimal:
    """What genai-prices itself charges per 1M tokens of one kind (its public API, not our reading of its
    data), from 100k tokens: a million would cross the 200k-token tier of the long-context models."""
    tenth = {k: v // 10 for k, v in usage.items()}
    return calc_price(Usage(**tenth), model, provider_id=provider).total_price * 10


def test_check_names_the_stale_and_the_missing_and_exits_1(book, capsys):
    rc, out, err = prices(["check", "--config", str(book)], capsys)
    assert rc == 1
    assert "gpt-4.1 stale" in err and "claude-sonnet-4.5 missing" in err and "house-model missing" in err
    assert "gpt-4.1-mini" not in err
    assert "unchecked deepseek-v3.2: time-of-day prices" in out  # genai-prices has off-peak hours for it


def test_import_from_genai_prices_adds_the_catalog_price_as_a_new_entry_and_is_idempotent(book, capsys):
    before = book.read_text()
    rc, out, err = prices(["import", "--config", str(book), "--effective-from", "2026-12-02"], capsys)
    assert rc == 0, err
    cfg = load_config(book)
    gpt = book_at(cfg.models["gpt-4.1"].prices, TODAY)
    assert gpt.effective_from == TODAY
    assert (gpt.input, gpt.output, gpt.cached_input) == (
        per_million("gpt-4.1", "openai", input_tokens=1_000_000),
        per_million("gpt-4.1", "openai", output_tokens=1_000_000),
        per_million("gpt-4.1", "openai", input_tokens=1_000_000, cache_read_tokens=1_000_000),
    )
    assert cfg.models["gpt-4.1"].prices[0].input == Decimal("2.50")  # the old entry is kept as it was
    claude = cfg.models["claude-sonnet-4.5"].prices
    assert [p.effective_from for p in claude] == [TODAY]
    assert claude[0].input == per_million("claude-sonnet-4-5", "anthropic", input_tokens=1_000_000)
    # every dimension genai-prices has for it, as its own calculator charges them
    c = claude[0]
    assert (c.cache_write, c.cache_write_1h, c.web_search) == (
        per_million("claude-sonnet-4-5", "anthropic", input_tokens=1_000_000, cache_write_tokens=1_000_000),
        Decimal(6), Decimal(10))  # fmt: skip
    lc = c.long_context
    assert lc is not None and lc.above_prompt_tokens == 200_000
    big = 300_000  # prompts above the 200K threshold: genai-prices' calculator at its tier rates

    def long(**usage: int) -> Decimal:
        return calc_price(Usage(input_tokens=big, **usage), "claude-sonnet-4-5", provider_id="anthropic").total_price

    assert (lc.input, lc.output, lc.cached_input, lc.cache_write) == (
        long() / big * 10**6, (long(output_tokens=big) - long()) / big * 10**6,
        long(cache_read_tokens=big) / big * 10**6, long(cache_write_tokens=big) / big * 10**6)  # fmt: skip
    gpt_tiers = {n: (r.input, r.output, r.cached_input) for n, r in gpt.service_tiers.items()}
    assert gpt_tiers["priority"] == (Decimal("3.5"), Decimal(14), Decimal("0.875")) and gpt.web_search == 10
    assert "storage_searches_kcount" in out and "processing=batch" in out  # what the book cannot hold is reported
    assert "# priced by the catalog" in book.read_text() and "# our own deployment name" in book.read_text()
    assert "+      - {effective_from: 2026-12-02" in out  # the diff is shown
    assert before != book.read_text()

    again = book.read_text()
    rc, out, _ = prices(["import", "--config", str(book), "--effective-from", "2026-12-02"], capsys)
    assert (rc, book.read_text()) == (0, again)
    assert "nothing to add" in out
    rc, out, _ = prices(["import", "--config", str(book)], capsys, today=date(2026, 12, 20))  # a later day: same
    assert (rc, book.read_text()) == (0, again)
    rc, out, err = prices(["check", "--config", str(book)], capsys)
    assert rc == 1 and err.strip().endswith("house-model missing")


def test_a_past_date_is_refused_for_a_model_with_a_price_in_force_and_nothing_is_written(book, capsys):
    before = book.read_text()
    rc, out, err = prices(["import", "--config", str(book), "--effective-from", "2026-11-01"], capsys)
    assert rc == 1
    assert "! gpt-4.1 <- openai/gpt-4.1: REFUSED" in out
    assert "date >= 2026-12-02" in out and "tollway rerate" in out
    assert "claude-sonnet-4.5" not in err  # unpriced before: a past date prices its held usage, allowed
    assert book.read_text() == before


def test_a_past_date_is_allowed_where_no_price_was_in_force(tmp_path, capsys):
    cfg = tmp_path / "tollway.yaml"
    cfg.write_text(without_claude_prices((REPO / "tollway.yaml").read_text()))
    rc, out, err = prices(["import", "--config", str(cfg), "--effective-from", "2026-11-01"], capsys)
    assert rc == 0, err
    claude = load_config(cfg).models["claude-sonnet-4.5"].prices
    assert [(p.effective_from, p.input, p.output, p.cached_input) for p in claude] == [
        (date(2026, 11, 1), Decimal(3), Decimal(15), Decimal("0.3"))
    ]
    assert "gpt-4.1 <- openai/gpt-4.1: up to date" in out  # the book's 2025 price is the catalog's on that date


def test_dry_run_shows_the_diff_and_writes_nothing(book, capsys):
    before = book.read_text()
    rc, out, _ = prices(["import", "--config", str(book), "--dry-run"], capsys)
    assert rc == 0 and "dry run: 2 new price entries" in out and "+++ " in out
    assert book.read_text() == before


def test_map_prices_a_model_the_catalog_cannot_name(book, capsys):
    rc, _, _ = prices(["import", "--config", str(book), "--map", "house-model=openai/gpt-4.1-mini"], capsys)
    assert rc == 0
    house = load_config(book).models["house-model"].prices
    # unpriced before: dated from the catalog's own start (2026-10-12, when gpt-4.1-mini's priority tier began)
    assert [(p.effective_from, p.input) for p in house] == [
        (date(2026, 10, 12), per_million("gpt-4.1-mini", "openai", input_tokens=1_000_000))
    ]
    rc, _, err = prices(["import", "--config", str(book), "--map", "nope=openai/gpt-4.1"], capsys)
    assert rc == 2 and "not configured: nope" in err
    rc, _, err = prices(["check", "--config", str(book), "--map", "house-model=openai/no-such-model-x"], capsys)
    assert rc == 2 and "has no such model" in err


def test_a_scheduled_catalog_change_is_imported_at_the_catalogs_own_start_date(tmp_path, capsys):
    # genai-prices 0.2.3: arcee's deepseek/deepseek-v4.1-flash output goes from 0.66 to 1.2 on 2026-11-01
    cfg = tmp_path / "tollway.yaml"
    cfg.write_text(
        "providers:\n  arcee: {base_url: 'https://api.arcee.ai/v1'}\nmodels:\n  flash:\n    routes:\n"
        "      - {provider: arcee, model: deepseek/deepseek-v4.1-flash}\n"
    )
    rc, out, err = prices(["import", "--config", str(cfg)], capsys, today=date(2026, 10, 20))
    assert rc == 0, err
    got = [(p.effective_from, p.output) for p in load_config(cfg).models["flash"].prices]
    assert got == [(date(2026, 10, 20), Decimal("0.66")), (date(2026, 11, 1), Decimal("1.2"))]
    rc, _, _ = prices(["check", "--config", str(cfg)], capsys, today=date(2026, 10, 20))
    assert rc == 0
    # a book that has only today's price is stale against the scheduled change
    text = cfg.read_text().splitlines(keepends=True)
    cfg.write_text("".join(line for line in text if "2026-11-01" not in line))
    rc, out, err = prices(["check", "--config", str(cfg)], capsys, today=date(2026, 10, 20))
    assert rc == 1 and "flash stale" in err and "from 2026-11-01" in out


def test_import_from_a_litellm_file_keeps_exact_decimals_and_is_idempotent(book, capsys):
    rc, out, err = prices(["import", "--config", str(book), "--from", "litellm", str(LITELLM)], capsys)
    assert rc == 0, err
    cfg = load_config(book)
    gem = cfg.models["gemini-2.5-flash"].prices[-1]
    # per token 3.3e-07 x 1M: exactly 0.33 (a float reading gives 0.32999999999999996)
    assert (gem.effective_from, gem.input, gem.output, gem.cached_input) == (
        TODAY, Decimal("0.33"), Decimal("2.5"), Decimal("0.03"))  # fmt: skip
    assert "gemini-2.5-flash <- gemini/gemini-2.5-flash" in out  # Gemini's API, not Vertex AI's entry
    gpt = book_at(cfg.models["gpt-4.1"].prices, TODAY)
    assert (gpt.input, gpt.output, gpt.cached_input) == (Decimal(2), Decimal(8), Decimal("0.5"))
    assert "input_cost_per_token_batches" in out and "cache_creation_input_token_cost" not in out
    claude = book_at(cfg.models["claude-sonnet-4.5"].prices, TODAY)  # cache writes, long context, web search
    assert (claude.cache_write, claude.web_search, claude.long_context.above_prompt_tokens) == (
        Decimal("3.75"), Decimal(10), 200_000)  # fmt: skip
    assert (claude.long_context.input, claude.long_context.output, claude.long_context.cache_write) == (
        Decimal(6), Decimal("22.5"), Decimal("7.5"))  # fmt: skip
    assert {n: r.input for n, r in gpt.service_tiers.items()} == {"priority": Decimal("3.5")}
    assert "deepseek-v3.2 <- deepseek/deepseek-chat: up to date" in out
    assert "house-model: not in the catalog" in out
    after = book.read_text()
    rc, out, _ = prices(["import", "--config", str(book), "--from", "litellm", str(LITELLM)], capsys)
    assert (rc, book.read_text()) == (0, after) and "nothing to add" in out


def test_bad_catalog_and_bad_options_exit_2_with_a_message(book, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert prices(["check", "--config", str(book), "--from", "litellm", str(bad)], capsys)[:1] == (2,)
    assert prices(["check", "--config", str(book), "--from", "litellm", str(tmp_path / "none.json")], capsys)[0] == 2
    rc, _, err = prices(["check", "--config", str(book), "--from", "openrouter"], capsys)
    assert rc == 2 and "--from takes" in err
    bad.write_text('{"m": {"input_cost_per_token": "cheap", "litellm_provider": "openai"}}')
    rc, out, _ = prices(["import", "--config", str(book), "--from", "litellm", str(bad), "--map", "gpt-4.1=m"], capsys)
    assert rc == 0 and "input_cost_per_token is not a number" in out


def test_the_prices_command_is_on_the_tollway_cli(book, capsys, monkeypatch):
    monkeypatch.setenv("TOLLWAY_CONFIG", str(book))
    assert main(["prices", "import", "--dry-run"]) == 0
    assert "prices from genai-prices 0.2.3" in capsys.readouterr().out
