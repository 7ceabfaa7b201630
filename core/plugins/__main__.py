"""List installed plugins: ``python -m core.plugins list [--json] [--kind KIND] [--plugins a,b] [--strict]``."""

from __future__ import annotations

import argparse
import json
import sys

from core import __version__
from core.plugins.host import PluginError, PluginHost
from core.plugins.registry import KINDS


def _print_table(host: PluginHost, kind: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vlmr1 {__version__} plugins")
    for col in ("plugin", "version", "status", "hooks", "components"):
        table.add_column(col)
    for info in host.infos:
        comps = {k: v for k, v in info.components.items() if kind in (None, k)}
        if kind and not comps and info.status in ("loaded", "not selected"):
            continue
        comp_text = "\n".join(f"{k}: {', '.join(v)}" for k, v in comps.items())
        if info.error:
            comp_text = (comp_text + "\n" if comp_text else "") + info.error.strip().splitlines()[-1]
        style = {"loaded": "green", "not selected": "dim"}.get(info.status, "red")
        table.add_row(info.distribution, info.version, f"[{style}]{info.status}[/]",
                      "\n".join(h.replace("vlmr1_register_", "") for h in info.hooks), comp_text)
    # A wide fixed width keeps the table readable when stdout is a pipe (CI logs).
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for info in host.failures():
        console.print(f"[red]{info.distribution} {info.version} {info.status}:[/]")
        console.print(info.error or "", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m core.plugins``."""
    parser = argparse.ArgumentParser(prog="python -m core.plugins", description="vlmr1 plugin host")
    sub = parser.add_subparsers(dest="cmd", required=True)
    lst = sub.add_parser("list", help="list installed plugins, their components and load status")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.add_argument("--kind", choices=list(KINDS), help="only components of this kind")
    lst.add_argument("--plugins", default=None,
                     help="comma-separated distributions to load ('none' = built-ins only; default: all)")
    lst.add_argument("--strict", action="store_true", help="exit non-zero if any plugin fails to load")
    args = parser.parse_args(argv)
    try:
        host = PluginHost(args.plugins, strict=args.strict)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(host.as_json(args.kind), sys.stdout, indent=2)
        print()
    else:
        _print_table(host, args.kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
