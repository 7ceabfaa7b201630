"""Registration hooks of vlmr1-plugin-detection (pycocotools is imported only when scoring)."""

from __future__ import annotations

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_rewards(register) -> None:
    """Register ``map``, ``map50``, ``od_length`` and ``weighted_sum``."""
    from vlmr1_detection.rewards import MapAP50Reward, MapReward, ODLengthReward, WeightedSumReward

    for cls in (MapReward, MapAP50Reward, ODLengthReward, WeightedSumReward):
        register(cls)
