"""The plugin host's command line.

    python -m core.plugins list [--json] [--kind KIND] [--plugins a,b] [--strict]
    python -m core.plugins build-tiny FAMILY DIR [--options '{"hidden_size": 64, "seed": 0}']

``list`` shows each installed plugin, its status and components; ``build-tiny`` writes a model
family's tiny, randomly initialised checkpoint offline (``ModelFamily.build_tiny_checkpoint``),
so scripts and plugins get one without importing the plugin host.
"""

from __future__ import annotations

import argparse
import json
import sys

from core import __version__
from core.plugins.host import PluginError, PluginHost
from core.plugins.registry import KINDS, ComponentError


def _print_table(host: PluginHost, kind: str | None) -> None:
    from rich.console import Console
    from rich.markup import escape
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
    for info in host.infos:
        for message in info.warnings:
            console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def _build_tiny(host: PluginHost, family: str, path: str, options: str) -> int:
    """``build-tiny``: print the checkpoint folder; exit 2 on a bad family or options."""
    try:
        opts = json.loads(options)
        if not isinstance(opts, dict):
            raise ValueError(f"expected a JSON object, got {type(opts).__name__}")
    except ValueError as exc:
        print(f"error: --options: {exc}", file=sys.stderr)
        return 2
    try:
        cls = host.registry.get("models", family)
        print(cls.build_tiny_checkpoint(path, **opts))
    except (ComponentError, NotImplementedError, TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


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
    tiny = sub.add_parser("build-tiny", help="write a model family's tiny, randomly initialised checkpoint (offline)")
    tiny.add_argument("family", help="model family, as a config's model.family (e.g. qwen2_5_vl)")
    tiny.add_argument("dir", help="folder to write the checkpoint to")
    tiny.add_argument("--options", default="{}", help="JSON object of the family's tiny-build options "
                                                      "(e.g. '{\"hidden_size\": 64, \"seed\": 0}')")
    tiny.add_argument("--plugins", default=None, help="comma-separated distributions to load (default: all)")
    args = parser.parse_args(argv)
    try:
        host = PluginHost(args.plugins, strict=getattr(args, "strict", False))
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "build-tiny":
        return _build_tiny(host, args.family, args.dir, args.options)
    if args.json:
        json.dump(host.as_json(args.kind), sys.stdout, indent=2)
        print()
    else:
        _print_table(host, args.kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
