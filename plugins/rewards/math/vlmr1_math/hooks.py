"""Registration hooks of vlmr1-plugin-math (math-verify is imported only when scoring)."""

from __future__ import annotations

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_rewards(register) -> None:
    """Register ``math``."""
    from vlmr1_math.rewards import MathReward

    register(MathReward)
