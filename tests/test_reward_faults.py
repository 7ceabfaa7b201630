"""Reward faults a long run meets, at step scale, with the figures docs/reliability.md quotes.

``pytest tests/test_reward_faults.py -s`` prints one line per fault: how many of a step's
completions kept their real score, and what the run did. The last test is a real training run
(``python -m core.train`` on a tiny model) whose judge server is down: it must stop with a
clear message and a non-zero exit instead of training on zeros.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from core.interfaces import Reward, RewardBatch, RewardItem
from core.runtime.reward_runner import RewardError, RewardRunner, RewardSpec
from core.testing import HangsOnce

ROOT = Path(__file__).resolve().parents[1]
N = 32  # completions per step, as in a small real run


def step_batch(poison: set[int] = frozenset()) -> RewardBatch:
    return RewardBatch([RewardItem(completion="poison" if i in poison else f"<answer>{i}</answer>", solution="x")
                        for i in range(N)])


class PoisonRow(Reward):
    name = "poison"

    def score(self, batch):
        if any(it.completion == "poison" for it in batch):
            raise ValueError("unparsable completion")
        return [1.0] * len(batch)


def scored(res) -> int:
    """Completions of the step that kept a real score."""
    return int((~res.failed[:, 0]).sum())


def test_fault_figures():
    lines = []
    # 1. one poisonous row in a step of 32
    res = RewardRunner([RewardSpec("poison", PoisonRow(), 1.0, 5.0, "zero")])(step_batch({7}))
    assert scored(res) == N - 1
    lines.append(f"one raising row in {N}: {scored(res)}/{N} completions keep their score (before: 0/{N})")
    # 2. a call that hangs once (a lost connection), then 19 normal steps
    r = HangsOnce()
    runner = RewardRunner([RewardSpec("judge", r, 1.0, 0.3, "zero")])
    try:
        per_step = [scored(runner(step_batch())) for _ in range(20)]
    finally:
        r.release.set()
    assert per_step[0] == 0 and per_step[1:] == [N] * 19
    lines.append(f"one hung call, then 19 steps: {sum(per_step[1:])}/{19 * N} later completions scored "
                 f"(before: 0/{19 * N}: the reward stayed off)")
    # 3. a reward that fails on most rows for good: the run stops after max_error_steps
    runner = RewardRunner([RewardSpec("poison", PoisonRow(), 1.0, 5.0, "zero", 0.5, 10)])
    steps = 0
    with pytest.raises(RewardError, match="failed on at least 50%"):
        for _ in range(100):
            steps += 1
            runner(step_batch(set(range(20))))
    assert steps == 10
    lines.append(f"20/{N} rows failing every step: run stopped at step {steps} with RewardError "
                 "(before: trained on zeros, exit 0)")
    print("\nreward faults:\n  " + "\n  ".join(lines))


def test_judge_down_stops_a_real_run_with_a_clear_message(tmp_path):
    """The judge's endpoint refuses connections; the run must not train on zeros and exit 0."""
    cfg = {
        "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "tiny"), "tiny": {"hidden_size": 64, "num_layers": 2}},
        "task": {"name": "synthetic_color", "options": {"num_train": 32, "num_eval": 4}},
        "rewards": [{"name": "default"},
                    {"name": "judge", "max_error_steps": 2, "timeout_s": 20,
                     "options": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": None,
                                 "max_retries": 0, "request_timeout_s": 2}}],
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 8, "max_steps": 6, "seed": 3},
        "logging": {"output_dir": str(tmp_path / "out"), "tensorboard": False, "progress_bar": False, "plot": False},
        "checkpoint": {"save_every": 0, "save_final": False},
        "eval": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "core.train", "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "reward 'judge' failed on at least 50% of the completions in each of the last 2 steps" in proc.stderr
    assert "ConnectError" in proc.stderr  # the last failure is named
    print(f"\njudge down: run stopped at step 2 with exit {proc.returncode} in {time.monotonic() - t0:.0f} s")
