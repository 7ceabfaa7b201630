"""Side-by-side table of the grounding example's evaluations (Markdown), and the equal-compute step count.

Usage:
    python examples/grounding_cpu/compare.py OUT                 # prints results.md for the run folder OUT
    python examples/grounding_cpu/compare.py OUT --equal-steps   # SFT steps costing as much CPU as GRPO did

Reads ``OUT/eval_<stage>/summary.json`` (written by ``python -m core.evaluate``) and
``OUT/times/<stage>`` (``user sys wall`` seconds written by run.sh around each command).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: (column title, evaluation folder, training stages whose CPU time the column adds up).
COLUMNS = [
    ("base", "eval_base", []),
    ("SFT", "eval_sft", ["sft"]),
    ("SFT + GRPO", "eval_grpo", ["sft", "grpo"]),
    ("SFT + more SFT (equal compute)", "eval_sft_more", ["sft", "sft_more"]),
]


def cpu_seconds(out: Path, stage: str) -> float | None:
    """User + system CPU seconds of one stage, or None if it was not run."""
    f = out / "times" / stage
    if not f.is_file():
        return None
    user, sys_, _wall = (float(x) for x in f.read_text().split()[:3])
    return user + sys_


def steps_of(out: Path, stage: str) -> int:
    """Optimizer steps a training stage ran (from its own state file)."""
    sft = out / stage / "sft_state.json"
    if sft.is_file():
        return int(json.loads(sft.read_text())["steps"])
    ckpts = sorted((out / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return int(ckpts[-1].name.split("-")[1]) if ckpts else 0


def equal_steps(out: Path) -> int:
    """SFT steps whose CPU time matches GRPO's (from the measured seconds per SFT step)."""
    per_step = cpu_seconds(out, "sft") / max(steps_of(out, "sft"), 1)
    return max(1, round(cpu_seconds(out, "grpo") / per_step))


def table(out: Path) -> str:
    """The Markdown results table."""
    rows = {"Acc@0.5 (greedy)": [], "mean IoU": [], "answers with a box": [], "training steps": [],
            "training CPU seconds": []}
    titles = []
    for title, folder, stages in COLUMNS:
        summary = out / folder / "summary.json"
        if not summary.is_file():
            continue
        titles.append(title)
        rec = json.loads(summary.read_text())["datasets"]["synthetic_grounding"]["rec"]
        rows["Acc@0.5 (greedy)"].append(f"{rec['acc@0.5']:.3f}")
        rows["mean IoU"].append(f"{rec['mean_iou']:.3f}")
        rows["answers with a box"].append(f"{rec['parse_rate']:.3f}")
        rows["training steps"].append(" + ".join(str(steps_of(out, s)) for s in stages) or "0")
        secs = [cpu_seconds(out, s) for s in stages]
        rows["training CPU seconds"].append(f"{sum(s for s in secs if s is not None):.0f}")
    n = json.loads((out / COLUMNS[0][1] / "summary.json").read_text())["num_samples"] if titles else 0
    lines = [f"Held-out split: {n} images (synthetic_grounding eval), greedy decoding.", "",
             "| | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
    lines += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the table, or the equal-compute SFT step count."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--equal-steps", action="store_true")
    args = p.parse_args(argv)
    print(equal_steps(args.out) if args.equal_steps else table(args.out), end="\n" if args.equal_steps else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
