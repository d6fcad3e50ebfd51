"""Real processes: `tollway meter` and `tollway rerate` refuse to start on a price edited in place."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

TOLLWAY = str(Path(sys.executable).with_name("tollway"))


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_meter_and_a_rerate_refuse_a_price_edited_in_place(bootstrap, tmp_path):
    raw = yaml.safe_load(Path("tollway.yaml").read_text())
    config = tmp_path / "tollway.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "TOLLWAY_CONFIG": str(config), "TOLLWAY_DATA_DIR": str(tmp_path / "data"),
           "TOLLWAY_KAFKA_BOOTSTRAP": bootstrap, "TOLLWAY_METER_GROUP": f"g-{tmp_path.name}"}  # fmt: skip
    env.pop("TOLLWAY_CLICKHOUSE_URL", None)

    first = run([TOLLWAY, "rerate", "--period", "2025-05"], env, tmp_path)  # records the prices in force
    assert first.returncode == 0, first.stderr
    # A call was billed at the recorded gpt-4.1 price (the engine is this process's alone while it runs).
    seed = textwrap.dedent("""
        import asyncio, uuid
        from datetime import UTC, datetime
        from schemas.clickhouse import Store
        from schemas.config import load_config
        from schemas.prices import PriceBook
        from schemas.settings import CommonSettings

        async def main():
            s = CommonSettings()
            store = Store(s.resolved_clickhouse_url(), s.clickhouse_database)
            await store.open()
            when = datetime(2025, 5, 1, tzinfo=UTC)
            v = PriceBook(load_config(s.config)).at("gpt-4.1", "openai", when).version
            await store.insert_rows("usage_events", [[str(uuid.uuid4()), when, "team", "gpt-4.1", True, v]],
                                    ["event_id", "occurred_at", "team_id", "served_model", "priced", "price_version"])
            await store.close()

        asyncio.run(main())
    """)
    seeded = run([sys.executable, "-c", seed], {**env, "PYTHONPATH": str(Path.cwd())}, tmp_path)
    assert seeded.returncode == 0, seeded.stderr

    raw["models"]["gpt-4.1"]["prices"][0]["input"] = "2.50"  # the in-place edit
    config.write_text(yaml.safe_dump(raw))
    meter = run([TOLLWAY, "meter"], env, tmp_path)
    assert meter.returncode == 2
    line = meter.stderr.strip().splitlines()[-1]
    assert line.startswith("tollway: the price of gpt-4.1 in force from 2025-04-14 was edited in place")
    assert "add a new entry with a later effective_from, then run `tollway rerate --period YYYY-MM`" in line
    rerate = run([TOLLWAY, "rerate", "--period", "2025-05"], env, tmp_path)
    assert rerate.returncode == 1 and "gpt-4.1 in force from 2025-04-14 was edited in place" in rerate.stderr
