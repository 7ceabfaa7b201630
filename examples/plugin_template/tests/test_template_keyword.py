"""Tests of the template plugin, using the fixtures and checks of ``core.testing``.

``plugin_host`` / ``register_plugin`` come from vlmr1's pytest plugin (installed with vlmr1).
"""

import pytest
import vlmr1_template.hooks
from pydantic import ValidationError
from vlmr1_template.rewards import KeywordReward

from core.interfaces import RewardContext, RewardItem
from core.testing import reward_batch
from core.testing.conformance import check_plugin, check_reward


def test_plugin_registers_keyword_reward_and_stays_light():
    # Imports and registers in a fresh interpreter too: no heavy library is pulled in.
    assert check_plugin("vlmr1_template.hooks", expected={"rewards": ["keyword"]}) == {"rewards": ["keyword"]}


def test_keyword_is_addressable_by_name_and_distribution(register_plugin):
    host = register_plugin(vlmr1_template.hooks, distribution="vlmr1-plugin-template")
    assert host.registry.get("rewards", "keyword") is KeywordReward
    assert host.registry.get("rewards", "template:keyword") is KeywordReward
    assert host.registry.get("rewards", "vlmr1-plugin-template:keyword") is KeywordReward
    reward = host.registry.create("rewards", "keyword", {"keyword": "red"})
    assert reward.score(reward_batch(["<answer>Red</answer>", "<answer>blue</answer>"])) == [1.0, 0.0]


def test_keyword_conformance_and_golden_scores():
    cases = [
        (RewardItem("<think>it is red</think><answer>red</answer>", None), 1.0),
        (RewardItem("<answer>It is RED.</answer>", None), 1.0),  # case-insensitive by default
        (RewardItem("<answer>blue</answer>", None), 0.0),
        (RewardItem("red, but no answer tags", None), 0.0),  # answer_only: tags required
        (RewardItem("<answer>red</answer> then <answer>green</answer>", None), 0.0),  # the LAST answer counts
        (RewardItem("<answer>reddish</answer>", None), 1.0),  # substring match unless whole_word
    ]
    assert check_reward(KeywordReward, cases, {"keyword": "red"}) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("options", "completion", "expected"),
    [
        ({"keyword": "red", "whole_word": True}, "<answer>reddish</answer>", 0.0),
        ({"keyword": "red", "whole_word": True}, "<answer>dark-red.</answer>", 1.0),
        ({"keyword": "red", "case_sensitive": True}, "<answer>RED</answer>", 0.0),
        ({"keyword": "red", "answer_only": False}, "red, but no answer tags", 1.0),
        ({"keyword": "a+b"}, "<answer>so a+b holds</answer>", 1.0),  # the keyword is literal, not a regex
        ({"keyword": "a+b"}, "<answer>aab</answer>", 0.0),
    ],
)
def test_keyword_options(options, completion, expected):
    reward = KeywordReward.from_options(options)
    assert reward.score(reward_batch([completion])) == [expected]


@pytest.mark.parametrize(
    ("options", "field"),
    [({}, "keyword"), ({"keyword": ""}, "keyword"), ({"keyword": "x", "wholeword": True}, "wholeword")],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValidationError, match=field):
        KeywordReward.Options.model_validate(options)


def test_accuracy_router_dispatches_keyword_rows(register_plugin):
    host = register_plugin(vlmr1_template.hooks, distribution="vlmr1-plugin-template")
    router = host.registry.create("rewards", "accuracy", {"reward_options": {"keyword": {"keyword": "cat"}}})
    router.setup(RewardContext(registry=host.registry))
    batch = reward_batch(["<answer>a cat</answer>", "<answer>a dog</answer>"], reward_method="keyword")
    assert router.score(batch) == [1.0, 0.0]
