"""Smoke test of the grounding example's pipeline at toy size, in process, with its own configs:
base eval -> SFT -> eval -> GRPO from the SFT checkpoint -> eval -> the comparison table.
(The real experiment, ``examples/grounding_cpu/run.sh``, takes minutes and is not part of the suite.)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from core import evaluate, sft, train
from core.plugins import PluginHost

HERE = Path(__file__).resolve().parents[1] / "examples" / "grounding_cpu"
PLUGINS = "qwen-vl,synthetic,grounding"
TOY_MODEL = ["model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.intermediate_size=128"]
TOY_TASK = ["task.options.num_train=16", "task.options.num_eval=3"]


def _compare():
    spec = importlib.util.spec_from_file_location("grounding_compare", HERE / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    assert evaluate.headline(summary) == {"rec": summary["datasets"]["synthetic_grounding"]["rec"]["acc@0.5"]}

    # The comparison table over the stages (CPU seconds as run.sh records them).
    times = tmp_path / "times"
    times.mkdir()
    (times / "sft").write_text("8.0 2.0 12.0\n")   # 10 CPU s for 3 steps
    (times / "grpo").write_text("15.0 1.0 20.0\n")  # 16 CPU s -> 4.8 SFT steps
    compare = _compare()
    assert compare.equal_steps(tmp_path) == 5
    md = compare.table(tmp_path)
    lines = md.splitlines()
    assert lines[2] == "| | base | SFT | SFT + GRPO |"
    assert lines[-2] == "| training steps | 0 | 3 | 3 + 2 |"
    assert lines[-1] == "| training CPU seconds | 0 | 10 | 26 |"
    acc = [json.loads((tmp_path / f / "summary.json").read_text())["datasets"]["synthetic_grounding"]["rec"]["acc@0.5"]
           for f in ("eval_base", "eval_sft", "eval_grpo")]
    assert lines[4] == "| Acc@0.5 (greedy) | " + " | ".join(f"{a:.3f}" for a in acc) + " |"
