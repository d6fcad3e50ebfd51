"""The `tollway` command: run the pipeline or one service, and manage keys through the billing API."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

from pydantic import ValidationError

from schemas.settings import CommonSettings
from services.proxy.spool import SpoolSettings
from tollway.logs import configure_logging
from tollway.servers import ServerSettings, StartupError, bind


def build_parser() -> argparse.ArgumentParser:
    from tollway import keys_cli

    p = argparse.ArgumentParser(prog="tollway", description="OpenAI-compatible LLM gateway with metering and billing")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="proxy + meter + billing in one process (bundled broker unless configured)")
    up.add_argument("--demo", action="store_true", help="also run the mock upstream and create a demo key")
    sub.add_parser("proxy", help="run the proxy alone")
    sub.add_parser("meter", help="run the meter alone")
    sub.add_parser("billing", help="run the billing service alone")
    sub.add_parser("mock-upstream", help="run the OpenAI-compatible mock upstream")
    keys_cli.register(sub)
    from tollway import invoices_cli, report_cli

    invoices_cli.register(sub)
    report_cli.register(sub)
    from tollway import reconcile_cli, rerate_cli

    rerate_cli.register(sub)
    reconcile_cli.register(sub)
    from tollway import prices_cli

    prices_cli.register(sub)
    from tollway import budgets_cli

    budgets_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("rerate", "reconcile"):
        from tollway import reconcile_cli, rerate_cli

        return (rerate_cli if args.command == "rerate" else reconcile_cli).run(args)
    if args.command in ("invoices", "report"):
        from tollway import invoices_cli, report_cli

        return (invoices_cli if args.command == "invoices" else report_cli).run(args)
    if args.command == "prices":
        from tollway import prices_cli

        return prices_cli.run(args)
    if args.command == "budgets":
        from tollway import budgets_cli

        return budgets_cli.run(args)
    if args.command == "keys":
        from tollway import keys_cli

        return keys_cli.run(args)
    try:
        return _serve(args)
    except ValidationError as err:
        print(f"tollway: {settings_error(err)}", file=sys.stderr)
    except StartupError as err:
        print(f"tollway: {err}", file=sys.stderr)
    return 2


def settings_error(err: ValidationError) -> str:
    """A pydantic-settings failure as one line naming the environment variables (no traceback, no input dump)."""
    parts = []
    for e in err.errors():
        name = "TOLLWAY_" + "_".join(str(p) for p in e["loc"]).upper()
        if err.title == "ServerSettings":
            name = name.replace("TOLLWAY_", "TOLLWAY_HTTP_", 1)
        parts.append(f"{name}: {e['msg']}")
    return "bad setting " + "; ".join(parts)


def _serve(args: argparse.Namespace) -> int:
    common = CommonSettings()
    # fail fast, before any broker or engine starts: these are otherwise read only when a server is made
    ServerSettings()
    if args.command in ("up", "proxy"):
        SpoolSettings()
    for name, host, port in _addresses(args):
        bind(host, port, name).close()  # a taken port fails here, in one line, before a broker or engine starts
    configure_logging(common.log_level, common.log_format)
    from tollway import runtime

    entry = {
        "up": lambda: runtime.up(demo=args.demo),
        "proxy": runtime.run_proxy,
        "meter": runtime.run_meter_alone,
        "billing": runtime.run_billing,
        "mock-upstream": runtime.run_mock,
    }[args.command]
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(entry())
    except KeyboardInterrupt:
        pass
    return 0


def _addresses(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    from services.billing.settings import BillingSettings
    from services.mock_upstream.settings import MockSettings
    from services.proxy.settings import ProxySettings

    wanted = {"up": ["proxy", "billing"] + (["mock-upstream"] if getattr(args, "demo", False) else []),
              "proxy": ["proxy"], "billing": ["billing"], "mock-upstream": ["mock-upstream"]}.get(args.command, [])  # fmt: skip
    out = []
    for name in wanted:
        if name == "proxy":
            p = ProxySettings()
            out.append((name, p.proxy_host, p.proxy_port))
        elif name == "billing":
            b = BillingSettings()
            out.append((name, b.billing_host, b.billing_port))
        else:
            m = MockSettings()
            out.append((name, m.mock_host, m.mock_port))
    return [a for a in out if a[2] != 0]


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (about a third less CPU per proxied call), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
