"""Registration hooks of vlmr1-plugin-text (imports only light modules)."""

from __future__ import annotations

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_rewards(register) -> None:
    """Register the text rewards."""
    from vlmr1_text.length import LengthReward, RepetitionReward
    from vlmr1_text.rewards import AllMatchReward, DefaultReward, FormatReward, MCQReward, RegexReward, YesNoReward

    for cls in (FormatReward, RegexReward, AllMatchReward, MCQReward, YesNoReward, DefaultReward, LengthReward,
                RepetitionReward):
        register(cls)
