"""The built-in ``mixture`` task: weighted train split, per-task evaluation, reward routing, plan checks."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, build_config
from core.interfaces import Completion, RewardBatch, RewardContext, RewardItem, RolloutEngine
from core.plugins import PluginHost
from core.plugins.builtin.mixture import weighted_counts
from core.plugins.plan import make_plan, plan_without_groups
from core.testing import ComponentsPlugin
from core.testing.procs import run_command

PLUGINS = "qwen-vl,synthetic,grounding,text"
ACCURACY = {"name": "accuracy", "options": {"reward_options": {"iou": {"require_answer_tag": False}}}}
ROOT = Path(__file__).resolve().parents[1]
MIX = {"tasks": [{"name": "synthetic_color", "options": {"num_train": 30, "num_eval": 5}, "weight": 3},
                 {"name": "synthetic_grounding", "options": {"num_train": 7, "num_eval": 3, "num_objects": 2},
                  "label": "grounding"}],
       "num_train": 40, "seed": 1}


@pytest.fixture(scope="module")
def registry():
    reg = PluginHost(PLUGINS).registry
    try:
        reg.get("tasks", "synthetic_grounding")
        reg.get("rewards", "iou")
        reg.get("rewards", "all_match")
    except LookupError as exc:
        pytest.skip(f"needs the synthetic, grounding and text plugins: {exc}")
    return reg


def _config(**over) -> dict:
    cfg = {"model": {"path": "/nonexistent"}, "task": {"name": "mixture", "options": MIX},
           "rewards": [ACCURACY], "grpo": {"num_generations": 2}, "train": {"per_device_batch_size": 2}}
    cfg.update(over)
    return cfg


def test_weighted_counts_are_exact():
    assert weighted_counts(40, [3, 1]) == [30, 10]
    assert weighted_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(weighted_counts(1001, [0.2, 0.7, 0.1])) == 1001


def test_train_split_is_weighted_deterministic_and_tagged(registry):
    mix = registry.create("tasks", "mixture", MIX)
    train = mix.load("train")
    assert len(train) == 40
    samples = list(train)
    assert Counter(s.meta["subtask"] for s in samples) == {"synthetic_color": 30, "grounding": 10}
    # A 7-sample task asked for 10 samples cycles through all 7.
    ground = [s for s in samples if s.meta["subtask"] == "grounding"]
    assert {s.id for s in ground} == {f"grounding/synthetic_grounding/train/{i:06d}" for i in range(7)}
    assert all(s.meta["dataset"] == s.meta["subtask"] for s in samples)
    assert {s.reward_method for s in ground} == {"iou"}
    assert all(s.id.startswith("synthetic_color/train/") for s in samples if s.meta["subtask"] == "synthetic_color")
    # Same options, same order (another instance, a pickled copy); another seed, another order.
    again = [s.id for s in registry.create("tasks", "mixture", MIX).load("train")]
    assert again == [s.id for s in samples]
    assert [s.id for s in pickle.loads(pickle.dumps(train))] == again
    other = [s.id for s in registry.create("tasks", "mixture", {**MIX, "seed": 2}).load("train")]
    assert other != again and sorted(other) == sorted(again)
    # The sub-task's own samples are not altered (the mixture tags copies).
    inner = registry.create("tasks", "synthetic_color", MIX["tasks"][0]["options"]).load("train")[0]
    assert "subtask" not in inner.meta and inner.id == "synthetic_color/train/000000"


def test_eval_splits_interleave_every_task_that_has_them(registry):
    mix = registry.create("tasks", "mixture", MIX)
    ev = [s.meta["subtask"] for s in mix.load("eval")]
    assert ev == ["synthetic_color", "grounding"] * 3 + ["synthetic_color"] * 2
    # Only synthetic_grounding has ood_visual: the mixture's ood_visual is its samples alone.
    ood = mix.load("ood_visual")
    assert [s.meta["subtask"] for s in ood] == ["grounding"] * 3
    assert "ood_visual" in mix.splits()
    with pytest.raises(ValueError, match="no task of the mixture has split 'nope'"):
        mix.load("nope")


def test_gold_answers_route_to_each_tasks_reward(registry):
    """The accuracy router scores each row with its own task's reward: gold answers all get 1.0."""
    mix = registry.create("tasks", "mixture", MIX)
    samples = list(mix.load("train"))
    router = registry.create("rewards", "accuracy", {"reward_options": {"iou": {"require_answer_tag": False}}})
    router.setup(RewardContext(registry=registry))
    items = [RewardItem(completion=s.meta["reference_completion"], solution=s.solution, prompt=s.question,
                        reward_method=s.reward_method, image_sizes=s.meta["image_sizes"], meta=s.meta)
             for s in samples]
    assert router.score(RewardBatch(items)) == [1.0] * len(items)
    wrong = [RewardItem(completion="purple" if s.reward_method == "all_match" else "[0, 0, 1, 1]",
                        solution=s.solution, reward_method=s.reward_method, meta=s.meta) for s in samples[:8]]
    assert max(router.score(RewardBatch(wrong))) < 0.5


@pytest.mark.parametrize(("change", "expect"), [
    (lambda m: m["tasks"][1]["options"].update(num_objectz=2), "task.options.tasks.1.options"),
    (lambda m: m["tasks"][0].update(name="synthetic_colour"), "task.options.tasks.0.name"),
    (lambda m: m["tasks"][1].update(label="synthetic_color"), "appear more than once"),
    (lambda m: m["tasks"][0].update(weight=0), "task.options.tasks.0.weight"),
])
def test_plan_checks_every_sub_task(registry, change, expect):
    mix = json.loads(json.dumps(MIX))
    change(mix)
    with pytest.raises(ConfigError) as err:
        make_plan(build_config(_config(task={"name": "mixture", "options": mix})), registry)
    assert expect in str(err.value)


class OracleRollout(RolloutEngine):
    """Answers with pre-set texts, in call order (a model that knows the gold answers)."""

    name = "oracle"
    answers: list[str] = []

    def generate(self, prompts, sampling):
        return [[Completion(ids=[1], text=self.answers.pop(0))] for _ in prompts]


def test_evaluation_reports_each_sub_task(registry, tmp_path):
    from core.runtime.evaluator import eval_line, evaluate, training_result
    from core.runtime.loader import load_policy
    from core.supervised import answer_for

    host = PluginHost(PLUGINS)
    host.register(ComponentsPlugin(OracleRollout), "test-oracle")
    tiny = host.registry.get("models", "qwen2_5_vl").build_tiny_checkpoint(tmp_path / "tiny", seed=0)
    cfg = build_config(_config(model={"path": str(tiny)}, rollout={"name": "oracle"}))
    plan = plan_without_groups(cfg, host.registry)
    bundle = load_policy(plan, host.registry, phase="infer", load_model=False)
    samples = list(host.registry.create("tasks", "mixture", plan.options["task"]).load("eval"))
    from core.runtime.generation import make_prompt

    answers = []
    for i, s in enumerate(samples):
        gold = answer_for(s, bundle.family, bundle.processor, make_prompt(bundle, s).images)
        # Right on every grounding sample, and on 3 of the 5 colour samples.
        answers.append(gold if s.meta["subtask"] == "grounding" or i < 5 else "purple")
    OracleRollout.answers = answers
    engine = OracleRollout()
    result = evaluate(plan, host.registry, bundle, engine, samples, max_new_tokens=8, batch_size=4, progress=False)
    assert result.summary["grounding"]["rec"]["acc@0.5"] == 1.0
    color = result.summary["synthetic_color"]
    (kind,) = color
    assert color[kind]["n"] == 5 and color[kind]["accuracy"] == pytest.approx(3 / 5)
    res = training_result(result)
    assert res["per_dataset"] == {"grounding": {"metric": "rec", "accuracy": 1.0},
                                  "synthetic_color": {"metric": kind, "accuracy": pytest.approx(0.6)}}
    assert "per dataset: grounding 1.0000 (rec), synthetic_color 0.6000" in eval_line("after", res)


def test_sft_targets_and_a_grpo_run_on_a_mixture(tmp_path):
    """``core.sft --show-targets`` gives each task its own target form; ``core.train`` runs and evaluates per task."""
    base = {
        "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "tiny"), "tiny": {"hidden_size": 64, "num_layers": 2}},
        "task": {"name": "mixture", "options": MIX},
        "rewards": [ACCURACY],
        "grpo": {"num_generations": 2, "max_completion_length": 4},
        "train": {"per_device_batch_size": 4, "max_steps": 2, "learning_rate": 1e-4},
        "logging": {"output_dir": str(tmp_path / "out"), "tensorboard": False, "progress_bar": False, "plot": False},
        "checkpoint": {"save_every": 0},
        "eval": {"num_samples": 6, "batch_size": 6, "kl_base": str(tmp_path / "tiny")},
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base))
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def run(*args: str) -> subprocess.CompletedProcess:
        import os

        proc = run_command([sys.executable, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=900)
        assert proc.returncode == 0, ("(generous 900 s limit; the machine may be loaded)\n"
                                      + proc.stdout[-2000:] + proc.stderr[-4000:])
        return proc

    run("-m", "core.train", "--config", str(cfg), "--plugins", PLUGINS)
    ev = json.loads((tmp_path / "out" / "eval.json").read_text())
    for when in ("before", "after"):
        assert set(ev[when]["per_dataset"]) == {"synthetic_color", "grounding"}
        assert ev[when]["datasets"]["grounding"]["rec"]["n"] == 3
        assert ev[when]["kl_to_base"]["completions"] == 6
    assert abs(ev["before"]["kl_to_base"]["per_token"]) < 1e-6  # before training the policy is the base
    proc = run("-m", "core.sft", "--config", str(cfg), "--plugins", PLUGINS, "--show-targets", "12")
    targets = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(targets) == 12
    by_task = {t["id"].split("/")[0]: t["target"] for t in targets}
    assert by_task["synthetic_color"] in ("red", "green", "blue", "yellow")
    assert by_task["grounding"].startswith("[") and by_task["grounding"].count(",") == 3
