"""Evaluation: ``python -m core.evaluate --config FILE [--checkpoint PATH] [options] [key=value ...]``.

Evaluates a checkpoint on a task's split with the same config sections (model, task,
rewards, rollout) as training, so prompts, templates and answer parsing are the training
ones. Decoding is greedy by default; any rollout engine works (the built-in ``transformers``
one, or a plugin such as ``openai_server`` against ``python -m core.serve`` or vLLM).

Metrics come from the reward that scores each sample (``--metric`` forces one): Acc@0.5 for
grounding, COCO mAP for detection, accuracy for math and exact match; the table and the rules
are in :mod:`core.runtime.evaluator`, which training's own evaluation uses too.

Outputs in ``--out``: ``predictions.jsonl`` (one line per sample: id, dataset, kind, prompt,
completion, solution and the per-sample metric values) and ``summary.json`` (per dataset =
``meta["dataset"]``, else the source file name, else the task name); a table is printed.
Reward-scored kinds also report ``reward_errors`` / ``reward_timeouts``: samples whose reward
raised or timed out. They count as wrong in the accuracy, so the counts tell a low score from an
outage (a warning is printed when any occurred).
"""

from __future__ import annotations

import argparse
import sys

from core.cli import GiveOnce, load_run, run_app
from core.config import ConfigError
from core.grpo.base_kl import kl_to_base
from core.runtime.evaluator import EvalRequest, check_metric, evaluate_checkpoint


# ---- command line --------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; trailing ``key.path=value`` items are config overrides."""
    p = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action=GiveOnce, help="YAML run config (the training one; default: the CPU quickstart)")
    p.add_argument("--checkpoint", help="checkpoint folder (or an output folder: its newest checkpoint-N); "
                                        "default: model.path")
    p.add_argument("--split", default="eval", help="task split to evaluate (default: eval)")
    p.add_argument("--limit", type=int, help="evaluate at most N samples (the first N, or see --shuffle)")
    p.add_argument("--shuffle", action="store_true", help="with --limit: a seeded random subset instead")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle and of sampling (default 0)")
    p.add_argument("--rollout", help="rollout engine name (default: the config's rollout.name); its options "
                                     "come from rollout.options overrides")
    p.add_argument("--metric", type=check_metric, default="auto",
                   help="auto (by each sample's reward_method) | rec | detection | math | exact_match | reward:NAME")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens or grpo.max_completion_length")
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default: eval.batch_size)")
    p.add_argument("--require-answer-tag", action="store_true",
                   help="read boxes only from an <answer> block (VLM-R1's eval); default: the block if present, "
                        "else the whole completion")
    p.add_argument("--load-model", choices=("auto", "always", "never"), default="auto",
                   help="load the weights locally: auto = only for the built-in transformers engine")
    p.add_argument("--out", help="output folder (default: runs/eval/<checkpoint or model name>-<split>)")
    p.add_argument("--plugins", help="comma-separated plugin distributions to load; 'none' = built-ins only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-verify-hashes", dest="verify_hashes", action="store_false",
                   help="skip the SHA-256 check of a vlmr1 checkpoint's files (faster on large ones); files that "
                        "are missing, resized or not listed in its manifest are still refused")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. task.options.num_eval=100")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate, load, generate, score, write ``predictions.jsonl`` / ``summary.json``, print the table."""
    args = parse_args(argv)

    def body() -> int:
        from core.plugins.plan import plan_without_groups

        overrides = list(args.overrides) + ([f"rollout.name={args.rollout}"] if args.rollout else [])
        cfg, host = load_run(args.config, overrides, plugins=args.plugins)
        plan = plan_without_groups(cfg, host.registry)
        for name, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                            ("--max-new-tokens", args.max_new_tokens)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if args.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
        req = EvalRequest(**{k: getattr(args, k) for k in EvalRequest.__dataclass_fields__})
        evaluate_checkpoint(plan, host.registry, req, kl_estimator=kl_to_base)
        return 0

    return run_app(body)


if __name__ == "__main__":
    sys.exit(main())
