"""The README's first command: the embedded default run learns (issue target: chance -> >= 0.9).

Runs ``python -m core.train`` with no config, as ``make quickstart`` does, only redirecting the
output folder and skipping TensorBoard; ~1 minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_learns_from_chance_to_at_least_0_9(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = run_command([sys.executable, "-m", "core.train", f"logging.output_dir={out}", "logging.tensorboard=false",
                        "logging.progress_bar=false"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((out / "eval.json").read_text())
    before, after = result["before"]["accuracy"], result["after"]["accuracy"]
    assert before <= 0.3, result  # chance is 0.25 on the balanced 4-colour eval split
    assert after >= 0.9, result
    assert "eval before training: accuracy" in proc.stdout and "eval after training:" in proc.stdout
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    first = sum(r["rewards/all_match"] for r in rows[:10]) / 10
    last = sum(r["rewards/all_match"] for r in rows[-10:]) / 10
    assert last > first + 0.4, (first, last)
    for key in ("reward", "reward_std", "kl", "clip_ratio", "completion_length", "loss", "lr", "step_time_s"):
        assert key in rows[-1]
    assert (out / "completions.jsonl").stat().st_size > 0
    assert (out / "reward_curve.png").stat().st_size > 0
