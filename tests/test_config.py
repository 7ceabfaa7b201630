"""Run config: YAML + dotted overrides, error messages, batch arithmetic, plan validation."""

import textwrap
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from core.config import ConfigError, RunConfig, build_config, load_raw, markdown_reference, parse_overrides, to_yaml
from core.interfaces import Device, Reward, TaskFormat
from core.plugins.plan import make_plan
from core.testing import make_sample

BASE = {"model": {"path": "/no/such/checkpoint"}, "task": {"name": "toy"}, "rewards": [{"name": "match"}],
        "grpo": {"num_generations": 2}, "train": {"per_device_batch_size": 2}}


class ToyTask(TaskFormat):
    name = "toy"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        split_size: int = Field(4, ge=1)
        layout: Literal["single", "pair"] = "single"

    def load(self, split="train"):
        return [make_sample(id=f"{split}-{i}") for i in range(self.options.split_size)]


class MatchReward(Reward):
    name = "match"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        ignore_case: bool = True

    def score(self, batch):
        return [float(i.completion == i.solution) for i in batch]


class FastDevice(Device):
    name = "fast"
    priority = 5

    def supported_dtypes(self):
        return ["float32", "float16"]


class MissingDevice(Device):
    name = "missing"
    priority = 10

    def available(self):
        return False, "no such hardware in this test"


@pytest.fixture
def registry(register_plugin):
    return register_plugin(ToyTask, MatchReward, FastDevice, MissingDevice, distribution="vlmr1-plugin-toy").registry


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        fn(*args, **kw)
    return str(exc.value)


# ---- YAML + overrides -------------------------------------------------------------------
def test_yaml_file_plus_dotted_overrides(tmp_path):
    path = write(tmp_path, """
        model: {path: /ckpt}
        task: {name: toy, options: {split_size: 3}}
        rewards:
          - name: match
            weight: 0.5
            options: {ignore_case: false, threshold: 1e-3}
        train:
          learning_rate: 1e-6
    """)
    cfg = build_config(load_raw(path), ["train.learning_rate=1e-5", "rewards.0.weight=2", "rewards.1.name=format",
                                        "rewards.1.options={min_len: 3}", "grpo.num_generations=4",
                                        "task.options.split_size=7", "plugins=toy,math", "model.dtype=bfloat16"])
    assert cfg.train.learning_rate == 1e-5 and isinstance(cfg.train.learning_rate, float)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("match", 2.0), ("format", 1.0)]
    assert cfg.rewards[1].options == {"min_len": 3}
    # YAML 1.2 floats: `1e-3` inside a free-form options block is a number, not the string "1e-3".
    assert cfg.rewards[0].options == {"ignore_case": False, "threshold": 0.001}
    assert cfg.task.options == {"split_size": 7}
    assert cfg.grpo.num_generations == 4
    assert cfg.plugins == ["toy", "math"]
    assert cfg.model.dtype == "bfloat16"
    # The printed config is valid input again.
    assert build_config(yaml.safe_load(to_yaml(cfg))).model_dump() == cfg.model_dump()


def test_override_values_are_yaml():
    assert parse_overrides(["a=1e-5", "b=true", "c=[1, 2]", "d=null", "e=", "f=/x:y", "g=a=b", "h=: bad"]) == [
        ("a", 1e-5), ("b", True), ("c", [1, 2]), ("d", None), ("e", ""), ("f", "/x:y"), ("g", "a=b"), ("h", ": bad")]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate", "is not of the form key.path=value"),
        ("=3", "has an empty key"),
        ("rewards.5.weight=1", "rewards has 1 item(s); index 5 is out of range (use 1 to append one)"),
        ("rewards.first.weight=1", "rewards is a list; use a number (0..1) instead of 'first'"),
        ("train.learning_rate.value=1", "train.learning_rate is a value (0.001), not a section"),
        ("train..seed=1", "empty key segment"),
    ],
)
def test_bad_override_syntax(override, message):
    raw = {**BASE, "train": {"learning_rate": 1e-3}}
    assert message in error_of(build_config, raw, [override])


# ---- unknown keys and bad values: one line per problem, naming where and what is valid ----
def test_misspelt_key_in_file_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, """
        model: {path: /ckpt}
        task: {name: toy}
        rewards:
          - name: match
            wieght: 2
        train:
          learning_rat: 1e-5
    """)
    msg = error_of(build_config, load_raw(path))
    lines = msg.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:6: unknown key 'rewards.0.wieght'. Did you mean 'rewards.0.weight'? "
                               "Valid keys in rewards.0: max_error_frac, max_error_steps, name, on_error, options, "
                               "timeout_s, weight.")
    assert lines[1].startswith(f"{path}:8: unknown key 'train.learning_rat'. Did you mean 'train.learning_rate'?")


def test_misspelt_section_and_override_origin():
    msg = error_of(build_config, BASE, ["trian.seed=3"])
    assert msg.startswith("override 'trian.seed=3': unknown key 'trian'. Did you mean 'train'? Valid keys: ")
    assert "checkpoint, data, device, eval, grpo, logging, model, plugins, rewards, rollout, task, train" in msg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.mode=fulll", "train.mode = 'fulll': Input should be 'full', 'lora' or 'frozen_vision'."),
        ("checkpoint.resume=[1]",
         "checkpoint.resume = [1]: Input should be a valid boolean, 'auto' or a valid string."),
        ("grpo.num_generations=1", "grpo.num_generations = 1: Input should be greater than or equal to 2."),
        ("train.learning_rate=fast", "train.learning_rate = 'fast': Input should be a valid number"),
        ("grpo.loss_type=ppo", "Input should be 'grpo', 'bnpo', 'dr_grpo' or 'dapo'."),
        ("grpo.epsilon_high=0.1", "grpo.epsilon_high (0.1) must be >= grpo.epsilon (0.2)"),
        ("model.tiny={hidden: 8}", "model.tiny needs model.family"),
        ("rewards=[]", "rewards = []: List should have at least 1 item"),
    ],
)
def test_bad_values_name_key_and_valid_choices(override, message):
    msg = error_of(build_config, BASE, [override])
    assert message in msg
    assert len(msg.splitlines()) == 1  # one problem, one paragraph


def test_missing_required_section():
    raw = {k: v for k, v in BASE.items() if k != "task"}
    msg = error_of(build_config, raw, source="my.yaml")
    assert msg == "my.yaml: 'task' is required (the data: a task format and its options)."


def test_config_file_errors(tmp_path):
    assert "does not exist" in error_of(load_raw, tmp_path / "nope.yaml")
    assert "not valid YAML" in error_of(load_raw, write(tmp_path, "task: [unclosed\n"))
    assert "top level must be a mapping" in error_of(load_raw, write(tmp_path, "- a\n- b\n"))


# ---- batch arithmetic ---------------------------------------------------------------------
def test_batch_plan_numbers():
    cfg = build_config(BASE, ["grpo.num_generations=4", "train.per_device_batch_size=4",
                              "train.gradient_accumulation_steps=2", "train.max_steps=10", "grpo.num_iterations=2"])
    assert cfg.batch_plan(num_processes=2) == {
        "num_processes": 2, "completions_per_step": 16, "prompts_per_step": 4, "completions_per_micro_batch": 4,
        "micro_batches_per_step": 2, "optimizer_steps": 10, "optimizer_updates_per_step": 2,
        "total_completions": 160}


@pytest.mark.parametrize(("processes", "valid"), [(1, "4, 8, 12, 16"), (2, "2, 4, 6, 8")])
def test_batch_not_divisible_by_group_size(processes, valid):
    cfg = build_config(BASE, ["grpo.num_generations=4", "train.per_device_batch_size=3"])
    msg = error_of(cfg.batch_plan, processes)
    assert msg.startswith("override 'train.per_device_batch_size=3': batch arithmetic: ")
    assert "not divisible by grpo.num_generations=4" in msg
    assert f"Valid per-device batch sizes here: {valid} ..." in msg


# ---- plan: components and their options, before any weights load ----------------------------
def test_plan_resolves_components_and_validates_options(registry):
    cfg = build_config(BASE, ["task.options.split_size=2", "rewards.0.options.ignore_case=false"])
    plan = make_plan(cfg, registry)
    assert plan.task.qualified == "vlmr1-plugin-toy:toy"
    assert plan.options["task"] == ToyTask.Options(split_size=2)
    assert plan.options["rewards.0"].ignore_case is False
    # `auto` takes the highest-priority usable device and says why others were passed over.
    assert plan.device.name == "fast"
    assert plan.notes == ["device vlmr1-plugin-toy:missing not usable: no such hardware in this test"]
    assert plan.rollout.qualified == "vlmr1:transformers"
    summary = plan.summary()
    assert summary["task"] == "vlmr1-plugin-toy:toy" and summary["rewards"] == [
        {"name": "vlmr1-plugin-toy:match", "weight": 1.0}]
    assert summary["batch"]["prompts_per_step"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.name=toi"], "override 'task.name=toi': task.name: no task named 'toi'. Did you mean 'toy'? "
                            "Available tasks: mixture, toy."),
        (["rewards.0.name=nobody"], "rewards.0.name: no reward named 'nobody'. Available rewards: accuracy, match."),
        (["task.options.split_sise=2"], "unknown key 'task.options.split_sise'. Did you mean 'task.options.split_size'?"
                                        " Valid keys in task.options: layout, split_size."),
        (["task.options.layout=triple"], "task.options.layout = 'triple': Input should be 'single' or 'pair'. "
                                         "(task vlmr1-plugin-toy:toy takes the options: split_size, layout.)"),
        (["rewards.0.options.ignore_case=maybe"], "rewards.0.options.ignore_case = 'maybe': Input should be a valid "
                                                  "boolean"),
        (["device.name=missing"], "device.name: vlmr1-plugin-toy:missing is not usable here: no such hardware in "
                                  "this test. Usable devices: vlmr1:cpu, vlmr1-plugin-toy:fast (or device.name=auto)."),
        (["device.name=cpu", "model.dtype=float16"], "model.dtype: float16 is not supported by device vlmr1:cpu "
                                                     "(supported: float32, bfloat16)"),
        (["device.options.index=1"], "unknown key 'device.options.index'. Valid keys in device.options: (none"),
        (["eval.reward=iou"], "eval.reward 'iou' is not one of the configured rewards (match)."),
        (["model.path=null"], "model.path is required"),
        (["model.options.min_pixels=3"], "model.options given without model.family"),
        (["model.family=qwen"], "model.family: no model family named 'qwen'."),
    ],
)
def test_plan_errors(registry, overrides, message):
    cfg = build_config(BASE, overrides)
    msg = error_of(make_plan, cfg, registry)
    assert message in msg
    assert len(msg.splitlines()) == 1


def test_dry_run_plan_accepts_a_device_this_machine_lacks(registry):
    # `--dry-run` validates a GPU recipe on a laptop: the unusable device becomes a note.
    cfg = build_config(BASE, ["device.name=missing", "model.dtype=float16"])
    plan = make_plan(cfg, registry, require_available=False)
    assert plan.device.qualified == "vlmr1-plugin-toy:missing"
    assert plan.notes == ["device vlmr1-plugin-toy:missing is not usable on this machine (no such hardware in this "
                          "test); a real run here would stop"]


def test_plan_error_points_at_file_line(registry, tmp_path):
    path = write(tmp_path, """
        model: {path: /ckpt}
        task:
          name: toy
          options:
            split_size: 0
        rewards: [{name: match}]
        grpo: {num_generations: 2}
        train: {per_device_batch_size: 2}
    """)
    msg = error_of(make_plan, build_config(load_raw(path)), registry)
    assert msg.startswith(f"{path}:6: task.options.split_size = 0: Input should be greater than or equal to 1.")


def test_plugins_field_accepts_a_string():
    assert RunConfig.model_validate({**BASE, "plugins": "none"}).plugins == ["none"]
    assert RunConfig.model_validate({**BASE, "plugins": ["a", "b"]}).plugins == ["a", "b"]


def test_docs_config_reference_is_up_to_date():
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert markdown_reference() in doc, "docs/config.md is stale: paste `python -m core.config --markdown` into it"


def test_config_check_cli(tmp_path, capsys):
    from core.config.__main__ import main as _main

    good = write(tmp_path, "model: {path: /ckpt}\ntask: {name: toy}\nrewards: [{name: match}]\n")
    assert _main(["--check", str(good), "train.seed=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["seed"] == 7
    assert _main(["--check", str(good), "train.sed=7"]) == 2
    assert "Did you mean 'train.seed'?" in capsys.readouterr().err
    assert _main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown_reference()


def test_all_zero_reward_weights_are_refused():
    """A run whose rewards all weigh 0 would learn nothing and exit 0: refused before anything loads."""
    from core.config import ConfigError, build_config

    raw = {"model": {"path": "x"}, "task": {"name": "t"},
           "rewards": [{"name": "a", "weight": 0}, {"name": "b", "weight": 0.0}]}
    with pytest.raises(ConfigError, match="every reward has weight 0"):
        build_config(raw)
    build_config({**raw, "rewards": [{"name": "a", "weight": 0}, {"name": "b", "weight": 0.5}]})
