"""New price entries go into a hand-written tollway.yaml as lines: comments and layout survive, the file still
loads, and an edit that would change anything else is refused."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from schemas.config import ConfigError, Price, parse_config
from tollway.price_book_file import BookEditError, add_prices

REPO_YAML = Path(__file__).resolve().parents[2] / "tollway.yaml"


def _new(day: str, inp: str, out: str, cached: str | None = None) -> Price:
    return Price(effective_from=date.fromisoformat(day), input=Decimal(inp), output=Decimal(out),
                 cached_input=None if cached is None else Decimal(cached))  # fmt: skip


def _only_added(old: str, new: str) -> list[str]:
    """The lines of `new` that are not `old`'s, checking every old line is kept, in order."""
    old_lines, added = old.splitlines(), []
    it = iter(old_lines)
    want = next(it, None)
    for line in new.splitlines():
        if line == want:
            want = next(it, None)
        else:
            added.append(line)
    assert want is None, f"an original line was lost: {want!r}"
    return added


def test_entries_land_under_the_models_prices_and_every_comment_survives():
    text = REPO_YAML.read_text()
    new = add_prices(text, {"gpt-4.1": [_new("2026-12-10", "1.75", "7.00", "0.4375")],
                            "text-embedding-3-small": [_new("2027-01-01", "0.015", "0")]})  # fmt: skip
    added = _only_added(text, new)
    assert added == ['      - {effective_from: 2026-12-10, input: "1.75", output: "7", cached_input: "0.4375"}',
                     '      - {effective_from: 2027-01-01, input: "0.015", output: "0"}']  # fmt: skip
    comments = [line for line in text.splitlines() if "#" in line]
    assert comments and all(c in new.splitlines() for c in comments)
    cfg = parse_config(yaml.safe_load(new))
    gpt = cfg.models["gpt-4.1"].prices
    before = [p.effective_from for p in parse_config(yaml.safe_load(text)).models["gpt-4.1"].prices]
    assert [p.effective_from for p in gpt] == [*before, date(2026, 12, 10)]  # after the last (multi-line) entry
    assert gpt[-1].cached_input == Decimal("0.4375")  # a string in the file: exact, never a YAML float
    assert cfg.models["gpt-4.1-mini"] == parse_config(yaml.safe_load(text)).models["gpt-4.1-mini"]


BLOCKS = {
    "indented list with a comment after it": (
        "models:\n  m:\n    routes:\n      - provider: p\n    prices:\n      - effective_from: 2025-01-01\n"
        "        input: '1'   # list price\n    # the next key\n    cache_ttl_s: 0\n"
    ),
    "list at the key's own indentation": (
        "models:\n  m:\n    routes:\n    - provider: p\n    prices:\n    - {effective_from: 2025-01-01, input: '1'}\n"
        "    cache_ttl_s: 0\n"
    ),
    "empty flow list": "models:\n  m:\n    routes: [{provider: p}]\n    prices: []   # none yet\n",
    "no prices key, model last in the file without a final newline": "models:\n  m:\n    routes: [{provider: p}]",
    "quoted model name": "models:\n  'm':\n    routes: [{provider: p}]\n    prices:\n      - {input: '1'}\n",
}


@pytest.mark.parametrize("name", BLOCKS)
def test_every_list_layout_gets_the_entry_and_nothing_else(name):
    text = "providers:\n  p: {base_url: 'http://x'}\n" + BLOCKS[name]
    before = yaml.safe_load(text)
    new = add_prices(text, {"m": [_new("2026-12-02", "2", "3")]})
    after = yaml.safe_load(new)
    want = [
        *(before["models"]["m"].get("prices") or []),
        {"effective_from": date(2026, 12, 2), "input": "2", "output": "3"},
    ]
    assert after["models"]["m"]["prices"] == want
    assert {k: v for k, v in after["models"]["m"].items() if k != "prices"} == {
        k: v for k, v in before["models"]["m"].items() if k != "prices"
    }
    for line in text.splitlines():
        if "#" in line:
            assert line.split("#", 1)[1] in new


def test_a_one_line_flow_list_with_items_is_refused_not_rewritten():
    text = "providers:\n  p: {base_url: 'http://x'}\nmodels:\n  m:\n    routes: [{provider: p}]\n    prices: [{input: '1'}]\n"
    with pytest.raises(BookEditError, match="flow list"):
        add_prices(text, {"m": [_new("2026-12-02", "2", "3")]})


def test_a_model_in_flow_style_is_refused():
    text = "providers:\n  p: {base_url: 'http://x'}\nmodels:\n  m: {routes: [{provider: p}]}\n"
    with pytest.raises(BookEditError):
        add_prices(text, {"m": [_new("2026-12-02", "2", "3")]})


def test_an_entry_on_a_date_the_book_already_has_fails_the_config_check():
    text = REPO_YAML.read_text()
    with pytest.raises(ConfigError, match="share one effective_from"):
        add_prices(text, {"gpt-4.1": [_new("2025-04-14", "9", "9")]})
