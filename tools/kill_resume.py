"""Measure crash safety: kill -9 a real training run at random moments and inside checkpoint re-saves.

``python tools/kill_resume.py [--trials 10] [--seed 0] [--workdir DIR]``

A tiny Qwen2.5-VL (built offline) trains 6 GRPO steps with a checkpoint every 2. The script runs it
once uninterrupted (the reference), then per trial:

- ``random``: SIGKILL at a uniformly random moment of a run (from process start to its end);
- ``writing``: SIGKILL as soon as a checkpoint's temporary folder appears (mid-write);
- ``resave-aside`` / ``resave-swap`` / ``resave-delete``: ``--resume`` on the finished run re-saves
  its final checkpoint; the process SIGKILLs itself right after the old folder is moved aside,
  right after the new one is moved in, or half-way through deleting the old one (os.replace /
  shutil.rmtree are wrapped in the child to hit these exact points; the kill is a real SIGKILL).

After the kill it reruns with ``checkpoint.resume=auto`` until a run exits 0 (at most 3 tries) and
counts the trial a success only if that run needed no hand repair and its final weights and every
step's reward and loss are bit-identical to the reference. Prints ``kill -9 resumes: k/N``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
KINDS = ["random", "random", "writing", "resave-aside", "random", "resave-swap", "random", "resave-delete",
         "writing", "random"]

# Child wrapper: run core.train, SIGKILLing itself at one point of a checkpoint re-save.
CHILD = r"""
import os, shutil, signal, sys, runpy
point = os.environ.get("VLMR1_KILL_POINT", "")
real_replace, real_rmtree = os.replace, shutil.rmtree
def name(p): return os.path.basename(os.fspath(p))
def replace(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if point == "resave-aside" and name(dst).endswith(".old"):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "resave-swap" and name(src).endswith(".tmp") and name(dst).startswith("checkpoint-"):
        os.kill(os.getpid(), signal.SIGKILL)
def rmtree(path, *a, **k):
    if point == "resave-delete" and name(path).endswith(".old"):
        files = sorted(p for p in __import__("pathlib").Path(path).rglob("*") if p.is_file())
        for f in files[: len(files) // 2]:
            f.unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *a, **k)
os.replace, shutil.rmtree = replace, rmtree
sys.argv = ["core.train", *sys.argv[1:]]
runpy.run_module("core.train", run_name="__main__")
"""


def write_config(work: Path, out: Path) -> Path:
    cfg = {
        "plugins": ["qwen-vl", "synthetic", "text"],
        "model": {"family": "qwen2_5_vl", "path": str(work / "tiny"), "tiny": {"hidden_size": 64, "num_layers": 2}},
        "task": {"name": "synthetic_color", "options": {"num_train": 64, "num_eval": 8}},
        "rewards": [{"name": "default"}, {"name": "all_match"}],
        "grpo": {"num_generations": 4, "max_completion_length": 4, "beta": 0.04},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 8, "max_steps": 6, "seed": 3},
        "logging": {"output_dir": str(out), "tensorboard": False, "progress_bar": False, "plot": False,
                    "log_completions_every": 1},
        "checkpoint": {"save_every": 2, "keep_last": 2},
        "eval": {"enabled": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, *args: str, point: str = "") -> subprocess.Popen:
    env = {**ENV, "VLMR1_KILL_POINT": point}
    return subprocess.Popen([sys.executable, "-c", CHILD, "--config", str(config), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def outcome(out: Path) -> tuple[dict, list]:
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return weights, [(r["step"], r["reward"], r["loss"]) for r in rows]


def same(a: tuple[dict, list], b: tuple[dict, list]) -> bool:
    import torch

    wa, ma = a
    wb, mb = b
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and ma == mb


def trial(kind: str, work: Path, i: int, ref_out: Path, ref_time: float, rng: random.Random) -> tuple[bool, str]:
    out = work / f"trial{i}"
    cfg = write_config(work, out)
    if kind.startswith("resave"):
        shutil.copytree(ref_out, out)  # a finished run; --resume re-saves its final checkpoint
        rc, log = finish(start(cfg, "--resume", point=kind))
        killed = rc == -signal.SIGKILL
        what = f"{kind}: killed={killed}"
    else:
        proc = start(cfg)
        if kind == "random":
            delay = rng.uniform(0, ref_time)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()
            what = f"random: kill at {delay:.1f} s"
        else:  # writing: the first moment a checkpoint's temporary folder exists
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                if any(p.name.endswith(".tmp") for p in out.glob(".checkpoint-*")):
                    proc.kill()
                    break
                time.sleep(0.002)
            what = "writing: kill mid-checkpoint"
        rc, log = finish(proc)
        killed = rc == -signal.SIGKILL
        what += f" (killed={killed})"
    runs = 0
    while runs < 3:
        runs += 1
        rc, log = finish(start(cfg, "checkpoint.resume=auto"))
        if rc == 0:
            break
    else:
        return False, f"{what}; resume failed: {log[-800:]}"
    ok = same(outcome(out), outcome(ref_out))
    return ok, f"{what}; resumed in {runs} run(s); {'bit-identical' if ok else 'DIFFERS from the reference'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="default: a temporary folder (deleted at the end)")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vlmr1-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    ref_out = work / "reference"
    t0 = time.time()
    rc, log = finish(start(write_config(work, ref_out)))
    ref_time = time.time() - t0
    if rc != 0:
        print(log[-3000:])
        return 1
    print(f"reference run: {ref_time:.1f} s")
    good = 0
    for i in range(args.trials):
        kind = KINDS[i % len(KINDS)]
        ok, what = trial(kind, work, i, ref_out, ref_time, rng)
        good += ok
        print(f"trial {i + 1}: {'ok ' if ok else 'FAIL'} {what}", flush=True)
    print(f"kill -9 resumes: {good}/{args.trials} bit-identical to the uninterrupted run")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if good == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
