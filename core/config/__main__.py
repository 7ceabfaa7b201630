"""Config tools: ``python -m core.config [--markdown] [--check FILE [key=value ...]]``."""

from __future__ import annotations

import sys

from core.config import ConfigError, build_config, load_raw, markdown_reference, to_yaml


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m core.config", description="config tools")
    p.add_argument("--markdown", action="store_true", help="print the field reference as Markdown tables")
    p.add_argument("--check", metavar="FILE", help="validate a config file (no plugins: components unchecked)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_reference())
        return 0
    if args.check:
        try:
            cfg = build_config(load_raw(args.check), args.overrides)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        sys.stdout.write(to_yaml(cfg))
        return 0
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
