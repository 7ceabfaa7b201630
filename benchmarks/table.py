"""Render the results table of ``benchmarks/README.md`` from ``step_vs_trl.py --json`` files.

    python benchmarks/table.py benchmarks/results/*.json

One row per (file, gradient-checkpointing setting): the step-time and CPU-time ratios (paired
medians over back-to-back steps), peak memory and the work each side did per step, so the
table in the README is exactly what ``make bench`` measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def work(counts: dict[str, float]) -> str:
    """One side's work per step: vision images in generation / training, prefill + training tokens."""
    prefill = counts.get("lm_tokens/gen_prefill", float("nan"))
    return (f"{counts['vision_images/gen']:.0f}/{counts['vision_images/train']:.0f} img, "
            f"{prefill:.0f}+{counts['lm_tokens/train']:.0f} tok")


def kernels(report: dict[str, Any]) -> str:
    """The linear-layer kernels of a run when not the defaults (vlmr1 oneDNN, TRL PyTorch's own MKL)."""
    ours, theirs = report.get("onednn_linear", "on"), report.get("trl_onednn_linear", "off")
    if ours == "on" and theirs == "off":
        return ""
    return f" (linears: vlmr1 {'oneDNN' if ours == 'on' else 'MKL'}, TRL {'oneDNN' if theirs == 'on' else 'MKL'})"


def growth_note(run: dict[str, Any]) -> str:
    """The ratio of what training adds to RSS (peak over the RSS when the first step starts), where measured."""
    g = run.get("rss_growth_ratio")
    return f" (added {g:.2f}x)" if g is not None else ""


def rows(report: dict[str, Any]) -> list[str]:
    """Markdown rows of one ``step_vs_trl.py --json`` report."""
    out = []
    for key, run in report["runs"].items():
        med, cpu, rss = run["median_s"], run["cpu_median_s"], run["peak_rss_gib"]
        counts, length = run["counts_per_step"], run["completion_length"]

        out.append(
            f"| {report['config']}{kernels(report)} | {report['G']} | {report['max_new_tokens']} "
            f"| {key.removeprefix('ckpt_')} "
            f"| {med['vlmr1']:.2f} / {med['trl']:.2f} | **{run['paired_median_ratio']:.2f}x** "
            f"| {cpu['vlmr1']:.2f} / {cpu['trl']:.2f} | **{run['cpu_paired_median_ratio']:.2f}x** "
            f"| {rss['vlmr1']:.2f} / {rss['trl']:.2f} = {run['rss_ratio']:.2f}x{growth_note(run)} "
            f"| {work(counts['vlmr1'])} | {work(counts['trl'])} | {length['vlmr1']:.1f} / {length['trl']:.1f} |"
        )
    return out


def growth(reports: list[dict[str, Any]]) -> list[str]:
    """How each side's step cost grows with the work: the vision config's ``ckpt_off`` runs by G, then by length.

    Each axis holds the runs that differ from the headline (G 8, 64 new tokens) in that setting only;
    "x of G 8 / 64 tok" is the side's median s/step over the headline's, so a reader sees which side's
    cost grows faster as completions get longer or groups larger.
    """
    runs = {(r["G"], r["max_new_tokens"]): r["runs"]["ckpt_off"] for r in reports
            if r["config"] == "vision" and "ckpt_off" in r["runs"] and not kernels(r)}
    base = runs.get((8, 64))
    if base is None:
        return []
    out = ["| axis | G | new tokens | vlmr1 s/step | x of G 8 / 64 tok | TRL s/step | x of G 8 / 64 tok "
           "| vlmr1 / TRL (paired median) | mean completion vlmr1 / TRL |", "|---|---|---|---|---|---|---|---|---|"]
    axes = (("G", sorted(k for k in runs if k[1] == 64)), ("length", sorted((k for k in runs if k[0] == 8),
                                                                           key=lambda k: k[1])))
    for axis, keys in axes:
        for g, n in keys:
            r, med = runs[(g, n)], runs[(g, n)]["median_s"]
            out.append(f"| {axis} | {g} | {n} | {med['vlmr1']:.2f} | {med['vlmr1'] / base['median_s']['vlmr1']:.2f}x "
                       f"| {med['trl']:.2f} | {med['trl'] / base['median_s']['trl']:.2f}x "
                       f"| **{r['paired_median_ratio']:.2f}x** | {r['completion_length']['vlmr1']:.1f} / "
                       f"{r['completion_length']['trl']:.1f} |")
    return out


def main() -> None:
    """Print the table for the given report files, in the order given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path)
    args = p.parse_args()
    reports = [json.loads(f.read_text()) for f in args.reports]
    print("| config | G | new tokens | grad ckpt | s/step vlmr1 / TRL (median) | paired-median time "
          "| CPU s/step vlmr1 / TRL | paired-median CPU | peak RSS GiB vlmr1 / TRL "
          "| vlmr1 work: images gen/train, prefill+train tokens | TRL work | mean completion vlmr1 / TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        print("\n".join(rows(r)))
    for r in reports:
        if "plain" in r and "ckpt_off" in r["runs"]:
            pl, lock = r["plain"], r["runs"]["ckpt_off"]["paired_median_ratio"]
            print(f"\nHarness check ({r['config']}, G {r['G']}, {r['max_new_tokens']} tokens, checkpointing off): "
                  f"{pl['pairs']} pairs of whole plain runs (vlmr1: python -m core.train, its step_time_s), one "
                  f"process at a time: vlmr1/TRL {pl['median_ratio']:.2f}x (per pair "
                  f"{', '.join(f'{x:.2f}' for x in pl['ratios'])}) against the lock-step {lock:.2f}x: "
                  f"difference {pl['median_ratio'] - lock:+.2f}.")
    grow = growth(reports)
    if grow:
        print("\nCost growth (vision config, gradient checkpointing off):\n")
        print("\n".join(grow))
    first, dates = reports[0], sorted(r["date"] for r in reports)
    print(f"\n{first['machine']} (first run); torch {first['torch']}; {first['threads']} threads; "
          f"{dates[0]} to {dates[-1]}.")


if __name__ == "__main__":
    main()
