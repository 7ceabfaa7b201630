"""The benchmark against TRL runs end to end, and its hook counts show the work vlmr1 shares.

Timings are not asserted (they are the benchmark's output, not a test); the per-step work is:
each unique image goes through the vision tower once per pass, each unique prompt is prefilled
once (all its tokens but the last, which generate runs on the G rows), and the training passes
see each prompt once plus every completion, while TRL repeats all of it G times.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
G, PROMPTS, NEW = 8, 2, 4


def test_step_vs_trl_counts_and_table(tmp_path):
    report_path = tmp_path / "tiny.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_command(
        [sys.executable, str(ROOT / "benchmarks/step_vs_trl.py"), "--config", "tiny", "--generations", str(G),
         "--prompts", str(PROMPTS), "--max-new-tokens", str(NEW), "--steps", "7", "--warmup", "1", "--threads", "1",
         "--json", str(report_path), "--keep-vlmr1-run", str(tmp_path / "vlmr1"), "--plain", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    run = report["runs"]["ckpt_off"]
    ours, trl = run["counts_per_step"]["vlmr1"], run["counts_per_step"]["trl"]
    # --plain: one pair of whole runs, each timed over its 7 steps after the warm-up, and the ratio.
    plain = report["plain"]
    assert plain["pairs"] == 1 and len(plain["ratios"]) == 1 and plain["median_ratio"] > 0
    assert plain["median_ratio"] == plain["median_s"]["vlmr1"][0] / plain["median_s"]["trl"][0]
    assert "plain runs: 1 pairs" in proc.stdout

    for p in ("gen", "ref", "train"):
        assert ours[f"vision_images/{p}"] == PROMPTS, ours  # one pass per unique image
        assert trl[f"vision_images/{p}"] == PROMPTS * G, trl
    prompt_len = trl["lm_tokens/gen_prefill"] / (PROMPTS * G)
    assert prompt_len == int(prompt_len) and prompt_len > 10
    assert ours["lm_tokens/gen_prefill"] == PROMPTS * (prompt_len - 1)
    # Training passes: every completion position once; the prompt once per group, not G times.
    completions = trl["lm_tokens/train"] - PROMPTS * G * prompt_len
    assert ours["lm_tokens/train"] == ours["lm_tokens/ref"] == PROMPTS * prompt_len + completions

    table = run_command([sys.executable, str(ROOT / "benchmarks/table.py"), str(report_path)],
                        capture_output=True, text=True, timeout=120, check=True).stdout
    row = next(line for line in table.splitlines() if line.startswith("| tiny |"))
    assert f"| tiny | {G} | {NEW} | off |" in row
    assert f"**{run['cpu_paired_median_ratio']:.2f}x**" in row
    assert f"{PROMPTS}/{PROMPTS} img, {ours['lm_tokens/gen_prefill']:.0f}+{ours['lm_tokens/train']:.0f} tok" in row

    # The vlmr1 side is a user's core.train run: replaying the config it wrote with a plain
    # `python -m core.train` gives the same phases (metrics keys, timing/<phase>_s included)
    # and, single-threaded with the same seed, the same steps (rewards, lengths, losses).
    bench_run = tmp_path / "vlmr1" / "ckpt_off"
    plain = run_command([sys.executable, "-m", "core.train", "--config", str(bench_run / "config.yaml"),
                         f"logging.output_dir={tmp_path / 'plain'}"],
                        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert plain.returncode == 0, plain.stderr[-4000:]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("vlmr1/ckpt_off", "plain")}
    bench_rows, plain_rows = rows["vlmr1/ckpt_off"], rows["plain"]
    assert len(bench_rows) == len(plain_rows) == 8
    for b, q in zip(bench_rows, plain_rows, strict=True):
        assert set(b) == set(q), set(b) ^ set(q)
        assert {k for k in b if k.startswith("timing/")} >= {f"timing/{p}_s" for p in
                                                            ("rollout", "rewards", "advantages", "update", "sync")}
        for k in ("reward", "completion_length", "loss", "kl"):
            assert b[k] == q[k], (k, b["step"], b[k], q[k])
    # The benchmark's window holds the run's own step_time_s (and the logging after it).
    measured = run["step_times"]["vlmr1"]
    own = [r["step_time_s"] for r in bench_rows[1:]]
    assert all(m >= o for m, o in zip(measured, own, strict=True)), (measured, own)
    assert run["vlmr1_step_time_s_median"] > 0 and run["vlmr1_outside_step_time_s_median"] >= 0


def test_roofline_counts_every_phase(tmp_path):
    """benchmarks/roofline.py: FLOPs counted per phase, backward included, on a replay with the same tokens."""
    out = tmp_path / "roofline.json"
    proc = run_command([sys.executable, str(ROOT / "benchmarks/roofline.py"), "--config", "tiny", "--generations",
                        str(G), "--prompts", str(PROMPTS), "--max-new-tokens", str(NEW), "--repeats", "1",
                        "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rep = json.loads(out.read_text())
    ph = rep["phases"]
    assert rep["counted_step_same_tokens"] is True
    assert rep["peak_flop_per_s"] > 0 and rep["bandwidth_bytes_per_s"] > 0
    for name in ("prefill", "decode", "reference", "policy fwd+bwd"):
        assert ph[name]["flops"] > 0 and ph[name]["s"] > 0, (name, ph[name])
    # Attention is counted (CPU SDPA is registered by the script), forward and backward.
    ops = rep["counted_flops_by_op"]
    assert any("flash_attention_for_cpu_backward" in op for op in ops), ops
    # The policy's forward + backward is ~3x the reference's forward over the same packed rows.
    assert ph["policy fwd+bwd"]["tokens"] == ph["reference"]["tokens"] > 0
    assert 2.5 < ph["policy fwd+bwd"]["flops"] / ph["reference"]["flops"] < 3.5, ph
    # Decode: one position per row per step, G * prompts rows for NEW steps (shared prefill hands the
    # last prompt token to generate's first step); its bytes estimate is there.
    assert ph["decode"]["tokens"] == G * PROMPTS * NEW
    assert ph["decode"]["bytes"] > 0 and ph["optimizer"]["bytes"] > 0
    assert ph["prefill"]["tokens"] > 0 and ph["step"]["flops"] >= ph["prefill"]["flops"] + ph["decode"]["flops"]
    # The decode-shaped matmul ceiling: the decode's row count, every language-model linear (7 per
    # layer in Qwen2.5-VL: q, k, v, o, gate, up, down) plus the output head, none of the vision tower's.
    ceiling = rep["decode_matmul_ceiling"]
    assert ceiling["rows"] == G * PROMPTS and ceiling["flop_per_s"] > 0
    assert ceiling["linears"] == 2 * 7 + 1  # the tiny config's 2 layers (TinySpec's default) + the head
