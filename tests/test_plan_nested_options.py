"""Options of components that a component builds itself are validated at plan time.

The ``accuracy`` router takes per-reward ``reward_options`` and ``routes``; through
``Component.nested_components`` :func:`core.plugins.plan.make_plan` (so ``--dry-run``) resolves every
sub-reward and validates its options before any weights load, with the full key path and
the config file's line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from core.config import ConfigError, build_config, load_raw
from core.interfaces import NestedComponent, Reward, RewardBatch
from core.plugins.plan import make_plan
from core.train import main

ROOT = Path(__file__).resolve().parents[1]


class Graded(Reward):
    """A sub-reward with options of its own."""

    name = "graded"
    methods = ("graded",)

    class Options(BaseModel):
        """A threshold in [0, 1) and a scale."""

        model_config = ConfigDict(extra="forbid")
        threshold: float = Field(0.5, ge=0.0, lt=1.0)
        scale: float = 1.0

    def score(self, batch: RewardBatch) -> list[float | None]:
        return [self.options.scale for _ in batch]


class Wrapper(Reward):
    """A third-party reward that builds another reward from its options (a second level of nesting)."""

    name = "wrapper"

    class Options(BaseModel):
        """``inner`` reward and its ``inner_options``."""

        model_config = ConfigDict(extra="forbid")
        inner: str = "accuracy"
        inner_options: dict = Field(default_factory=dict)

    @classmethod
    def nested_components(cls, options: Options) -> list[NestedComponent]:
        if options.inner == cls.name:
            raise ValueError("inner cannot be 'wrapper' itself")
        return [NestedComponent("rewards", options.inner, "inner_options", options.inner_options, name_key="inner")]

    def score(self, batch: RewardBatch) -> list[float | None]:
        return [0.0 for _ in batch]


CONFIG = """\
model:
  path: /nonexistent/checkpoint
task:
  name: synthetic_color
rewards:
  - name: accuracy
    options:
      default_method: graded
      reward_options:
        graded:
          threshold: 0.3
          scael: 2.0
grpo:
  num_generations: 2
train:
  per_device_batch_size: 2
"""


def plan_for(registry, text: str, tmp_path: Path, *overrides: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return make_plan(build_config(load_raw(path), list(overrides)), registry)


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip().startswith(needle))


@pytest.fixture
def registry(register_plugin):
    from core.plugins import PluginHost

    # A task so the plan resolves; the rewards under test come from this test.
    synthetic = PluginHost(["synthetic"]).registry.resolve("tasks", "synthetic_color").cls
    return register_plugin(Graded, Wrapper, synthetic).registry


def test_misspelt_nested_option_names_full_key_and_line(registry, tmp_path):
    with pytest.raises(ConfigError) as exc:
        plan_for(registry, CONFIG, tmp_path)
    msg = str(exc.value)
    assert (f"{tmp_path / 'run.yaml'}:{line_of(CONFIG, 'scael:')}: unknown key "
            "'rewards.0.options.reward_options.graded.scael'. Did you mean "
            "'rewards.0.options.reward_options.graded.scale'?") in msg
    assert "reward test-plugin:graded takes the options: threshold, scale" in msg


def test_valid_nested_options_pass_and_bad_values_fail(registry, tmp_path):
    good = CONFIG.replace("scael", "scale")
    plan = plan_for(registry, good, tmp_path)
    assert plan.options["rewards.0"].reward_options == {"graded": {"threshold": 0.3, "scale": 2.0}}
    with pytest.raises(ConfigError, match=r"override 'rewards\.0\.options\.reward_options\.graded\.threshold=1\.5': "
                                          r"rewards\.0\.options\.reward_options\.graded\.threshold = 1\.5: "
                                          r"Input should be less than 1"):
        plan_for(registry, good, tmp_path, "rewards.0.options.reward_options.graded.threshold=1.5")


def test_unknown_sub_reward_and_route_target(registry, tmp_path):
    text = CONFIG.replace("graded:\n", "gradd:\n", 1)
    with pytest.raises(ConfigError) as exc:
        plan_for(registry, text, tmp_path)
    assert (f"run.yaml:{line_of(text, 'gradd:')}: rewards.0.options.reward_options.gradd: no reward named 'gradd'. "
            "Did you mean 'graded'?") in str(exc.value)
    routed = CONFIG.replace("scael", "scale").replace("      reward_options:", "      routes: {mcq: gradde}\n"
                                                      "      reward_options:")
    with pytest.raises(ConfigError, match=r"rewards\.0\.options\.routes\.mcq: no reward named 'gradde'"):
        plan_for(registry, routed, tmp_path)
    with pytest.raises(ConfigError, match=r"rewards\.0\.options: routes: mcq route\(s\) to 'accuracy' itself"):
        plan_for(registry, routed.replace("gradde", "accuracy"), tmp_path)


def test_nesting_is_recursive_through_any_component(registry, tmp_path):
    """A plugin's own reward nests the router, which nests ``graded``: the error has the whole path."""
    rewards = CONFIG[CONFIG.index("rewards:"):CONFIG.index("grpo:")]
    nested = "\n".join("  " + ln for ln in rewards.splitlines()[3:])  # accuracy's options, one level deeper
    text = CONFIG.replace(rewards, f"rewards:\n  - name: wrapper\n    options:\n      inner_options:\n{nested}\n")
    with pytest.raises(ConfigError) as exc:
        plan_for(registry, text, tmp_path)
    assert (f"run.yaml:{line_of(text, 'scael:')}: unknown key "
            "'rewards.0.options.inner_options.reward_options.graded.scael'") in str(exc.value)
    with pytest.raises(ConfigError, match=r"rewards\.0\.options: inner cannot be 'wrapper' itself"):
        plan_for(registry, text, tmp_path, "rewards.0.options.inner=wrapper")
    with pytest.raises(ConfigError, match=r"rewards\.0\.options\.inner: no reward named 'acuracy'"):
        plan_for(registry, text, tmp_path, "rewards.0.options.inner=acuracy")


def test_dry_run_rejects_misspelt_sub_reward_option(tmp_path, capsys):
    """End to end with the installed grounding plugin's ``iou`` reward: exit 2, one clear message."""
    text = CONFIG.replace("default_method: graded", "default_method: iou").replace(
        "graded:\n          threshold: 0.3\n          scael: 2.0", "iou:\n          require_answer_tags: false")
    path = tmp_path / "run.yaml"
    path.write_text(text)
    rc = main(["--config", str(path), "--plugins", "synthetic,grounding", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert (f"{path}:{line_of(text, 'require_answer_tags:')}: unknown key "
            "'rewards.0.options.reward_options.iou.require_answer_tags'. Did you mean "
            "'rewards.0.options.reward_options.iou.require_answer_tag'?") in err
    path.write_text(text.replace("require_answer_tags", "require_answer_tag"))
    assert main(["--config", str(path), "--plugins", "synthetic,grounding", "--dry-run"]) == 0, capsys.readouterr().err
