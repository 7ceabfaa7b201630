"""Registration hooks of vlmr1-plugin-judge (httpx is imported only when scoring)."""

from __future__ import annotations

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_rewards(register) -> None:
    """Register ``judge``."""
    from vlmr1_judge.rewards import JudgeReward

    register(JudgeReward)
