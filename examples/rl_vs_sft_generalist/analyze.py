"""The report of ``run.sh``: new-task accuracy, retention, OOD and KL to the base for every checkpoint.

::

    python examples/rl_vs_sft_generalist/analyze.py --out runs/rl_vs_sft_generalist --seeds 0,1,2
        --grpo-lrs 3e-5,1e-4,3e-4 --sft-lrs 3e-5,1e-4,3e-4 --arm-steps 300 --points 3   (one line; run.sh passes these)

Reads the probe evaluations ``run.sh`` wrote (``OUT/seed<S>/eval/base/summary.json`` and
``OUT/seed<S>/eval/<arm>/lr<LR>/step<N>/summary.json``, each a ``core.evaluate`` summary of
``probe.yaml``'s mixture with ``kl_to_base``) and writes:

- ``OUT/results.md``: the base per task; (a) new-task accuracy vs retention, every checkpoint of both
  arms; (b) forgetting vs KL(π ‖ π_base) on the new task's prompts; (c) the table at matched new-task
  accuracy;
- ``OUT/results/accuracy_vs_retention.png`` (a), ``OUT/results/forgetting_vs_kl.png`` (b);
- ``OUT/results/raw.json``: every number above, per seed and checkpoint;
- ``OUT/results/summary.json``: the matched table, ``{"matched": {"grpo": {"new_task": {"mean", "std"},
  "retention": {...}, "ood": {...}}, "sft": {...}}, "seeds": N}``, or ``"matched": null`` with a
  ``"reason"`` when no pair of settings matches.

Definitions. A checkpoint's *accuracy* on a task is Acc@0.5 for grounding and exact-match accuracy for
scene QA (greedy). *Retention* = the mean accuracy over the base's prior tasks (``PRIOR``);
*forgetting* = the seed's base retention − the checkpoint's. *KL* = ``kl_to_base`` per generated token
on the new task's prompts. A *setting* is (arm, learning rate, step); its figures are mean ± sample
std over seeds. *Matching*: pairs (GRPO setting, SFT setting) whose mean new-task accuracies differ by
at most ``--tolerance`` (0.02); the pair with the highest new-task accuracy (the lower of the two)
wins, ties to the smaller difference. The choice looks at new-task accuracy only, never at retention
or OOD, the quantities compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

ARMS = ("grpo", "sft")
NEW, OOD = "new_task", "ood"
PRIOR = ("ground_simple", "ground_relational", "scene_qa")


# ---- reading -------------------------------------------------------------------------------
def main_accuracy(per_kind: dict[str, Any]) -> float:
    """The headline accuracy of one dataset's summary: Acc@0.5 (``rec``), else ``accuracy``."""
    for kind, metrics in per_kind.items():
        if "acc@0.5" in metrics:
            return float(metrics["acc@0.5"])
        if "accuracy" in metrics:
            return float(metrics["accuracy"])
        raise ValueError(f"no accuracy in the {kind!r} metrics: {sorted(metrics)}")
    raise ValueError("no metrics")


def read_probe(path: Path) -> dict[str, Any]:
    """One checkpoint's probe (``core.evaluate``'s ``summary.json``): accuracies, retention and KL."""
    summary = json.loads(path.read_text())
    ds = summary["datasets"]
    missing = [d for d in (NEW, OOD, *PRIOR) if d not in ds]
    if missing:
        raise SystemExit(f"error: {path}: no results for {', '.join(missing)} (is it a probe.yaml evaluation?)")
    kl = summary.get("kl_to_base") or {}
    prior = {t: main_accuracy(ds[t]) for t in PRIOR}
    return {
        NEW: main_accuracy(ds[NEW]), OOD: main_accuracy(ds[OOD]), "prior": prior,
        "retention": statistics.fmean(prior.values()),
        "kl": float(kl.get("datasets", {}).get(NEW, kl.get("per_token", math.nan))),
        "kl_per_dataset": kl.get("datasets", {}), "n": {d: next(iter(ds[d].values()))["n"] for d in (NEW, OOD, *PRIOR)},
    }


def collect(out: Path, seeds: list[int], lrs: dict[str, list[str]], steps: list[int]) -> dict[str, Any]:
    """Every probe of the run: ``{"base": {seed: probe}, "points": [{seed, arm, lr, step, ...probe}]}``."""
    base, points = {}, []
    for seed in seeds:
        ev = out / f"seed{seed}" / "eval"
        base[str(seed)] = read_probe(ev / "base" / "summary.json")
        for arm in ARMS:
            for lr in lrs[arm]:
                for step in steps:
                    p = read_probe(ev / arm / f"lr{lr}" / f"step{step}" / "summary.json")
                    p["forgetting"] = base[str(seed)]["retention"] - p["retention"]
                    points.append({"seed": seed, "arm": arm, "lr": lr, "step": step, **p})
    return {"base": base, "points": points}


# ---- aggregation ---------------------------------------------------------------------------
def mean_std(vals: list[float]) -> dict[str, float]:
    """``{"mean", "std"}``: sample std over seeds (0 for one seed)."""
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def settings(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (arm, lr, step) with mean/std over seeds of new_task, retention, ood, forgetting, kl."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["arm"], p["lr"], p["step"]), []).append(p)
    return [{"arm": arm, "lr": lr, "step": step, "seeds": [p["seed"] for p in ps],
             **{k: {**mean_std([p[k] for p in ps]), "min": min(p[k] for p in ps), "max": max(p[k] for p in ps)}
                for k in (NEW, "retention", OOD, "forgetting", "kl")}}
            for (arm, lr, step), ps in groups.items()]


def match(rows: list[dict[str, Any]], tolerance: float) -> tuple[dict[str, Any] | None, str]:
    """The matched pair ``{"grpo": setting, "sft": setting}`` (module docstring), or None and why not."""
    g_rows = [r for r in rows if r["arm"] == "grpo"]
    s_rows = [r for r in rows if r["arm"] == "sft"]
    pairs = [(g, s) for g in g_rows for s in s_rows
             if abs(g[NEW]["mean"] - s[NEW]["mean"]) <= tolerance + 1e-12]
    if not pairs:
        g_range = (min(r[NEW]["mean"] for r in g_rows), max(r[NEW]["mean"] for r in g_rows)) if g_rows else None
        s_range = (min(r[NEW]["mean"] for r in s_rows), max(r[NEW]["mean"] for r in s_rows)) if s_rows else None
        return None, (f"no GRPO and SFT settings reach new-task accuracies within {tolerance} of each other "
                      f"(GRPO settings span {fmt_range(g_range)}, SFT settings {fmt_range(s_range)})")
    g, s = max(pairs, key=lambda gs: (min(gs[0][NEW]["mean"], gs[1][NEW]["mean"]),
                                      -abs(gs[0][NEW]["mean"] - gs[1][NEW]["mean"])))
    return {"grpo": g, "sft": s}, ""


def fmt_range(r: tuple[float, float] | None) -> str:
    """``[a, b]`` or ``none``."""
    return "none" if r is None else f"[{r[0]:.3f}, {r[1]:.3f}]"


def goal(matched: dict[str, Any] | None) -> str:
    """The issue's goal at the matched point: GRPO retention ≥ SFT's + 0.10, seed ranges apart, OOD ≥ SFT's."""
    if matched is None:
        return "not assessable: no matched pair"
    g, s = matched["grpo"], matched["sft"]
    d_ret = g["retention"]["mean"] - s["retention"]["mean"]
    apart = g["retention"]["min"] > s["retention"]["max"]
    d_ood = g[OOD]["mean"] - s[OOD]["mean"]
    met = d_ret >= 0.10 and apart and d_ood >= 0
    return (f"{'MET' if met else 'NOT met'}: retention GRPO − SFT = {d_ret:+.3f} (seed ranges "
            f"{'apart' if apart else 'overlap'}), OOD GRPO − SFT = {d_ood:+.3f}")


# ---- the report ----------------------------------------------------------------------------
def pm(stats: dict[str, float], n_seeds: int) -> str:
    """``mean ± std`` (the bare mean for one seed: a std of 0 says nothing)."""
    return f"{stats['mean']:.3f}" if n_seeds == 1 else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def markdown(meta: dict[str, Any], data: dict[str, Any], rows: list[dict[str, Any]],
             matched: dict[str, Any] | None, reason: str) -> str:
    """``results.md``."""
    seeds = meta["seeds"]
    n = len(seeds)
    lines = [
        "# RL vs SFT from a generalist base (results)", "",
        f"Machine: {meta['machine']}; date {meta['date']}; wall {meta['wall_s']} s. "
        f"Seeds {', '.join(map(str, seeds))}; "
        f"base {meta['base_steps']} SFT steps; each arm {meta['arm_steps']} steps, checkpoints at steps "
        f"{', '.join(map(str, meta['steps']))}; learning rates GRPO {', '.join(meta['lrs']['grpo'])}, "
        f"SFT {', '.join(meta['lrs']['sft'])}; {meta['eval_n']} held-out samples per probe task, greedy.",
        "",
        f"Accuracy = Acc@0.5 (grounding) or exact match (scene QA). Retention = mean accuracy over the prior "
        f"tasks ({', '.join(PRIOR)}); forgetting = the seed's base retention − the checkpoint's; KL = "
        "KL(π ‖ π_base) per generated token on the new task's prompts (one sampled completion per prompt).",
        "",
        "## The base, per task (held out)", "",
        "| seed | " + " | ".join((NEW, OOD, *PRIOR)) + " | retention |",
        "|---|" + "---|" * (len(PRIOR) + 3),
    ]
    for seed in seeds:
        b = data["base"][str(seed)]
        lines.append(f"| {seed} | {b[NEW]:.3f} | {b[OOD]:.3f} | "
                     + " | ".join(f"{b['prior'][t]:.3f}" for t in PRIOR) + f" | {b['retention']:.3f} |")
    if n > 1:
        bs = [data["base"][str(s)] for s in seeds]
        cols = [[b[NEW] for b in bs], [b[OOD] for b in bs], *[[b["prior"][t] for b in bs] for t in PRIOR],
                [b["retention"] for b in bs]]
        lines.append("| mean ± std [min, max] | " + " | ".join(
            f"{pm(mean_std(c), n)} [{min(c):.3f}, {max(c):.3f}]" for c in cols) + " |")
    lines += ["", "## (a) New-task accuracy vs retention, every checkpoint", "",
              "![new-task accuracy vs retention](results/accuracy_vs_retention.png)", "",
              "| arm | lr | step | seed | new task | retention | " + " | ".join(PRIOR) + " | OOD | KL |",
              "|---|---|---|---|---|---|" + "---|" * len(PRIOR) + "---|---|"]
    for p in sorted(data["points"], key=lambda p: (p["arm"], float(p["lr"]), p["step"], p["seed"])):
        lines.append(f"| {p['arm']} | {p['lr']} | {p['step']} | {p['seed']} | {p[NEW]:.3f} | {p['retention']:.3f} | "
                     + " | ".join(f"{p['prior'][t]:.3f}" for t in PRIOR) + f" | {p[OOD]:.3f} | {p['kl']:.4f} |")
    lines += ["", "## (b) Forgetting vs KL to the base", "",
              "![forgetting vs KL](results/forgetting_vs_kl.png)", "",
              "| arm | lr | step | new task | forgetting | KL (new-task prompts) |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arm"], float(r["lr"]), r["step"])):
        lines.append(f"| {r['arm']} | {r['lr']} | {r['step']} | {pm(r[NEW], n)} | {pm(r['forgetting'], n)} "
                     f"| {r['kl']['mean']:.4f} |")
    corr = correlation(data["points"])
    lines += ["", f"Pearson correlation of forgetting and KL over all checkpoints: {corr}.", "",
              f"## (c) At matched new-task accuracy (within {meta['tolerance']})", ""]
    if matched is None:
        lines += [f"**No match**: {reason}. No matched table is reported.", ""]
    else:
        lines += ["| arm | setting | new task | retention | OOD | forgetting | KL |", "|---|---|---|---|---|---|---|"]
        for arm in ARMS:
            r = matched[arm]
            lines.append(f"| {arm.upper()} | lr {r['lr']}, step {r['step']} | {pm(r[NEW], n)} | "
                         f"{pm(r['retention'], n)} [{r['retention']['min']:.3f}, {r['retention']['max']:.3f}] | "
                         f"{pm(r[OOD], n)} | {pm(r['forgetting'], n)} | {r['kl']['mean']:.4f} |")
        spread = (f"Mean ± sample std over {n} seeds; [min, max] of retention over seeds." if n > 1
                  else "One seed: single values, no spread across seeds.")
        lines += ["", f"{spread} The pair was chosen on new-task accuracy alone (the highest both arms reach "
                      "within the tolerance), not on retention or OOD.", ""]
    lines += [f"Goal (GRPO retains ≥ 0.10 more than SFT at matched new-task accuracy, seed ranges apart, and is "
              f"at least as good OOD): {goal(matched)}.", ""]
    return "\n".join(lines)


def correlation(points: list[dict[str, Any]]) -> str:
    """Pearson r of forgetting and KL (or why there is none)."""
    xs = [p["kl"] for p in points if math.isfinite(p["kl"])]
    ys = [p["forgetting"] for p in points if math.isfinite(p["kl"])]
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return "not defined (fewer than 3 checkpoints, or no spread)"
    return f"{statistics.correlation(xs, ys):+.2f} over {len(xs)} checkpoints"


def plots(data: dict[str, Any], folder: Path) -> None:
    """(a) new-task accuracy vs retention and (b) forgetting vs KL, both arms, every checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"grpo": "tab:red", "sft": "tab:blue"}
    for name, x, y, xlabel, ylabel in (
            ("accuracy_vs_retention.png", NEW, "retention", "new-task accuracy (Acc@0.5, shifted domain)",
             "retention (mean prior-task accuracy)"),
            ("forgetting_vs_kl.png", "kl", "forgetting", "KL(π ‖ π_base) per token, new-task prompts",
             "forgetting (base retention − retention)")):
        fig, ax = plt.subplots(figsize=(5.2, 4.0))
        for arm in ARMS:
            ps = [p for p in data["points"] if p["arm"] == arm]
            ax.scatter([p[x] for p in ps], [p[y] for p in ps], color=colours[arm], s=18, alpha=0.8, label=arm.upper())
        if x == NEW:
            bs = list(data["base"].values())
            ax.scatter([b[NEW] for b in bs], [b["retention"] for b in bs], color="black", marker="*", s=80,
                       label="base")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (run.sh passes its knobs)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run.sh's OUT")
    p.add_argument("--seeds", required=True, help="comma-separated seeds")
    p.add_argument("--grpo-lrs", required=True, help="comma-separated learning rates of the GRPO arm")
    p.add_argument("--sft-lrs", required=True, help="comma-separated learning rates of the SFT arm")
    p.add_argument("--arm-steps", type=int, required=True)
    p.add_argument("--points", type=int, required=True)
    p.add_argument("--eval-n", type=int, default=0, help="for the report's header")
    p.add_argument("--base-steps", type=int, default=0, help="for the report's header")
    p.add_argument("--wall-s", type=int, default=0, help="for the report's header")
    p.add_argument("--tolerance", type=float, default=0.02, help="new-task accuracy match (default 0.02)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Read the probes, write results.md, the PNGs, raw.json and summary.json."""
    a = parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    seeds = [int(s) for s in split(a.seeds)]
    lrs = {"grpo": split(a.grpo_lrs), "sft": split(a.sft_lrs)}
    if not seeds or not lrs["grpo"] or not lrs["sft"] or a.points < 1 or a.arm_steps % a.points:
        raise SystemExit("error: need seeds, learning rates for both arms, and --arm-steps a multiple of --points")
    steps = [a.arm_steps // a.points * i for i in range(1, a.points + 1)]
    data = collect(a.out, seeds, lrs, steps)
    rows = settings(data["points"])
    matched, reason = match(rows, a.tolerance)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"), "wall_s": a.wall_s, "seeds": seeds, "lrs": lrs, "steps": steps,
            "arm_steps": a.arm_steps, "base_steps": a.base_steps, "eval_n": a.eval_n, "tolerance": a.tolerance}
    folder = a.out / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "raw.json").write_text(json.dumps({"meta": meta, **data, "settings": rows, "matched": matched,
                                                 "no_match_reason": reason or None}, indent=2) + "\n")
    if matched is None:
        summary: dict[str, Any] = {"matched": None, "reason": reason, "seeds": len(seeds)}
    else:
        summary = {"matched": {arm: {k: {"mean": matched[arm][k]["mean"], "std": matched[arm][k]["std"]}
                                     for k in (NEW, "retention", OOD)} for arm in ARMS},
                   "seeds": len(seeds)}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots(data, folder)
    md = markdown(meta, data, rows, matched, reason)
    (a.out / "results.md").write_text(md)
    print(md)
    print(f"results in {a.out}/results.md and {folder}/ (summary.json, raw.json, PNGs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
