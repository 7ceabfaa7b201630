"""Registration hooks of vlmr1-plugin-grounding."""

from __future__ import annotations

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_rewards(register) -> None:
    """Register ``iou`` and ``rec_format``."""
    from vlmr1_grounding.rewards import IoUReward, RecFormatReward

    register(IoUReward)
    register(RecFormatReward)
