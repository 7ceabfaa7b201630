"""Interface conformance of the grounding plugin (core.testing.conformance)."""

from __future__ import annotations

from vlmr1_grounding.rewards import IoUReward, RecFormatReward

from core.interfaces import RewardItem
from core.testing.conformance import check_plugin, check_reward


def test_plugin_registers_iou_and_rec_format():
    check_plugin("vlmr1_grounding.hooks", expected={"rewards": ["iou", "rec_format"]})


def test_rewards_conform():
    check_reward(IoUReward, [(RewardItem("<answer>[5, 5, 15, 15]</answer>", [0, 0, 10, 10]), 25 / 175),
                             (RewardItem("<answer>[0, 0, 10, 10]</answer>", [0, 0, 10, 10]), 1.0)])
    check_reward(IoUReward, [(RewardItem("<answer>[0, 0, 10, 6]</answer>", [0, 0, 10, 10]), 1.0)],
                 options={"threshold": 0.5})
    check_reward(RecFormatReward, [(RewardItem('<think>t</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', None),
                                    1.0)])
