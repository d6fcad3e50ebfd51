"""What `tollway prices import` writes is what a start accepts: a new, dated entry beside a price in force that
priced usage (real ClickHouse engine, real genai-prices data), and the stored row keeps its price."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from schemas.config import load_config
from schemas.price_versions import check_and_record
from schemas.prices import PriceBook
from tollway import cli, prices_cli

BOOK = """# hand-written: keep this comment
providers:
  openai: {base_url: "https://api.openai.com/v1"}
models:
  gpt-4.1:
    routes:
      - provider: openai
    prices:
      - {effective_from: 2025-04-14, input: "2.50", output: "10.00"}   # an old list price
"""


async def test_an_imported_price_is_accepted_at_start_and_leaves_billed_usage_alone(store, tmp_path, capsys):
    path = tmp_path / "tollway.yaml"
    path.write_text(BOOK)
    old = load_config(path)
    assert await check_and_record(store, old, "meter") == 1
    when = datetime(2025, 5, 1, tzinfo=UTC)
    old_version = PriceBook(old).at("gpt-4.1", "openai", when).version
    await store.insert_rows("usage_events", [[str(uuid.uuid4()), when, "team", "gpt-4.1", True, old_version]],
                            ["event_id", "occurred_at", "team_id", "served_model", "priced", "price_version"])  # fmt: skip

    today = datetime.now(UTC).date()
    assert prices_cli.run(cli.build_parser().parse_args(["prices", "import", "--config", str(path)])) == 0
    assert "keep this comment" in path.read_text() and "an old list price" in path.read_text()
    new = load_config(path)
    assert await check_and_record(store, new, "meter") == 1  # the new entry, recorded; no in-place edit found
    book = PriceBook(new)
    assert book.at("gpt-4.1", "openai", when).version == old_version  # billed usage keeps its price
    now = book.at("gpt-4.1", "openai", datetime.now(UTC))
    assert now.version.startswith(f"gpt-4.1/*@{today.isoformat()}#")
    assert (now.input, now.output, now.cached_input) == (Decimal(2), Decimal(8), Decimal("0.5"))

    before = path.read_text()  # and again: nothing more
    assert prices_cli.run(cli.build_parser().parse_args(["prices", "import", "--config", str(path)])) == 0
    assert path.read_text() == before
    assert "nothing to add" in capsys.readouterr().out
