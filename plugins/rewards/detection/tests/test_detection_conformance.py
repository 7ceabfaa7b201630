"""Interface conformance of the detection plugin (core.testing.conformance)."""

from __future__ import annotations

from vlmr1_detection.rewards import MapAP50Reward, MapReward, ODLengthReward, WeightedSumReward

from core.interfaces import RewardItem
from core.testing.conformance import check_plugin, check_reward

GT = '[{"bbox_2d": [0, 0, 10, 10], "label": "cat"}]'


def test_plugin_registers_detection_rewards():
    check_plugin("vlmr1_detection.hooks", expected={"rewards": ["map", "map50", "od_length", "weighted_sum"]})


def test_rewards_conform():
    exact = RewardItem(f"<answer>{GT}</answer>", GT)
    partial = RewardItem('<answer>[{"bbox_2d": [0, 0, 10, 7.2], "label": "cat"}]</answer>', GT)
    empty = RewardItem("<answer>None</answer>", "None")
    check_reward(MapReward, [(exact, 1.0), (partial, 0.5), (empty, 1.0)])
    check_reward(MapAP50Reward, [(partial, 1.0), (empty, 1.0)])
    check_reward(ODLengthReward, [(exact, 1.0), (partial, 0.5)])
    check_reward(WeightedSumReward, [(exact, 1.0), (partial, 0.7 * 0.72 + 0.3), (empty, 1.0)])
