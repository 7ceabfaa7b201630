"""Seconds per GRPO step and peak memory: vlmr1 vs trl.GRPOTrainer, interleaved, same work.

    python benchmarks/step_vs_trl.py                       # the headline: vision-heavy config
    python benchmarks/step_vs_trl.py --config tiny --grad-ckpt both --steps 9

How the comparison is kept fair:

* Both sides train the same tiny Qwen2.5-VL checkpoint (built offline once per invocation) on
  the same synthetic colour prompts and images, with the same G, prompts per step, completion
  length, beta, learning rate, temperature, gradient clipping and an exact-match reward.
* Gradient checkpointing is set explicitly and equally on both sides (TRL's ``GRPOConfig``
  turns it on by default); ``--grad-ckpt both`` measures both settings.
* Each side runs in its own fresh process (so its peak RSS is its own), and the two processes
  step **strictly alternately**: a side only starts its next step when the parent says so,
  and the other side is blocked meanwhile. Load from other users of the machine then hits both
  sides alike; the parent alternates which side goes first. Threads are pinned
  (``--threads``, default all cores) with ``torch.set_num_threads`` and ``OMP_NUM_THREADS``.
* What is timed is what a user's run costs. vlmr1's side is ``python -m core.train --config
  FILE`` itself (the CLI entry, logging at its defaults: TensorBoard, ``completions.jsonl``
  every 10 steps; no eval, no checkpoints); a step's window runs from before its batch is
  built to after its metrics line is written, so it holds the run's own ``step_time_s`` (data
  preparation, rollout, reward threads, advantages, update, sync, metrics, RSS probe) plus the
  logging after it, both reported. TRL's window is the same: from before the Trainer fetches
  the step's batch to after its ``on_log``.
* The first ``--warmup`` steps are dropped. Reported: per side the median and minimum of the
  measured steps, the **paired-median ratio** (median over steps of vlmr1_i / trl_i, each
  pair taken back to back) and the **ratio of minima**; below 1 = vlmr1 faster / smaller.
  On a shared machine a step's wall time mostly measures who else was running; the process
  CPU time per step (all threads) is far steadier, so its paired-median ratio is printed too.
* Forward hooks count the work each side does per step: images through the vision tower and
  language-model token positions, split into generation, reference and policy training
  passes; ``lm_tokens/gen_prefill`` is the part of generation's spent in prefill calls
  (more than one position per row), i.e. G prompt copies on the plain path and each unique
  prompt once with the rollout's ``shared_prefill``. Mean completion lengths are printed too:
  a random tiny policy rarely emits EOS, so both sides normally generate the full
  ``--max-new-tokens``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Model and task per named config. ``vision`` is the headline: a vision-heavy model where
#: each 224x224 image is 64 merged image tokens and the prompt ~100 tokens.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"tiny": {}, "image_size": 28, "prompt": "What colour is this image?"},
    "vision": {
        "tiny": {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1024,
                 "vision_hidden_size": 128, "vision_depth": 4, "vision_heads": 4, "max_pixels": 224 * 224},
        "image_size": 224,
        "prompt": "Look carefully at the picture and answer with a single word. "
                  "What colour is this image? Choose one of red, green, blue or yellow.",
    },
}


# ---- shared -------------------------------------------------------------------------------
def host():
    from core.plugins import PluginHost

    return PluginHost()


def task_options(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"num_train": 256, "num_eval": 8, "image_size": cfg["image_size"], "prompt": cfg["prompt"]}


class Counter:
    """Forward pre-hooks counting vision-tower images and language-model token positions.

    A pass is ``gen`` (policy, no grad), ``train`` (policy, grad) or ``ref`` (reference model).
    """

    def __init__(self) -> None:
        self.c: dict[str, float] = defaultdict(float)

    def attach(self, model: Any, kind: str) -> None:
        import torch

        for name, mod in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "visual" and name.count(".") <= 2:
                def vis(_m, args, kwargs, _k=kind):
                    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
                    k = _k if _k == "ref" else ("train" if torch.is_grad_enabled() else "gen")
                    self.c[f"vision_images/{k}"] += 0 if grid is None else grid.shape[0]
                mod.register_forward_pre_hook(vis, with_kwargs=True)
            elif leaf == "language_model" and name.count(".") <= 2:
                def lm(_m, args, kwargs, _k=kind):
                    x = kwargs.get("inputs_embeds")
                    if x is None:
                        x = kwargs.get("input_ids", args[0] if args else None)
                    k = _k if _k == "ref" else ("train" if torch.is_grad_enabled() else "gen")
                    self.c[f"lm_calls/{k}"] += 1
                    self.c[f"lm_tokens/{k}"] += 0 if x is None else x.shape[0] * x.shape[1]
                    if k == "gen" and x is not None and x.shape[1] > 1:
                        # A generation call over more than one position per row is a prefill
                        # (decode steps run one): shows whether prompts are prefilled once or G times.
                        self.c["lm_tokens/gen_prefill"] += x.shape[0] * x.shape[1]
                mod.register_forward_pre_hook(lm, with_kwargs=True)

    def take(self) -> dict[str, float]:
        out, self.c = dict(self.c), defaultdict(float)
        return out


class Baton:
    """The child's side of the lock-step protocol: wait for ``GO``, time the step, report it."""

    def __init__(self, free: bool = False) -> None:
        self.counter = Counter()
        self.t0 = self.c0 = 0.0
        self.free = free  # --plain: no parent stepping the sides, the run goes at its own pace
        self.rss0: float | None = None  # RSS (GiB) when the first step starts: imports, models, data loaded

    def begin(self) -> None:
        line = "GO" if self.free else sys.stdin.readline().strip()
        if line != "GO":  # parent said stop (or died): end the run now
            os._exit(0)
        if self.rss0 is None:
            import psutil

            self.rss0 = psutil.Process().memory_info().rss / 2**30
        self.counter.take()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def end(self, extra: dict[str, Any] | None = None) -> None:
        dt, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        rec = {"time": dt, "cpu": cpu, "counts": self.counter.take(), **(extra or {})}
        print("STEP " + json.dumps(rec), flush=True)


# ---- the two sides -------------------------------------------------------------------------
def write_vlmr1_config(args, cfg: dict[str, Any], ckpt: str, run_dir: str, config: Path) -> Path:
    """The vlmr1 side's run config (a user's YAML for ``python -m core.train --config``), written to ``config``."""
    import yaml

    raw = {
        "model": {"path": ckpt, "family": "qwen2_5_vl"},
        "task": {"name": "synthetic_color", "options": task_options(cfg)},
        "rewards": [{"name": "all_match"}],
        "rollout": {"name": "transformers", "options": {"shared_prefill": args.shared_prefill == "on"}},
        "grpo": {"num_generations": args.generations, "max_completion_length": args.max_new_tokens,
                 "beta": args.beta, "temperature": 1.0, "prefix_sharing": args.prefix_sharing == "on"},
        "train": {"learning_rate": args.lr, "per_device_batch_size": args.generations * args.prompts,
                  "max_steps": args.warmup + args.steps, "max_grad_norm": 1.0,
                  "gradient_checkpointing": args.side_ckpt},
        # Logging at a user's defaults (TensorBoard on, completions every 10 steps); no evaluation
        # and no checkpoints, like TRL's side (save_strategy "no", no eval set).
        "logging": {"output_dir": run_dir},
        "device": {"name": "cpu", "options": {"onednn_linear": args.onednn_linear == "on"}},
        "checkpoint": {"save_final": False},
        "eval": {"enabled": False},
    }
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def run_vlmr1(args, cfg: dict[str, Any], ckpt: str, out: str, baton: Baton) -> dict:
    """A user's ``python -m core.train --config FILE`` run (the CLI entry, default logging), lock-stepped.

    The baton waits for ``GO`` where :meth:`GRPOTrainer.fit` creates the step's batch (before
    the trainer's own ``step_time_s`` clock starts) and reports after the step's ``phase_log``:
    the window is the whole loop iteration a user pays for, i.e. ``step_time_s`` (rollout with
    data preparation, rewards on their threads, advantages, update, sync, metrics gathered, RSS
    probe) plus the metrics line, TensorBoard scalars and the ``completions.jsonl`` dump every
    ``logging.log_completions_every`` steps, all at their defaults.
    """
    import core.grpo.trainer as trainer
    from core.train import main as train_main

    run_dir = args.keep_vlmr1_run or str(Path(out, "vlmr1"))
    config = write_vlmr1_config(args, cfg, ckpt, run_dir, Path(out, "bench_config.yaml"))

    real_batch, load_models, phase_log = trainer.StepBatch, trainer.GRPOTrainer.load_models, \
        trainer.GRPOTrainer.phase_log

    def step_batch(step: int):
        baton.begin()  # before fit starts its step_time_s clock
        return real_batch(step)

    def counted_load_models(self):
        bundle = load_models(self)
        baton.counter.attach(bundle.model, "policy")
        if bundle.ref_model is not None:
            baton.counter.attach(bundle.ref_model, "ref")
        return bundle

    def timed_phase_log(self, batch, metrics):
        phase_log(self, batch, metrics)
        baton.end({"completion_length": metrics.get("completion_length"), "step_time_s": metrics["step_time_s"],
                   "timings": {k: v for k, v in metrics.items() if k.startswith("timing/")}})

    trainer.StepBatch = step_batch
    trainer.GRPOTrainer.load_models = counted_load_models
    trainer.GRPOTrainer.phase_log = timed_phase_log
    rc = train_main(["--config", str(config)])
    if rc:
        sys.exit(f"vlmr1 side: python -m core.train exited {rc}")
    return {}


def run_trl(args, cfg: dict[str, Any], ckpt: str, out: str, baton: Baton) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    task = host().registry.create("tasks", "synthetic_color", task_options(cfg))
    ds = Dataset.from_list([{"prompt": s.messages, "image": s.load_images()[0], "solution": s.solution}
                            for s in task.load("train")])

    def exact(completions, solution, **_):
        outs = []
        for comp, sol in zip(completions, solution, strict=True):
            text = comp[0]["content"] if isinstance(comp, list) else comp
            outs.append(1.0 if text.strip().lower() == str(sol).strip().lower() else 0.0)
        return outs

    class Lockstep(TrainerCallback):
        """The same window as vlmr1's: from before the step's batch is fetched to after its log line.

        The Trainer fetches a step's batch before ``on_step_begin`` and logs after ``on_step_end``,
        so the baton waits at the start of training and after each step's ``on_log``.
        """

        open = False

        def on_train_begin(self, *a, **k):
            baton.begin()
            self.open = True

        def on_log(self, a, state, control, **k):
            if not self.open:  # the end-of-training summary line
                return
            baton.end()
            self.open = state.global_step < state.max_steps
            if self.open:
                baton.begin()

    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype="float32")
    gc = GRPOConfig(output_dir=out, per_device_train_batch_size=args.generations * args.prompts,
                    num_generations=args.generations, max_completion_length=args.max_new_tokens, beta=args.beta,
                    learning_rate=args.lr, max_steps=args.warmup + args.steps, temperature=1.0, use_cpu=True,
                    bf16=False, report_to="none", save_strategy="no", logging_steps=1, lr_scheduler_type="constant",
                    warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, dataloader_num_workers=0, seed=0,
                    gradient_checkpointing=args.side_ckpt)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact], args=gc, train_dataset=ds, processing_class=processor,
                          callbacks=[Lockstep()])
    if args.trl_onednn_linear == "on":  # kernels matched: the CPU device's oneDNN linears on TRL's models too
        from core.plugins.builtin.onednn import use_onednn_linears

        for m in (trainer.model, getattr(trainer, "ref_model", None)):
            if m is not None:
                use_onednn_linears(m)
    baton.counter.attach(trainer.model, "policy")
    if getattr(trainer, "ref_model", None) is not None:
        baton.counter.attach(trainer.ref_model, "ref")
    trainer.train()
    return {"completion_length": [h["completions/mean_length"] for h in trainer.state.log_history
                                  if "completions/mean_length" in h]}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    baton = Baton(free=args.plain_side)
    print("READY", flush=True)
    fn = run_vlmr1 if args.side == "vlmr1" else run_trl
    with tempfile.TemporaryDirectory() as out:
        res = fn(args, cfg, args.ckpt, out, baton)
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res["rss_before_first_step_gib"] = baton.rss0
    print("RESULT " + json.dumps(res), flush=True)


# ---- the parent ----------------------------------------------------------------------------
def _read(proc: subprocess.Popen, prefix: str, side: str) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            sys.exit(f"{side} side exited (rc {proc.returncode}) before sending {prefix.strip()}; "
                     f"see its stderr above")
        if line.startswith(prefix):
            return json.loads(line[len(prefix):]) if line[len(prefix):].strip() else {}


def side_cmd(args, side: str, ckpt: str, ckpt_on: bool) -> list[str]:
    """The command line of one side's child process."""
    cmd = [sys.executable, __file__, "--side", side, "--ckpt", ckpt, "--config", args.config,
           "--side-ckpt", str(int(ckpt_on)), "--threads", str(args.threads), "--generations",
           str(args.generations), "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
           "--beta", str(args.beta), "--lr", str(args.lr), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--prefix-sharing", args.prefix_sharing, "--shared-prefill", args.shared_prefill,
           "--onednn-linear", args.onednn_linear, "--trl-onednn-linear", args.trl_onednn_linear]
    if side == "vlmr1" and args.keep_vlmr1_run:
        cmd += ["--keep-vlmr1-run", str(Path(args.keep_vlmr1_run, "ckpt_on" if ckpt_on else "ckpt_off"))]
    return cmd


def _env(args) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


def measure_plain(args, ckpt: str, tmp: str) -> dict:
    """``--plain N``: the independent harness: N pairs of whole runs, one process at a time, alternating.

    vlmr1's run is a plain ``python -m core.train --config FILE`` (the same config file as the
    lock-step side), timed by its own ``metrics.jsonl`` ``step_time_s``; TRL's is this script's
    TRL child without a parent stepping it (its window as in the lock-step runs: batch fetch to
    log line). Each run's median over its steps after ``--warmup``; the ratio per pair, then the
    median over pairs. Nothing runs beside a run, so unlike the lock-step runs each side has the
    machine (and its caches) to itself between its own steps: the two harnesses' ratios should
    agree (issue 23 asks within 0.05) and where they do not, that difference is the harness's.
    """
    env = _env(args)
    med: dict[str, list[float]] = {"vlmr1": [], "trl": []}
    for i in range(args.plain):
        for side in (("vlmr1", "trl") if i % 2 == 0 else ("trl", "vlmr1")):
            if side == "vlmr1":
                run_dir = Path(tmp, f"plain_vlmr1_{i}")
                config = write_vlmr1_config(args, CONFIGS[args.config], ckpt, str(run_dir),
                                            Path(tmp, f"plain_vlmr1_{i}.yaml"))
                proc = subprocess.run([sys.executable, "-m", "core.train", "--config", str(config)], env=env,
                                      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode:
                    sys.exit(f"plain vlmr1 run exited {proc.returncode}: {proc.stderr[-2000:]}")
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                times = [r["step_time_s"] for r in rows if "step_time_s" in r]
            else:
                proc = subprocess.run([*side_cmd(args, "trl", ckpt, False), "--plain-side"], env=env,
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"plain TRL run exited {proc.returncode}: {proc.stderr[-2000:]}")
                times = [json.loads(line[5:])["time"] for line in proc.stdout.splitlines()
                         if line.startswith("STEP ")]
            measured = times[args.warmup:]
            if len(measured) != args.steps:
                sys.exit(f"plain {side} run logged {len(times)} steps, expected {args.warmup + args.steps}")
            med[side].append(statistics.median(measured))
            print(f"  plain run {i + 1}/{args.plain} {side}: median {med[side][-1]:.2f} s/step", file=sys.stderr,
                  flush=True)
    ratios = [a / b for a, b in zip(med["vlmr1"], med["trl"], strict=True)]
    return {"pairs": args.plain, "median_s": med, "ratios": ratios, "median_ratio": statistics.median(ratios)}


def measure(args, ckpt: str, ckpt_on: bool) -> dict:
    """One lock-step run of both sides with gradient checkpointing ``ckpt_on``."""
    env = _env(args)
    procs = {}
    for side in ("vlmr1", "trl"):
        cmd = side_cmd(args, side, ckpt, ckpt_on)
        procs[side] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr,
                                       text=True, bufsize=1, env=env)
        _read(procs[side], "READY", side)
    steps: dict[str, list[dict]] = {"vlmr1": [], "trl": []}
    for i in range(args.warmup + args.steps):
        order = ("vlmr1", "trl") if i % 2 == 0 else ("trl", "vlmr1")
        for side in order:
            procs[side].stdin.write("GO\n")
            procs[side].stdin.flush()
            steps[side].append(_read(procs[side], "STEP ", side))
            print(f"  step {i + 1}/{args.warmup + args.steps} {side}: {steps[side][-1]['time']:.2f} s "
                  f"(CPU {steps[side][-1]['cpu']:.2f} s)", file=sys.stderr, flush=True)
    results = {}
    for side, proc in procs.items():
        proc.stdin.close()  # no further GO: the loop has ended its last step already
        results[side] = _read(proc, "RESULT ", side)
        proc.wait()
    return {"steps": steps, "results": results}


def summarise(args, run: dict) -> dict:
    w = args.warmup
    t = {s: [x["time"] for x in run["steps"][s][w:]] for s in ("vlmr1", "trl")}
    cpu = {s: [x["cpu"] for x in run["steps"][s][w:]] for s in ("vlmr1", "trl")}
    pairs = [a / b for a, b in zip(t["vlmr1"], t["trl"], strict=True)]
    cpu_pairs = [a / b for a, b in zip(cpu["vlmr1"], cpu["trl"], strict=True)]
    counts = {}
    for s in ("vlmr1", "trl"):
        keys = sorted({k for x in run["steps"][s][w:] for k in x["counts"]})
        counts[s] = {k: statistics.mean(x["counts"].get(k, 0.0) for x in run["steps"][s][w:]) for k in keys}
    lens = {
        "vlmr1": statistics.mean(x["completion_length"] for x in run["steps"]["vlmr1"][w:]),
        "trl": statistics.mean(run["results"]["trl"]["completion_length"][w:] or [float("nan")]),
    }
    rss = {s: run["results"][s]["peak_rss_gib"] for s in ("vlmr1", "trl")}
    # what training adds: peak RSS above the RSS when the first step starts (torch, the libraries and
    # the models are resident by then on both sides; ~0.5 GiB of it is torch's own import)
    rss0 = {s: run["results"][s].get("rss_before_first_step_gib") for s in ("vlmr1", "trl")}
    ours = run["steps"]["vlmr1"][w:]
    # What the run's own metrics.jsonl says (step_time_s, timing/<phase>_s) vs the baton's window.
    phases = sorted({k for x in ours for k in x.get("timings", {})})
    return {
        "median_s": {s: statistics.median(v) for s, v in t.items()},
        "min_s": {s: min(v) for s, v in t.items()},
        "paired_median_ratio": statistics.median(pairs),
        "ratio_of_minima": min(t["vlmr1"]) / min(t["trl"]),
        "cpu_median_s": {s: statistics.median(v) for s, v in cpu.items()},
        "cpu_paired_median_ratio": statistics.median(cpu_pairs),
        "peak_rss_gib": rss,
        "rss_ratio": rss["vlmr1"] / rss["trl"],
        "rss_before_first_step_gib": rss0,
        "rss_growth_ratio": ((rss["vlmr1"] - rss0["vlmr1"]) / (rss["trl"] - rss0["trl"])
                             if None not in rss0.values() else None),
        "completion_length": lens,
        "counts_per_step": counts,
        "vlmr1_step_time_s_median": statistics.median(x["step_time_s"] for x in ours),
        "vlmr1_outside_step_time_s_median": statistics.median(x["time"] - x["step_time_s"] for x in ours),
        "vlmr1_timing_median_s": {k: statistics.median(x["timings"].get(k, 0.0) for x in ours) for k in phases},
        "step_times": t,
        "step_cpu_times": cpu,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="vision")
    p.add_argument("--steps", type=int, default=7, help="measured steps per side (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--grad-ckpt", choices=["off", "on", "both"], default="off")
    p.add_argument("--prefix-sharing", choices=["on", "off"], default="on",
                   help="vlmr1's grpo.prefix_sharing (off = the plain one-row-per-completion training passes)")
    p.add_argument("--shared-prefill", choices=["on", "off"], default="on",
                   help="vlmr1's rollout.options.shared_prefill (off = generate prefills each prompt G times)")
    p.add_argument("--onednn-linear", choices=["on", "off"], default="on",
                   help="vlmr1's device.options.onednn_linear (off = PyTorch's own MKL linears, as TRL's side)")
    p.add_argument("--trl-onednn-linear", choices=["on", "off"], default="off",
                   help="on = TRL's policy and reference models get the same oneDNN linears as vlmr1 (kernels "
                        "matched: the ratio then measures the engine alone)")
    p.add_argument("--json", help="also write the full results here")
    p.add_argument("--keep-vlmr1-run", metavar="DIR",
                   help="keep vlmr1's output folders (DIR/ckpt_off|ckpt_on: metrics.jsonl, config.yaml) and the "
                        "tiny checkpoint (DIR/tiny-qwen2.5-vl) here instead of in a temporary folder")
    p.add_argument("--plain", type=int, default=0, metavar="N",
                   help="also time N pairs of whole plain runs, one process at a time, alternating (vlmr1: "
                        "python -m core.train timed by its metrics.jsonl step_time_s), checkpointing off")
    p.add_argument("--side", choices=["vlmr1", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--plain-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side-ckpt", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.side_ckpt = bool(args.side_ckpt)
    if args.side:
        child(args)
        return
    import torch

    settings = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), load avg {os.getloadavg()[0]:.1f} at start",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, "benchmarks/step_vs_trl.py", *sys.argv[1:]]),
        "config": args.config, "threads": args.threads, "G": args.generations, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "beta": args.beta, "steps": args.steps, "warmup": args.warmup,
        "prefix_sharing": args.prefix_sharing, "shared_prefill": args.shared_prefill,
        "onednn_linear": args.onednn_linear, "trl_onednn_linear": args.trl_onednn_linear,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        # Kept with the vlmr1 run when asked, so its config.yaml can be replayed with core.train.
        ckpt = str(Path(args.keep_vlmr1_run or tmp, "tiny-qwen2.5-vl").resolve())
        host().registry.get("models", "qwen2_5_vl").build_tiny_checkpoint(ckpt, **CONFIGS[args.config]["tiny"])
        for on in settings:
            report["runs"]["ckpt_on" if on else "ckpt_off"] = summarise(args, measure(args, ckpt, on))
        if args.plain:
            report["plain"] = measure_plain(args, ckpt, tmp)
    print(f"{report['date']}  {report['machine']}  torch {report['torch']}  threads {args.threads}")
    print(f"config {args.config}: G={args.generations}, prompts/step={args.prompts}, "
          f"max_new_tokens={args.max_new_tokens}, beta={args.beta}, vlmr1 prefix_sharing {args.prefix_sharing}, "
          f"shared_prefill {args.shared_prefill}, oneDNN linears: vlmr1 {args.onednn_linear}, TRL "
          f"{args.trl_onednn_linear}; {args.steps} measured steps "
          f"after {args.warmup} warm-up, sides stepping alternately")
    for name, r in report["runs"].items():
        print(f"\n[gradient checkpointing {'on' if name == 'ckpt_on' else 'off'} on both sides]")
        for s in ("vlmr1", "trl"):
            c = r["counts_per_step"][s]
            work = ", ".join(f"{k} {v:g}" for k, v in c.items())
            print(f"  {s:5s} median {r['median_s'][s]:.3f} s/step (min {r['min_s'][s]:.3f}, "
                  f"CPU {r['cpu_median_s'][s]:.2f} s)  "
                  f"peak RSS {r['peak_rss_gib'][s]:.2f} GiB  mean completion {r['completion_length'][s]:.1f} tokens")
            print(f"        per step: {work}")
        ph = ", ".join(f"{k.removeprefix('timing/').removesuffix('_s')} {v:.3f}"
                       for k, v in r["vlmr1_timing_median_s"].items())
        print(f"  vlmr1 metrics.jsonl: step_time_s median {r['vlmr1_step_time_s_median']:.3f} s ({ph}); "
              f"outside it (log line, TensorBoard, completions dump) {r['vlmr1_outside_step_time_s_median']:.3f} s")
        print(f"  vlmr1/trl: paired-median time ratio {r['paired_median_ratio']:.2f}x, ratio of minima "
              f"{r['ratio_of_minima']:.2f}x, paired-median CPU-time ratio {r['cpu_paired_median_ratio']:.2f}x, "
              f"peak RSS {r['rss_ratio']:.2f}x")
        if r.get("rss_growth_ratio") is not None:
            r0 = r["rss_before_first_step_gib"]
            print(f"  RSS when the first step starts: vlmr1 {r0['vlmr1']:.2f} GiB, TRL {r0['trl']:.2f} GiB; peak above "
                  f"it (what training adds): vlmr1/trl {r['rss_growth_ratio']:.2f}x")
    if args.plain:
        pl = report["plain"]
        lock = report["runs"].get("ckpt_off", {}).get("paired_median_ratio")
        print(f"\n[plain runs: {pl['pairs']} pairs of whole runs, one process at a time, alternating; checkpointing "
              f"off]\n  vlmr1 (python -m core.train, step_time_s) median s/step per run: "
              f"{', '.join(f'{x:.2f}' for x in pl['median_s']['vlmr1'])}\n  TRL median s/step per run: "
              f"{', '.join(f'{x:.2f}' for x in pl['median_s']['trl'])}\n  vlmr1/trl per pair: "
              f"{', '.join(f'{x:.3f}' for x in pl['ratios'])}; median {pl['median_ratio']:.2f}x"
              + (f" (lock-step: {lock:.2f}x; difference {pl['median_ratio'] - lock:+.2f})" if lock else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
