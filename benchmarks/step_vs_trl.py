"""Seconds per GRPO step and peak memory: vlmr1 vs trl.GRPOTrainer, same everything.

    python benchmarks/step_vs_trl.py [--steps 12] [--warmup 2] [--generations 8] [--prompts 4]

Both sides train the same tiny Qwen2.5-VL checkpoint (built offline once), on the same
synthetic colour prompts (same messages, same images), with the same G, completion length,
beta, learning rate, temperature and exact-match reward. Each side runs in its own fresh
process so peak memory (max RSS) is its own; the first ``--warmup`` steps are dropped and
the median of the rest is reported, with the ratio vlmr1 / TRL (below 1 = vlmr1 faster).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def host():
    from core.plugins import PluginHost

    return PluginHost()


def common(args):
    return {"G": args.generations, "prompts": args.prompts, "max_new": args.max_new_tokens, "beta": args.beta,
            "lr": args.lr, "steps": args.steps, "temperature": 1.0}


def run_vlmr1(args, ckpt: str, out: str) -> dict:
    from core.config import build_config
    from core.grpo.trainer import run
    from core.plan import make_plan

    c = common(args)
    raw = {
        "model": {"path": ckpt, "family": "qwen2_5_vl"},
        "task": {"name": "synthetic_color", "options": {"num_train": 256, "num_eval": 8}},
        "rewards": [{"name": "all_match"}],
        "grpo": {"num_generations": c["G"], "max_completion_length": c["max_new"], "beta": c["beta"],
                 "temperature": c["temperature"]},
        "train": {"learning_rate": c["lr"], "per_device_batch_size": c["G"] * c["prompts"], "max_steps": c["steps"],
                  "max_grad_norm": 1.0},
        "logging": {"output_dir": out, "tensorboard": False, "progress_bar": False, "plot": False,
                    "log_completions_every": 0},
        "checkpoint": {"save_final": False},
        "eval": {"enabled": False},
    }
    h = host()
    plan = make_plan(build_config(raw), h.registry)
    run(plan, h.registry)
    rows = [json.loads(ln) for ln in Path(out, "metrics.jsonl").read_text().splitlines()]
    return {"step_times": [r["step_time_s"] for r in rows], "reward": [r["reward"] for r in rows]}


def run_trl(args, ckpt: str, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    c = common(args)
    task = host().registry.create("tasks", "synthetic_color", {"num_train": 256, "num_eval": 8})
    rows = []
    for s in task.load("train"):
        rows.append({"prompt": s.messages, "image": s.load_images()[0], "solution": s.solution})
    ds = Dataset.from_list(rows)

    def exact(completions, solution, **_):
        outs = []
        for comp, sol in zip(completions, solution, strict=True):
            text = comp[0]["content"] if isinstance(comp, list) else comp
            outs.append(1.0 if text.strip().lower() == str(sol).strip().lower() else 0.0)
        return outs

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype="float32")
    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=c["G"] * c["prompts"], num_generations=c["G"],
                     max_completion_length=c["max_new"], beta=c["beta"], learning_rate=c["lr"], max_steps=c["steps"],
                     temperature=c["temperature"], use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     logging_steps=1, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                     weight_decay=0.0, dataloader_num_workers=0, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact], args=cfg, train_dataset=ds, processing_class=processor,
                          callbacks=[Timer()])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"step_times": times, "reward": rewards}


def child(args) -> None:
    fn = run_vlmr1 if args.side == "vlmr1" else run_trl
    with tempfile.TemporaryDirectory() as out:
        res = fn(args, args.ckpt, out)
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--side", choices=["vlmr1", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp, "tiny-qwen2.5-vl"))
        host().registry.get("models", "qwen2_5_vl").build_tiny_checkpoint(ckpt)
        results = {}
        for side in ("vlmr1", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--ckpt", ckpt] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{side} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            results[side] = json.loads(line[len("RESULT "):])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch threads default; "
          f"G={args.generations}, prompts/step={args.prompts}, max_new_tokens={args.max_new_tokens}, "
          f"beta={args.beta}, steps={args.steps} (first {args.warmup} dropped)")
    med = {}
    for side, res in results.items():
        t = res["step_times"][args.warmup:]
        med[side] = statistics.median(t)
        print(f"{side:6s} median s/step {med[side]:.3f}  (min {min(t):.3f}, max {max(t):.3f}, n={len(t)})  "
              f"peak RSS {res['peak_rss_gib']:.2f} GiB")
    print(f"ratio vlmr1/trl: time {med['vlmr1'] / med['trl']:.2f}x, "
          f"peak RSS {results['vlmr1']['peak_rss_gib'] / results['trl']['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
    main()
