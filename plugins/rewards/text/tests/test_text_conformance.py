"""Interface conformance of the text plugin (core.testing.conformance)."""

from __future__ import annotations

from vlmr1_text.length import LengthReward, RepetitionReward
from vlmr1_text.rewards import AllMatchReward, DefaultReward, FormatReward, MCQReward, YesNoReward

from core.interfaces import RewardItem
from core.testing.conformance import check_plugin, check_reward


def test_plugin_registers_all_text_rewards():
    check_plugin("vlmr1_text.hooks", expected={"rewards": ["format", "all_match", "mcq", "yes_no", "default",
                                                           "length", "repetition"]})


def test_rewards_conform():
    check_reward(FormatReward, [(RewardItem("<think>a</think><answer>b</answer>", "b"), 1.0),
                                (RewardItem("<answer>b</answer>", "b"), 0.0)])
    check_reward(AllMatchReward, [(RewardItem("<answer>Red.</answer>", "red"), 1.0),
                                  (RewardItem("<answer>blue</answer>", "red"), 0.0)])
    check_reward(MCQReward, [(RewardItem("<answer>The answer is (B)</answer>", "B"), 1.0),
                             (RewardItem("<answer>C</answer>", "B"), 0.0),
                             (RewardItem("<answer>C</answer>", "red"), None)])
    check_reward(YesNoReward, [(RewardItem("<answer>Yes</answer>", "yes"), 1.0),
                               (RewardItem("<answer>no</answer>", "yes"), 0.0)])
    check_reward(DefaultReward, [(RewardItem("<answer>0.5</answer>", "1/2"), 1.0),
                                 (RewardItem("<answer>red car</answer>", "red cat"), 6 / 7)])
    check_reward(LengthReward, [(RewardItem("<answer>ok</answer>", "ok", completion_length=1024), 0.5),
                                (RewardItem("<answer>no</answer>", "ok", completion_length=1024), 0.0)],
                 options={"correctness": "exact_match", "length_unit": "tokens"},
                 batch_independent=True)
    check_reward(RepetitionReward, [(RewardItem("a b a b a b", ""), -(1 - 2 / 5))], options={"ngram_size": 2})
