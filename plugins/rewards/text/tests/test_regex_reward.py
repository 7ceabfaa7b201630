"""Golden tests for the `regex` reward: 1.0 when the answer (or completion) matches a pattern."""

from __future__ import annotations

import pytest
import vlmr1_text.hooks
from pydantic import ValidationError
from vlmr1_text.rewards import RegexReward

from core.config import ConfigError, build_config, load_raw
from core.interfaces import RewardItem, Sample, TaskFormat
from core.plugins.plan import make_plan
from core.testing import make_sample, reward_batch
from core.testing.conformance import check_reward

COLOUR = "(red|green|blue)"
BOX = r"\[\s*\d+(\s*,\s*\d+){3}\s*\]"


def scores(completions: list[str], **options) -> list[float | None]:
    return RegexReward.from_options(options).score(reward_batch(completions))


def test_conformance_and_registration(register_plugin):
    check_reward(RegexReward, [(RewardItem("<answer>red</answer>", None), 1.0),
                               (RewardItem("<answer>purple</answer>", None), 0.0)], {"pattern": COLOUR})
    host = register_plugin(vlmr1_text.hooks, distribution="vlmr1-plugin-text")
    reward = host.registry.create("rewards", "regex", {"pattern": COLOUR})
    assert reward.score(reward_batch(["<answer>blue</answer>"])) == [1.0]


def test_full_match_needs_the_whole_answer_search_does_not():
    completions = ["<answer>red</answer>", "<answer>it is red</answer>", "<answer>redish</answer>",
                   "<answer>purple</answer>"]
    assert scores(completions, pattern=COLOUR) == [1.0, 0.0, 0.0, 0.0]  # match: full is the default
    assert scores(completions, pattern=COLOUR, match="search") == [1.0, 1.0, 1.0, 0.0]


def test_answer_is_the_last_answer_block_stripped():
    # The last <answer> block counts; its surrounding whitespace is ignored; no block -> whole completion.
    assert scores(["<answer>purple</answer> <answer> green\n</answer>"], pattern=COLOUR) == [1.0]
    assert scores(["<answer>green</answer><answer>purple</answer>"], pattern=COLOUR) == [0.0]
    assert scores(["  blue  "], pattern=COLOUR) == [1.0]
    assert scores(["<think>red</think> blue"], pattern=COLOUR) == [0.0]  # no block: the whole text


def test_target_completion_matches_the_whole_text():
    r1 = r"<think>.*</think>\s*<answer>.*</answer>"
    text = "<think>the square is red</think>\n<answer>red</answer>"
    assert scores([text], pattern=r1, target="completion") == [1.0]
    assert scores([text], pattern=r1) == [0.0]  # target: answer sees only "red"
    assert scores(["<answer>red</answer>"], pattern=r1, target="completion") == [0.0]
    # DOTALL: `.` spans the newlines of a multi-line thought.
    assert scores(["<think>a\nb</think><answer>x</answer>"], pattern=r1, target="completion") == [1.0]


def test_ignore_case():
    assert scores(["<answer>RED</answer>"], pattern=COLOUR) == [1.0]  # ignore_case: true by default
    assert scores(["<answer>RED</answer>"], pattern=COLOUR, ignore_case=False) == [0.0]
    assert scores(["<answer>red</answer>"], pattern=COLOUR, ignore_case=False) == [1.0]


def test_box_and_number_patterns():
    got = scores(["<answer>[10, 20, 30, 40]</answer>", "<answer>[10,20,30]</answer>",
                  "<answer>[1.5, 2, 3, 4]</answer>", "<answer>[ 1 ,2, 3,4 ]</answer>"], pattern=BOX)
    assert got == [1.0, 0.0, 0.0, 1.0]
    assert scores(["<answer>-3.25</answer>", "<answer>3.</answer>", "<answer>x=3</answer>"],
                  pattern=r"-?\d+(\.\d+)?") == [1.0, 0.0, 0.0]


def test_empty_and_odd_completions_score_zero():
    assert scores(["", "<answer></answer>", "<answer>red"], pattern=COLOUR) == [0.0, 0.0, 0.0]
    assert scores([""], pattern=".*") == [1.0]  # an empty answer does match a pattern that allows it


def test_options_are_validated():
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        RegexReward.Options.model_validate({"pattern": "(red|green"})
    with pytest.raises(ValidationError):
        RegexReward.Options.model_validate({})  # pattern is required
    with pytest.raises(ValidationError):
        RegexReward.Options.model_validate({"pattern": "x", "match": "partial"})
    with pytest.raises(ValidationError):
        RegexReward.Options.model_validate({"pattern": "x", "flags": "i"})  # unknown key


class _OneRowTask(TaskFormat):
    name = "one_row"

    def load(self, split: str = "train") -> list[Sample]:
        return [make_sample("What colour?", id="q0", solution="red")]


def test_invalid_pattern_is_a_config_error_before_training(register_plugin, tmp_path):
    # The plan (what --dry-run runs) validates the pattern, naming the config line; no weights load.
    register_plugin(_OneRowTask, distribution="test-task")
    host = register_plugin(vlmr1_text.hooks, distribution="vlmr1-plugin-text")
    text = "model:\n  path: some/checkpoint\ntask:\n  name: one_row\nrewards:\n  - name: regex\n" \
           "    options: {pattern: '[0-9'}\n"
    path = tmp_path / "run.yaml"
    path.write_text(text)
    cfg = build_config(load_raw(path))
    with pytest.raises(ConfigError) as err:
        make_plan(cfg, host.registry)
    msg = str(err.value)
    assert "rewards.0.options.pattern" in msg and "not a valid regular expression" in msg, msg
    assert f"{path}:7" in msg, msg
    # The same config with a valid pattern plans fine.
    path.write_text(text.replace("'[0-9'", "'[0-9]+'"))
    good = build_config(load_raw(path))
    assert make_plan(good, host.registry).options["rewards.0"].pattern == "[0-9]+"
