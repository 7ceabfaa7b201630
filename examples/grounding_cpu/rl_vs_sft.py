"""RL vs SFT in and out of domain on the synthetic grounding task, as one command.

::

    python examples/grounding_cpu/rl_vs_sft.py --out runs/grounding_cpu          # the full experiment
    python examples/grounding_cpu/rl_vs_sft.py --out /tmp/x --seeds 0 --grpo-steps 6 --points 2 ...  # a smoke run

Stages (each a normal ``python -m core.*`` command, so every number here can be reproduced by hand):

1. **Warm start**: ``core.sft`` on ``config.yaml`` (the training split: "Locate the {colour} {shape}.").
2. **Two arms per seed, from that same checkpoint**: arm ``grpo`` continues with GRPO
   (``core.train --config grpo.yaml``: IoU reward on sampled boxes); arm ``sft`` continues with SFT on
   the same training data (``core.sft``). Both save ``--points`` checkpoints evenly along training and
   record the CPU seconds spent training at each one (``cpu_time_s`` in GRPO's ``metrics.jsonl``,
   ``cpu_time.json`` in each SFT checkpoint). The SFT arm's step count is chosen so that it spends the
   CPU seconds the GRPO arms spent (from the warm start's measured CPU seconds per SFT step), so the
   arms get **equal compute**. With ``--jobs 2`` two runs go side by side, one thread each, so load
   on a shared machine hits both alike.
3. **Evaluation** of the warm start and of every checkpoint on each split (``id`` = the held-out
   ``eval`` split of the training distribution, ``ood_reasoning``, ``ood_visual``; see the
   ``synthetic_grounding`` README) with greedy decoding: Acc@0.5 and mean IoU (``core.evaluate``'s
   functions, in-process).
4. **Report**: ``results.json`` (raw: every point of every run), ``results.md`` (mean ± std over seeds
   per arm and split at the end of training and at equal CPU time) and ``accuracy_vs_cpu.png`` (one
   panel per split, both arms, accuracy against CPU seconds).

Knobs: ``--extra`` config overrides go to every stage (e.g. ``task.options.num_objects=1``);
``--grpo-extra`` / ``--sft-extra`` to one arm only. Nothing here tunes on an evaluation split: the
settings come from the config files and the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ARMS = ("grpo", "sft")
SPLITS = ("id", "ood_reasoning", "ood_visual")


# ---- running the stages --------------------------------------------------------------------
def run_stage(cmd: list[str], log: Path, threads: int | None, progress: Callable[[], str] | None = None,
              every: float = 30.0) -> float:
    """Run one command (cwd = repo root), log its output; return its CPU seconds (user + sys).

    The output goes to ``log``; every ``every`` seconds the console gets one line of progress:
    ``progress()`` if given, else the log's last line (``core.sft`` prints ``step N/M  loss ...``).
    """
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"== {shlex.join(cmd)}  (log: {log})")
    status = progress or (lambda: last_line(log))
    t0 = time.perf_counter()
    shown, next_at = "", t0 + every
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        while True:
            pid, status_code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(min(1.0, every))
            if time.perf_counter() >= next_at:
                next_at += every
                line = status()
                if line and line != shown:
                    say(f"   [{log.stem} {time.perf_counter() - t0:.0f} s] {line}")
                    shown = line
    code = os.waitstatus_to_exitcode(status_code)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit("\n".join(tail) + f"\nstage failed with exit code {code}: {shlex.join(cmd)} (log: {log})")
    say(f"   done in {time.perf_counter() - t0:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} CPU s")
    return usage.ru_utime + usage.ru_stime


def say(line: str) -> None:
    """Print one line in one write: stages run side by side in threads, and their lines must not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def last_line(log: Path, width: int = 160) -> str:
    """The last non-empty line of a log (a progress bar's last state after its carriage returns)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))  # a metrics.jsonl row is a few KB
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.split("\r")[-1].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1][:width] if lines else ""


def grpo_progress(run: Path, steps: int) -> Callable[[], str]:
    """Progress of a GRPO run from its ``metrics.jsonl``: ``step N/M  reward R`` (its console shows no steps)."""
    def status() -> str:
        line = last_line(run / "metrics.jsonl", width=100_000)
        try:
            row = json.loads(line)
        except ValueError:
            return ""
        return f"step {row.get('step')}/{steps}  reward {float(row.get('reward', float('nan'))):.3f}"

    return status


def checkpoints(run: Path) -> list[Path]:
    """``checkpoint-N`` folders of a run, by step."""
    found = [p for p in run.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "config.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def cpu_at_checkpoints(run: Path, arm: str) -> dict[int, float]:
    """Step -> cumulative training CPU seconds at that checkpoint."""
    if arm == "sft":
        rows = [json.loads((c / "cpu_time.json").read_text()) for c in checkpoints(run)
                if (c / "cpu_time.json").is_file()]
        return {int(r["step"]): float(r["cpu_time_s"]) for r in rows}
    total, out = 0.0, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        total += float(row.get("cpu_time_s", row.get("step_time_s", 0.0)))
        out[int(row["step"])] = total
    return {int(c.name.split("-")[-1]): out[int(c.name.split("-")[-1])] for c in checkpoints(run)
            if int(c.name.split("-")[-1]) in out}


# ---- evaluation ----------------------------------------------------------------------------
def evaluate_run(run: Path, points: Sequence[Path], splits: Sequence[str], eval_n: int, batch: int,
                 config: Path, plugins: str, extra: Sequence[str]) -> list[dict[str, Any]]:
    """Acc@0.5 / mean IoU of each checkpoint in ``points`` on each split (greedy), in this process."""
    import torch

    from core.config import build_config, load_raw
    from core.interfaces import RolloutContext
    from core.plugins import PluginHost
    from core.plugins.plan import plan_without_groups
    from core.runtime.evaluator import evaluate
    from core.runtime.loader import load_policy

    cfg = build_config(load_raw(str(config), None), list(extra), source=str(config))
    host = PluginHost(plugins)
    plan = plan_without_groups(cfg, host.registry)
    task = host.registry.create("tasks", cfg.task.name, plan.options["task"])
    data = {s: list(task.load(s)[:eval_n]) for s in splits}
    rows = []
    for ckpt in points:
        bundle = load_policy(plan, host.registry, phase="infer", checkpoint=ckpt, device=torch.device("cpu"))
        engine = host.registry.create("rollouts", cfg.rollout.name, plan.options["rollout"])
        engine.setup(RolloutContext(bundle.model, bundle.processor, bundle.family, torch.device("cpu"),
                                    bundle.suppressed))
        row: dict[str, Any] = {"checkpoint": str(ckpt)}
        for split in splits:
            torch.manual_seed(0)
            res = evaluate(plan, host.registry, bundle, engine, data[split], progress=False,
                           max_new_tokens=cfg.eval.max_new_tokens or cfg.grpo.max_completion_length,
                           batch_size=batch)
            rec = res.summary[cfg.task.name]["rec"]
            row[split] = {"acc@0.5": rec["acc@0.5"], "mean_iou": rec["mean_iou"], "n": rec["n"],
                          "parse_rate": rec["parse_rate"],
                          "distinct_answers": len({r["completion"].text for r in res.records})}
        rows.append(row)
        print(f"   {ckpt}: " + ", ".join(f"{s} {row[s]['acc@0.5']:.3f}" for s in splits), flush=True)
    return rows


# ---- the report ----------------------------------------------------------------------------
def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)``, clamped at the ends (``numpy.interp``)."""
    import numpy as np

    return float(np.interp(x, xs, ys))


def mean_std(vals: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    import statistics

    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """End-of-training and equal-CPU figures per arm and split (mean, std, min, max over seeds)."""
    splits, seeds = results["splits"], results["seeds"]
    out: dict[str, Any] = {"end": {}, "equal_cpu": {}, "equal_cpu_s": {}}
    for seed in seeds:
        runs = results["runs"][str(seed)]
        out["equal_cpu_s"][str(seed)] = min(runs[a]["points"][-1]["cpu_s"] for a in ARMS)
    for arm in ARMS:
        for when in ("end", "equal_cpu"):
            out[when][arm] = {}
            for split in splits:
                for metric in ("acc@0.5", "mean_iou"):
                    vals = []
                    for seed in seeds:
                        pts = results["runs"][str(seed)][arm]["points"]
                        if when == "end":
                            vals.append(pts[-1][split][metric])
                        else:
                            vals.append(interpolate([p["cpu_s"] for p in pts], [p[split][metric] for p in pts],
                                                    out["equal_cpu_s"][str(seed)]))
                    m, s = mean_std(vals)
                    out[when][arm].setdefault(split, {})[metric] = {"mean": m, "std": s, "min": min(vals),
                                                                    "max": max(vals), "values": vals}
    return out


def markdown(results: dict[str, Any], summary: dict[str, Any]) -> str:
    """``results.md``: the setup, the warm start and the two comparison tables."""
    splits, seeds = results["splits"], results["seeds"]
    warm = results["warm_start"]
    lines = [
        "# RL vs SFT on synthetic grounding (in and out of domain)",
        "",
        f"Machine: {results['machine']}; date {results['date']}; command: `{results['command']}`.",
        f"Seeds {', '.join(map(str, seeds))}; {results['eval_n']} images per split, greedy decoding; "
        f"arms: GRPO {results['grpo_steps']} steps vs SFT {results['sft_steps']} steps from the same warm start.",
        "",
        "Warm start (SFT, " + f"{warm['steps']} steps, {warm['cpu_s']:.0f} CPU s): "
        + ", ".join(f"{s} Acc@0.5 {warm['eval'][s]['acc@0.5']:.3f} (IoU {warm['eval'][s]['mean_iou']:.3f})"
                    for s in splits) + ".",
        "",
    ]
    for when, title in (("end", "At the end of training"), ("equal_cpu", "At equal CPU time")):
        extra = ""
        if when == "equal_cpu":
            ts = summary["equal_cpu_s"]
            extra = (" (each seed's curves interpolated at the CPU seconds of the arm that finished first: "
                     + ", ".join(f"seed {k}: {v:.0f} s" for k, v in ts.items()) + ")")
        lines += [f"## {title}{extra}", "",
                  "| split | GRPO Acc@0.5 | SFT Acc@0.5 | Δ (GRPO − SFT) | GRPO mean IoU | SFT mean IoU |",
                  "|---|---|---|---|---|---|"]
        for split in splits:
            g, s = summary[when]["grpo"][split], summary[when]["sft"][split]
            d = g["acc@0.5"]["mean"] - s["acc@0.5"]["mean"]
            lines.append(f"| {split} | {over_seeds(g['acc@0.5'])} | {over_seeds(s['acc@0.5'])} | {d:+.3f} "
                         f"| {over_seeds(g['mean_iou'], ranged=False)} | {over_seeds(s['mean_iou'], ranged=False)} |")
        lines.append("")
    spread = ("Mean ± sample std over seeds, [min, max] across seeds." if len(seeds) > 1
              else "One seed: single values (no spread across seeds to show).")
    lines += [f"{spread} CPU seconds are the training processes' user + system time (evaluation excluded).", ""]
    return "\n".join(lines)


def over_seeds(stats: dict[str, Any], ranged: bool = True) -> str:
    """``mean ± std [min, max]`` over seeds; the bare value when there is one seed (a std of 0 says nothing)."""
    if len(stats["values"]) == 1:
        return f"{stats['mean']:.3f}"
    text = f"{stats['mean']:.3f} ± {stats['std']:.3f}"
    return text + (f" [{stats['min']:.3f}, {stats['max']:.3f}]" if ranged else "")


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy vs CPU seconds, one panel per split, both arms (mean line, min-max band over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits, seeds = results["splits"], results["seeds"]
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.4), squeeze=False)
    colours = {"grpo": "tab:red", "sft": "tab:blue"}
    for ax, split in zip(axes[0], splits, strict=True):
        for arm in ARMS:
            runs = [results["runs"][str(s)][arm]["points"] for s in seeds]
            end = min(r[-1]["cpu_s"] for r in runs)
            grid = [end * i / 40 for i in range(41)]
            curves = [[interpolate([p["cpu_s"] for p in r], [p[split]["acc@0.5"] for p in r], x) for x in grid]
                      for r in runs]
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(grid))]
            ax.plot(grid, mean, color=colours[arm], label=arm.upper())
            ax.fill_between(grid, [min(c[i] for c in curves) for i in range(len(grid))],
                            [max(c[i] for c in curves) for i in range(len(grid))], color=colours[arm], alpha=0.15)
            for r in runs:
                ax.scatter([p["cpu_s"] for p in r], [p[split]["acc@0.5"] for p in r], color=colours[arm], s=8)
        ax.set_title(split)
        ax.set_xlabel("training CPU seconds after the warm start")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Acc@0.5 (greedy)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line --------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/grounding_cpu"))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the two arms (default 0,1,2)")
    p.add_argument("--sft-steps", type=int, default=2500, help="warm-start SFT steps (default 2500)")
    p.add_argument("--grpo-steps", type=int, default=600, help="GRPO steps per seed (default 600)")
    p.add_argument("--points", type=int, default=6, help="evaluation points along each arm (default 6)")
    p.add_argument("--eval-n", type=int, default=200, help="images per split (default 200)")
    p.add_argument("--eval-batch", type=int, default=100, help="prompts per generate call (default 100)")
    p.add_argument("--splits", default=",".join(SPLITS), help=f"splits to evaluate (default {','.join(SPLITS)})")
    p.add_argument("--sft-lr", type=float, default=1e-4, help="learning rate of the SFT arm (default 1e-4, "
                                                              "grpo.yaml's for GRPO)")
    p.add_argument("--extra", default="", help="config overrides for every stage, space-separated")
    p.add_argument("--grpo-extra", default="", help="config overrides for the GRPO arm only")
    p.add_argument("--sft-extra", default="", help="config overrides for the SFT arm only")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each (default 2; 1 = one "
                                                       "at a time with the default thread count)")
    p.add_argument("--plugins", default="qwen-vl,synthetic,grounding")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--progress-every", type=float, default=30.0,
                   help="seconds between progress lines of a running stage on the console (default 30)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the whole experiment and write the report."""
    args = parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not seeds or args.points < 1 or args.grpo_steps < args.points or args.sft_steps < 1:
        raise SystemExit("need at least one seed, --points >= 1, --grpo-steps >= --points and --sft-steps >= 1")
    if args.grpo_steps % args.points:
        raise SystemExit(f"--grpo-steps ({args.grpo_steps}) must be a multiple of --points ({args.points}): the "
                         "checkpoints are evenly spaced and the last one is the final step")
    extra, gextra, sextra = (shlex.split(x) for x in (args.extra, args.grpo_extra, args.sft_extra))
    threads = 1 if args.jobs > 1 else None
    py, plug = args.python, ["--plugins", args.plugins]
    config, grpo_config = HERE / "config.yaml", HERE / "grpo.yaml"
    t_start = time.perf_counter()

    # 1. warm start
    warm = out / "warm_start"
    if not (warm / "sft_state.json").is_file():
        run_stage([py, "-m", "core.sft", "--config", str(config), *plug, "--output-dir", str(warm),
                   f"train.max_steps={args.sft_steps}", *extra], out / "logs" / "warm_start.log", threads,
                  every=args.progress_every)
    warm_state = json.loads((warm / "sft_state.json").read_text())
    sft_cpu_per_step = float(warm_state["cpu_time_s"]) / max(int(warm_state["steps"]), 1)

    # 2a. GRPO arms
    every = max(1, args.grpo_steps // args.points)
    grpo_cmds = []
    for seed in seeds:
        run = out / f"seed{seed}" / "grpo"
        if not (run / "metrics.jsonl").is_file() or not checkpoints(run):
            # The arm's own settings come after --extra, so an override there cannot replace the warm start.
            grpo_cmds.append(([py, "-m", "core.train", "--config", str(grpo_config), *plug, *extra, *gextra,
                               f"model.path={warm}", "model.tiny=null", f"logging.output_dir={run}",
                               f"train.max_steps={args.grpo_steps}", f"train.seed={seed}",
                               f"checkpoint.save_every={every}", f"checkpoint.keep_last={args.points + 1}"],
                              out / "logs" / f"grpo_seed{seed}.log", grpo_progress(run, args.grpo_steps)))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda c: run_stage(c[0], c[1], threads, c[2], args.progress_every), grpo_cmds))
    grpo_cpu = [cpu_at_checkpoints(out / f"seed{s}" / "grpo", "grpo") for s in seeds]
    grpo_total = sum(max(c.values()) for c in grpo_cpu) / len(seeds)

    # 2b. SFT arms: the CPU seconds the GRPO arms spent, at the warm start's CPU seconds per step,
    # rounded to a multiple of --points so the checkpoints are evenly spaced and end at the last step.
    sft_steps = args.points * max(1, round(grpo_total / sft_cpu_per_step / args.points))
    sft_every = sft_steps // args.points
    sft_cmds = []
    for seed in seeds:
        run = out / f"seed{seed}" / "sft"
        if not checkpoints(run):
            sft_cmds.append(([py, "-m", "core.sft", "--config", str(config), *plug, "--output-dir", str(run),
                              "--save-steps", str(sft_every), f"train.learning_rate={args.sft_lr}",
                              "train.lr_scheduler=constant", "train.warmup_steps=0", *extra, *sextra,
                              f"model.path={warm}", "model.tiny=null", f"train.max_steps={sft_steps}",
                              f"train.seed={seed + 1}"],
                             out / "logs" / f"sft_seed{seed}.log"))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda c: run_stage(c[0], c[1], threads, every=args.progress_every), sft_cmds))

    # 3. evaluation (cached per run in evals.json)
    def eval_job(job: tuple[Path, list[Path]]) -> None:
        folder, points = job
        cache = folder / "evals.json"
        if cache.is_file() and [r["checkpoint"] for r in json.loads(cache.read_text())] == [str(p) for p in points]:
            return
        cmd = [py, str(Path(__file__).resolve()), "--_eval-worker", str(folder), *[str(p) for p in points]]
        worker_args = {"splits": splits, "eval_n": args.eval_n, "batch": args.eval_batch, "config": str(config),
                       "plugins": args.plugins, "extra": extra}
        (folder / "eval_args.json").write_text(json.dumps(worker_args))
        run_stage(cmd, out / "logs" / f"eval_{folder.relative_to(out).as_posix().replace('/', '_')}.log", threads,
                  every=args.progress_every)

    jobs = [(warm, [warm])]
    for seed in seeds:
        for arm in ARMS:
            run = out / f"seed{seed}" / arm
            jobs.append((run, checkpoints(run)))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(eval_job, jobs))

    # 4. report
    import platform

    warm_eval = json.loads((warm / "evals.json").read_text())[0]
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "examples/grounding_cpu/rl_vs_sft.py", *(argv if argv is not None
                                                                                  else sys.argv[1:])]),
        "seeds": seeds, "splits": splits, "eval_n": args.eval_n, "grpo_steps": args.grpo_steps,
        "sft_steps": sft_steps,
        "warm_start": {"steps": int(warm_state["steps"]), "cpu_s": float(warm_state["cpu_time_s"]),
                       "eval": {s: warm_eval[s] for s in splits}},
        "runs": {},
    }
    for seed in seeds:
        results["runs"][str(seed)] = {}
        for arm in ARMS:
            run = out / f"seed{seed}" / arm
            cpu = cpu_at_checkpoints(run, arm)
            rows = json.loads((run / "evals.json").read_text())
            pts = [{"step": 0, "cpu_s": 0.0, **{s: warm_eval[s] for s in splits}}]
            for r in rows:
                step = int(Path(r["checkpoint"]).name.split("-")[-1])
                pts.append({"step": step, "cpu_s": cpu[step], **{s: r[s] for s in splits}})
            results["runs"][str(seed)][arm] = {"points": pts}
    summary = summarize(results)
    results["summary"] = summary
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results, summary)
    (out / "results.md").write_text(md)
    plot(results, out / "accuracy_vs_cpu.png")
    print(md)
    print(f"results in {out}/results.md, results.json, accuracy_vs_cpu.png ({results['wall_s']:.0f} s wall)")
    return 0


def _eval_worker(argv: list[str]) -> int:
    folder, points = Path(argv[0]), [Path(p) for p in argv[1:]]
    a = json.loads((folder / "eval_args.json").read_text())
    rows = evaluate_run(folder, points, a["splits"], a["eval_n"], a["batch"], Path(a["config"]), a["plugins"],
                        a["extra"])
    (folder / "evals.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_eval-worker":
        sys.exit(_eval_worker(sys.argv[2:]))
    sys.exit(main())
