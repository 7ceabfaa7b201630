"""Smoke test of the grounding example's pipeline at toy size, in process, with its own configs:
base eval -> SFT -> eval -> GRPO from the SFT checkpoint -> eval. (The whole RL-vs-SFT experiment,
``examples/grounding_cpu/run.sh``, runs in reduced form in ``tests/test_rl_vs_sft.py``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import evaluate, sft, train
from core.plugins import PluginHost
from core.runtime import evaluator

HERE = Path(__file__).resolve().parents[1] / "examples" / "grounding_cpu"
PLUGINS = "qwen-vl,synthetic,grounding"
TOY_MODEL = ["model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.intermediate_size=128"]
TOY_TASK = ["task.options.num_train=16", "task.options.num_eval=3"]


@pytest.fixture(autouse=True)
def _plugins():
    reg = PluginHost(PLUGINS).registry
    try:
        reg.get("models", "qwen2_5_vl")
        reg.get("tasks", "synthetic_grounding")
        reg.get("rewards", "iou")
    except LookupError as exc:
        pytest.skip(f"needs the qwen-vl, synthetic and grounding plugins: {exc}")


def test_grounding_pipeline_at_toy_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the working folder stays in tmp
    cfg, grpo = str(HERE / "config.yaml"), str(HERE / "grpo.yaml")
    base = [f"model.path={tmp_path / 'base'}", *TOY_MODEL, *TOY_TASK]
    ev = ["--plugins", PLUGINS, "--quiet", "--max-new-tokens", "8"]

    assert evaluate.main(["--config", cfg, *ev, "--out", str(tmp_path / "eval_base"), *base]) == 0
    assert (tmp_path / "base" / "config.json").is_file()  # the tiny model was built from model.tiny
    assert sft.main(["--config", cfg, "--plugins", PLUGINS, "--output-dir", str(tmp_path / "sft"), *base,
                     "train.max_steps=3", "train.per_device_batch_size=4", "train.warmup_steps=0"]) == 0
    assert evaluate.main(["--config", cfg, *ev, "--checkpoint", str(tmp_path / "sft"),
                          "--out", str(tmp_path / "eval_sft"), *base]) == 0
    assert train.main(["--config", grpo, "--plugins", PLUGINS, f"model.path={tmp_path / 'sft'}",
                       f"logging.output_dir={tmp_path / 'grpo'}", *TOY_TASK, "train.max_steps=2",
                       "grpo.num_generations=2", "train.per_device_batch_size=4",
                       "grpo.max_completion_length=6"]) == 0
    assert (tmp_path / "grpo" / "checkpoint-2" / "model.safetensors").is_file()
    # --checkpoint on the GRPO output folder takes its newest checkpoint-N.
    assert evaluate.main(["--config", cfg, *ev, "--checkpoint", str(tmp_path / "grpo"),
                          "--out", str(tmp_path / "eval_grpo"), *base]) == 0
    summary = json.loads((tmp_path / "eval_grpo" / "summary.json").read_text())
    assert summary["checkpoint"].endswith("checkpoint-2") and summary["num_samples"] == 3
    assert evaluator.headline(summary) == {"rec": summary["datasets"]["synthetic_grounding"]["rec"]["acc@0.5"]}

