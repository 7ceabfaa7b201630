"""The supervised baseline: ``python -m core.sft --config FILE [options] [key=value ...]``.

Supervised fine-tuning on the same task, prompts and chat template as GRPO, with TRL's
``SFTTrainer``; the targets and the training are :mod:`core.supervised` (its docstring says how
each target is built). The result is a transformers checkpoint that ``core.train model.path=DIR``
and ``core.evaluate --checkpoint DIR`` load.
"""

from __future__ import annotations

import argparse
import sys

from core.cli import GiveOnce, load_run, run_app
from core.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; trailing ``key.path=value`` items are config overrides."""
    p = argparse.ArgumentParser(prog="python -m core.sft", description=__doc__.split("\n")[0])
    p.add_argument("--config", action=GiveOnce, help="YAML run config (the GRPO one; default: the CPU quickstart)")
    p.add_argument("--output-dir", help="where the checkpoint goes (default: <logging.output_dir>-sft)")
    p.add_argument("--split", default="train", help="task split to train on (default: train)")
    p.add_argument("--template", default="auto",
                   help="target layout with {answer} (and {think}); auto = R1 tags when the question asks for "
                        "<answer>, else the bare answer")
    p.add_argument("--think-text", default="", help="text inside <think></think> in the R1 layout (default empty)")
    p.add_argument("--box-format", choices=("auto", "list", "json"), default="auto",
                   help="box answers as [x1, y1, x2, y2] (list) or {\"bbox_2d\": [...]} (json); auto = json when "
                        "the question mentions JSON")
    p.add_argument("--box-decimals", type=int, default=0, help="decimals of box coordinates (default 0: integers)")
    p.add_argument("--logging-steps", type=int, default=10, help="steps between loss logs (default 10)")
    p.add_argument("--save-steps", type=int, default=0, help="intermediate checkpoints every N steps (0 = none)")
    p.add_argument("--show-targets", type=int, default=0, metavar="N",
                   help="print the first N prompt/target pairs and exit (check the targets before training)")
    p.add_argument("--start-over", action="store_true",
                   help="the output folder holds an earlier run's outputs: move them to <folder>.previous-<time> "
                        "first (logging.start_over=true); without it such a folder is refused")
    p.add_argument("--plugins", help="comma-separated plugin distributions to load; 'none' = built-ins only")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.learning_rate=1e-4")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate, load, train with TRL's ``SFTTrainer`` and save a transformers checkpoint."""
    args = parse_args(argv)

    def body() -> int:
        from core.config.extras import require
        from core.plugins.plan import plan_without_groups
        from core.supervised import SFTOptions, run

        overrides = list(args.overrides) + (["logging.start_over=true"] if args.start_over else [])
        cfg, host = load_run(args.config, overrides, plugins=args.plugins)
        plan = plan_without_groups(cfg, host.registry)
        if args.box_decimals < 0 or args.logging_steps < 1 or args.save_steps < 0:
            raise ConfigError("--box-decimals and --save-steps must be >= 0, --logging-steps >= 1")
        if "{answer}" not in args.template and args.template != "auto":
            raise ConfigError(f"--template {args.template!r} must contain {{answer}}")
        require(("trl", "datasets"), "sft", "python -m core.sft")  # optional: not in vlmr1's base install
        opts = SFTOptions(**{k: getattr(args, k) for k in SFTOptions.__dataclass_fields__})
        return run(plan, host.registry, opts)

    return run_app(body)


if __name__ == "__main__":
    sys.exit(main())
