"""The GRPO engine end to end on a tiny Qwen2.5-VL built offline, as real processes.

Every run here is ``python -m core.train`` in a subprocess, the way a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_config(tmp: Path, **over) -> Path:
    cfg = {
        "model": {"family": "qwen2_5_vl", "path": str(tmp / "tiny"), "tiny": {"hidden_size": 64, "num_layers": 2}},
        "task": {"name": "synthetic_color", "options": {"num_train": 64, "num_eval": 8}},
        "rewards": [{"name": "default"}, {"name": "all_match"}],
        "grpo": {"num_generations": 4, "max_completion_length": 4, "beta": 0.04},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 8, "max_steps": 4, "seed": 3},
        "logging": {"output_dir": str(tmp / "out"), "tensorboard": True, "progress_bar": False,
                    "log_completions_every": 2},
        "checkpoint": {"save_every": 2, "keep_last": 3},
        "eval": {"num_samples": 8, "reward": "all_match"},
    }
    for key, val in over.items():
        sec, name = key.split("__")
        cfg[sec][name] = val
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, *args: str) -> subprocess.CompletedProcess:
    proc = run_command([sys.executable, "-m", "core.train", "--config", str(config), *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    cfg = write_config(tmp)
    proc = train(cfg)
    return tmp, proc


def test_outputs_are_written(full_run):
    tmp, proc = full_run
    out = tmp / "out"
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "rewards/all_match", "rewards/default", "kl", "clip_ratio",
                "completion_length", "loss", "lr", "step_time_s", "cpu_time_s"):
        assert key in rows[0], key
    assert all(0 < r["cpu_time_s"] for r in rows)  # this process's CPU seconds for the step
    comps = [json.loads(ln) for ln in (out / "completions.jsonl").read_text().splitlines()]
    assert {c["step"] for c in comps} == {1, 2, 4} and all("completion" in c and "reward" in c for c in comps)
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) == {"before", "after"} and 0.0 <= ev["after"]["accuracy"] <= 1.0
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert "eval before training" in proc.stdout and "eval after training" in proc.stdout
    # the backend is printed at start and recorded once in the output folder and in each checkpoint
    assert "backend: single process (cpu)" in proc.stdout.splitlines()
    assert json.loads((out / "backend.json").read_text())["description"] == "single process (cpu)"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["backend"]["name"] == "single" and state["optimizer_per_rank"] is False
    # periodic checkpoints every 2 steps plus the final one; no temporary folder left behind
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]


def test_checkpoint_reloads_with_plain_transformers(full_run):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    tmp, _ = full_run
    ckpt = tmp / "out" / "checkpoint-4"
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    AutoProcessor.from_pretrained(ckpt)
    assert (ckpt / "generation_config.json").is_file()
    saved = weights(ckpt)
    base = weights(tmp / "tiny")
    # training changed the weights
    assert any(not torch.equal(saved[k], base[k]) for k in saved)
    # what loads is exactly what was saved: a load -> save round trip gives identical tensors
    model.save_pretrained(tmp / "resaved")
    again = weights(tmp / "resaved")
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[k], saved[k]) for k in saved)


def test_resume_is_bit_identical(full_run, tmp_path):
    import torch

    ref_tmp, _ = full_run
    # The same run, "crashed" after its step-2 checkpoint: later outputs are gone.
    shutil.copytree(ref_tmp / "tiny", tmp_path / "tiny")
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(ref_tmp / "out" / "checkpoint-2", out / "checkpoint-2")
    lines = (ref_tmp / "out" / "metrics.jsonl").read_text().splitlines()
    # a step-3 line written before the crash, then a line torn by the kill (no newline, cut mid-record)
    (out / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    (out / "completions.jsonl").write_text('{"step": 2, "prompt": "x"}\n{"step": 3, "prom')
    (out / ".checkpoint-4.tmp").mkdir()  # and a half-written checkpoint, which must be ignored
    proc = train(cfg, "--resume")
    assert "resumed from" in proc.stdout
    a, b = weights(ref_tmp / "out" / "checkpoint-4"), weights(out / "checkpoint-4")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    resumed = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(ln) for ln in lines]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for r1, r2 in zip(ref, resumed, strict=True):
        assert r1["reward"] == r2["reward"] and r1["loss"] == r2["loss"]


def test_dry_run_loads_no_weights(tmp_path):
    cfg = write_config(tmp_path)
    proc = run_command([sys.executable, "-m", "core.train", "--config", str(cfg), "--dry-run"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "prompts_per_step" in proc.stdout
    assert not (tmp_path / "tiny").exists()  # the tiny checkpoint was not even built
