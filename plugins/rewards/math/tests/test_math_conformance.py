"""Interface conformance of the math plugin (core.testing.conformance)."""

from __future__ import annotations

from vlmr1_math.rewards import MathReward

from core.interfaces import RewardItem
from core.testing.conformance import check_plugin, check_reward


def test_plugin_registers_math():
    check_plugin("vlmr1_math.hooks", expected={"rewards": ["math"]})


def test_math_conforms():
    # inline isolation keeps this check free of worker processes; the process path is tested elsewhere
    check_reward(MathReward, [(RewardItem("<answer>\\frac{1}{2}</answer>", "0.5"), 1.0),
                              (RewardItem("<answer>3</answer>", "2"), 0.0),
                              (RewardItem("<answer>1</answer>", ""), None)], options={"isolation": "inline"})
