"""The benchmark against TRL runs end to end, and its hook counts show the work vlmr1 shares.

Timings are not asserted (they are the benchmark's output, not a test); the per-step work is:
each unique image goes through the vision tower once per pass, each unique prompt is prefilled
once (all its tokens but the last, which generate runs on the G rows), and the training passes
see each prompt once plus every completion, while TRL repeats all of it G times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
G, PROMPTS, NEW = 8, 2, 4


def test_step_vs_trl_counts_and_table(tmp_path):
    report_path = tmp_path / "tiny.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/step_vs_trl.py"), "--config", "tiny", "--generations", str(G),
         "--prompts", str(PROMPTS), "--max-new-tokens", str(NEW), "--steps", "7", "--warmup", "1", "--threads", "1",
         "--json", str(report_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    run = report["runs"]["ckpt_off"]
    ours, trl = run["counts_per_step"]["vlmr1"], run["counts_per_step"]["trl"]

    for p in ("gen", "ref", "train"):
        assert ours[f"vision_images/{p}"] == PROMPTS, ours  # one pass per unique image
        assert trl[f"vision_images/{p}"] == PROMPTS * G, trl
    prompt_len = trl["lm_tokens/gen_prefill"] / (PROMPTS * G)
    assert prompt_len == int(prompt_len) and prompt_len > 10
    assert ours["lm_tokens/gen_prefill"] == PROMPTS * (prompt_len - 1)
    # Training passes: every completion position once; the prompt once per group, not G times.
    completions = trl["lm_tokens/train"] - PROMPTS * G * prompt_len
    assert ours["lm_tokens/train"] == ours["lm_tokens/ref"] == PROMPTS * prompt_len + completions

    table = subprocess.run([sys.executable, str(ROOT / "benchmarks/table.py"), str(report_path)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    row = next(line for line in table.splitlines() if line.startswith("| tiny |"))
    assert f"| tiny | {G} | {NEW} | off |" in row
    assert f"**{run['cpu_paired_median_ratio']:.2f}x**" in row
    assert f"{PROMPTS}/{PROMPTS} img, {ours['lm_tokens/gen_prefill']:.0f}+{ours['lm_tokens/train']:.0f} tok" in row
