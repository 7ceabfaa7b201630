"""Training-mode checks for the GPU run, in one process (one interpreter start, one CUDA context).

    python benchmarks/gpu/steps.py --out DIR --device cuda --ckpt CKPT lora frozen_vision quickstart

``lora`` / ``frozen_vision``: ``--steps`` GRPO steps (default 1) on ``--ckpt`` (the benchmark's
model) with ``train.mode`` set so, bf16 and SDPA on CUDA. ``quickstart``: the CPU quickstart
(``examples/quickstart/config.yaml``) on ``--device``, checked against ``--quickstart-target``
held-out accuracy (``--quickstart-steps`` shortens it; then no target is checked). Each check's
result (ok, seconds, step time, peak GPU memory, accuracy, error) goes to ``DIR/steps.json``;
the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _train(raw: dict[str, Any], overrides: list[str]) -> None:
    from core.config import build_config
    from core.grpo.trainer import run
    from core.plugins import PluginHost
    from core.plugins.plan import make_plan

    h = PluginHost()
    rc = run(make_plan(build_config(raw, overrides), h.registry), h.registry)
    if rc:
        raise RuntimeError(f"core.grpo.trainer.run returned {rc}")


def mode_step(a: argparse.Namespace, mode: str, out: Path) -> dict[str, Any]:
    cuda = a.device == "cuda"
    raw = {
        "model": {"path": a.ckpt, "family": "qwen2_5_vl", "dtype": "bfloat16" if cuda else "float32",
                  "attn_implementation": "sdpa"},
        "task": {"name": "synthetic_color", "options": {"num_train": 64, "num_eval": 8, "image_size": a.image_size}},
        "rewards": [{"name": "all_match"}],
        "grpo": {"num_generations": a.generations, "max_completion_length": a.max_new_tokens, "beta": a.beta},
        "train": {"mode": mode, "learning_rate": 1e-5, "per_device_batch_size": a.generations * a.prompts,
                  "max_steps": a.steps, "gradient_checkpointing": a.gradient_checkpointing},
        "device": {"name": a.device},
        "logging": {"output_dir": str(out), "tensorboard": False, "progress_bar": False, "plot": False,
                    "log_completions_every": 0},
        "checkpoint": {"save_final": False},
        "eval": {"enabled": False},
    }
    _train(raw, [])
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": len(rows), "step_time_s": [r["step_time_s"] for r in rows],
            "loss": [r["loss"] for r in rows], "mem_max_allocated_gib": rows[-1].get("mem_max_allocated_gib")}


def quickstart(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    from core.config import load_raw

    raw = load_raw(ROOT / "examples/quickstart/config.yaml")
    ov = [f"device.name={a.device}", f"logging.output_dir={out}", "logging.progress_bar=false",
          "logging.tensorboard=false", "logging.plot=false", "checkpoint.save_final=false", "checkpoint.save_every=0"]
    if a.quickstart_steps:
        ov += [f"train.max_steps={a.quickstart_steps}", "train.warmup_steps=0", "eval.num_samples=8",
               "eval.batch_size=8", "train.per_device_batch_size=32"]
    _train(raw, ov)
    ev = json.loads((out / "eval.json").read_text())
    res = {"before": ev["before"]["accuracy"], "after": ev["after"]["accuracy"]}
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    res["steps"] = len(rows)
    res["median_step_time_s"] = sorted(r["step_time_s"] for r in rows)[len(rows) // 2]
    if not a.quickstart_steps:
        res["target"] = a.quickstart_target
        if res["after"] < a.quickstart_target:
            raise AssertionError(f"quickstart held-out accuracy {res['after']:.3f} < target {a.quickstart_target}")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checks", nargs="+", choices=["lora", "frozen_vision", "quickstart"])
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--ckpt", help="model for lora / frozen_vision (the benchmark's)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--quickstart-steps", type=int, default=0, help="0 = the full quickstart and its target")
    p.add_argument("--quickstart-target", type=float, default=0.9)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for check in a.checks:
        t = time.perf_counter()
        try:
            if check == "quickstart":
                res = quickstart(a, out / check)
            else:
                if not a.ckpt:
                    raise ValueError(f"check {check} needs --ckpt")
                res = mode_step(a, check, out / check)
            results[check] = {"ok": True, **res}
        except Exception as exc:  # record and go on: one device run should report every check
            results[check] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc()[-4000:]}
        results[check]["wall_s"] = time.perf_counter() - t
        if a.device == "cuda":
            import torch

            results[check]["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        print(f"{check}: {json.dumps({k: v for k, v in results[check].items() if k != 'traceback'})}", flush=True)
        (out / "steps.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
