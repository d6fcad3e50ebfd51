"""`tollway prices import|check`: keep the price book current from an outside catalog, offline.

`import --from genai-prices` (the package's bundled data) or `--from litellm FILE` (LiteLLM's
`model_prices_and_context_window.json`) maps catalog models to the configured ones, prints the plan and the
diff of `tollway.yaml`, and (unless `--dry-run`) adds only new effective-dated entries; a price in force is
never rewritten. `check` lists models with no price in force or one the catalog has moved past: exit 1 then,
for CI. Neither needs the billing API or ClickHouse. Exit 2: a bad config, catalog or option.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from datetime import UTC, date, datetime
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    prices = subparsers.add_parser("prices", help="import prices from a catalog, check the book is current")
    sub = prices.add_subparsers(dest="prices_command", metavar="{import,check}", required=True)
    imp = sub.add_parser("import", help="add new effective-dated prices from a catalog to tollway.yaml")
    chk = sub.add_parser("check", help="models with no price, or a price older than the catalog's (exit 1)")
    for p in (imp, chk):
        p.add_argument("--from", dest="source", nargs="+", metavar="SOURCE", default=["genai-prices"],
                       help="`genai-prices` (default) or `litellm FILE`")  # fmt: skip
        p.add_argument("--map", action="append", default=[], metavar="PUBLIC=CATALOG_NAME",
                       help="price a configured model as this catalog model (genai-prices: `provider/model`; "
                            "litellm: the JSON key); repeatable")  # fmt: skip
        p.add_argument("--config", type=Path, help="the config file (default: TOLLWAY_CONFIG, tollway.yaml)")
    imp.add_argument("--dry-run", action="store_true", help="show the plan and the diff, write nothing")
    imp.add_argument("--effective-from", type=date.fromisoformat, metavar="YYYY-MM-DD",
                     help="date of the new entries (default: the catalog's start date, else today UTC)")  # fmt: skip
    return prices


class UsageError(ValueError):
    pass


def _lookup(source: list[str]):  # -> Lookup
    from tollway.price_sources import genai_prices, litellm

    if source == ["genai-prices"]:
        return genai_prices()
    if len(source) == 2 and source[0] == "litellm":
        return litellm(source[1])
    raise UsageError("--from takes `genai-prices` or `litellm FILE`")


def _mapped(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        public, sep, catalog = pair.partition("=")
        if not sep or not public or not catalog:
            raise UsageError(f"--map {pair!r}: expected PUBLIC=CATALOG_NAME")
        out[public] = catalog
    return out


def _config_path(args: argparse.Namespace) -> Path:
    if args.config:
        return args.config
    from schemas.settings import CommonSettings

    return CommonSettings().config


def _import(args: argparse.Namespace, today: date) -> int:
    from schemas.config import load_config
    from schemas.price_catalog import plan, show
    from tollway.price_book_file import add_prices, entry_line, write_atomically

    path = _config_path(args)
    config = load_config(path)
    lookup = _lookup(args.source)
    plans = plan(config, lookup, today, args.effective_from, _mapped(args.map))
    print(f"prices from {lookup.source} for {path} (today {today} UTC)")
    for p in plans:
        mapped = f" <- {p.catalog}" if p.catalog else ""
        if p.problem:
            print(f"! {p.model}{mapped}: REFUSED: {p.problem}")
        elif p.add:
            print(f"+ {p.model}{mapped}: the book has {show(p.current)}")
            for e in p.add:
                print(f"    + {entry_line(e)}")
        else:
            print(f"  {p.model}{mapped}: {p.note}")
        if p.unheld:
            print(f"    not held by the book yet (not imported): {'; '.join(p.unheld)}")
        routes = [r.provider for r in config.models[p.model].routes if r.prices]
        if routes:
            print(f"    route prices ({', '.join(routes)}) are kept by hand: not imported")
    refused = [p.model for p in plans if p.problem]
    if refused:
        print(f"tollway prices import: refused for {', '.join(refused)}; nothing written", file=sys.stderr)
        return 1
    additions = {p.model: p.add for p in plans if p.add}
    if not additions:
        print("nothing to add: the book is current with the catalog")
        return 0
    text = path.read_text()
    new = add_prices(text, additions, str(path))
    sys.stdout.writelines(difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                               fromfile=str(path), tofile=f"{path} (imported)"))  # fmt: skip
    n = sum(len(v) for v in additions.values())
    if args.dry_run:
        print(f"dry run: {n} new price entries, nothing written")
        return 0
    write_atomically(path, new)
    print(f"wrote {n} new price entries to {path}; services read prices at start: restart them to use these")
    return 0


def _check(args: argparse.Namespace, today: date) -> int:
    from schemas.config import load_config
    from schemas.price_catalog import check

    path = _config_path(args)
    lookup = _lookup(args.source)
    findings = check(load_config(path), lookup, today, _mapped(args.map))
    print(f"prices of {path} against {lookup.source} (today {today} UTC)")
    for f in findings:
        print(f"{f.status:9} {f.model}: {f.detail}")
    bad = [f for f in findings if f.status in ("missing", "stale")]
    if bad:
        print("tollway prices check: " + "; ".join(f"{f.model} {f.status}" for f in bad), file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, today: date | None = None) -> int:
    from schemas.config import ConfigError
    from tollway.price_book_file import BookEditError
    from tollway.price_sources import CatalogError

    today = today or datetime.now(UTC).date()
    try:
        return (_import if args.prices_command == "import" else _check)(args, today)
    except BookEditError as err:
        print(f"tollway prices: cannot add the entries to the file ({err}); nothing written", file=sys.stderr)
    except (ConfigError, CatalogError, UsageError, ValueError) as err:
        print(f"tollway prices: {err}", file=sys.stderr)
    return 2
