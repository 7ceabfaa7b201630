"""Train with GRPO: ``python -m core.train [--config FILE] [--plugins a,b] [--dry-run] [--resume] [k=v ...]``.

Without ``--config`` the built-in default runs: the CPU quickstart (a tiny Qwen2.5-VL
built offline learns a synthetic colour task). ``--dry-run`` validates the config against
the installed plugins, prints the resolved config and plan, renders the task's first samples
through the model family when the model's files are on disk, and loads no weights.

Every expected failure (bad config, data, checkpoint, plugin, reward, an unwritable output
folder, a full disk, a non-finite loss) ends with one ``error: ...`` paragraph and exit code
2 (1 for failures during training), never a traceback; the output folder is checked to be
writable before any weights load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.cli import DEFAULT_CONFIG, GiveOnce, load_run, run_app
from core.config import ConfigError, RunConfig, to_yaml

__all__ = ["DEFAULT_CONFIG", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; trailing ``key.path=value`` items are config overrides."""
    p = argparse.ArgumentParser(prog="python -m core.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", action=GiveOnce, help="YAML run config (default: the CPU quickstart)")
    p.add_argument("--plugins", help="comma-separated plugin distributions to load; 'none' = built-ins only")
    p.add_argument("--strict-plugins", action="store_true", help="any plugin that fails to load is fatal")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan; render the first task samples when the model is on disk; "
                        "load no weights")
    p.add_argument("--resume", nargs="?", const="true", default=None,
                   help="resume from the latest checkpoint in the output dir (an error if there is none), "
                        "or from PATH")
    p.add_argument("--resume-force", action="store_true",
                   help="resume even if the model, batch, G, seed, schedule or data changed since the checkpoint, "
                        "or skipping a damaged newest checkpoint")
    p.add_argument("--start-over", action="store_true",
                   help="a fresh run into an output folder holding an earlier run's checkpoints: move them to "
                        "<output_dir>.previous-<time> first (logging.start_over=true); without it that is refused")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.learning_rate=1e-5")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate, plan and (unless ``--dry-run``) train."""
    args = parse_args(argv)
    return run_app(lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from core.plugins.plan import make_plan
    from core.runtime.distributed import launch_world_size

    overrides = list(args.overrides)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value`: argparse gave the override to --resume's optional PATH.
        overrides.insert(0, args.resume)
        args.resume = "true"
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.resume_force:
        overrides.append("checkpoint.resume_force=true")
    if args.start_over:
        overrides.append("logging.start_over=true")
    # --dry-run prints the plugin failures after the plan instead of before.
    cfg, host = load_run(args.config, overrides, plugins=args.plugins, strict=args.strict_plugins,
                         warn=not args.dry_run)
    # --dry-run validates a GPU recipe on a CPU-only machine: a missing device is a note there.
    plan = make_plan(cfg, host.registry, launch_world_size(), require_available=not args.dry_run)
    if args.dry_run:
        print("# resolved config")
        print(to_yaml(cfg))
        print("# plan")
        print(json.dumps(plan.summary(), indent=2))
        host.warn_failures()  # the same line (version and reason) a real run prints first
        from core.runtime.data_limits import dry_run_render_check

        # The task's first samples through the family's chat template and processor (no weights):
        # a task the family cannot render is a DataError here, not a traceback at step 1.
        dry_run_render_check(plan, host.registry, log=lambda m: print(m, file=sys.stderr))
        return 0
    from core.runtime.outdir import check_output_dir

    check_output_dir(cfg.logging.output_dir)  # before any weights load
    check_model_path(cfg)
    if cfg.logging.wandb:
        from core.config.extras import require

        require("wandb", "wandb", "logging.wandb=true")
    from core.grpo import trainer

    return trainer.run(plan, host.registry)


def check_model_path(cfg: RunConfig) -> None:
    """A local ``model.path`` (absolute or ``./``) that does not exist is a config error, before anything loads.

    Hub ids (``org/name``) are left to transformers; a tiny build creates its path.
    """
    path = cfg.model.path
    if not path or cfg.model.tiny is not None:
        return
    local = path.startswith(("/", "./", "../", "~")) or Path(path).exists()
    if local and not Path(path).expanduser().exists():
        raise ConfigError(f"{cfg.origin('model.path')}: model.path {path} does not exist")


if __name__ == "__main__":
    sys.exit(main())
