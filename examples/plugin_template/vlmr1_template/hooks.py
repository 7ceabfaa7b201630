"""Hook module named by the ``vlmr1`` entry point: registration only, nothing heavy imported."""

from core.hookspecs import hookimpl
from vlmr1_template.rewards import KeywordReward


@hookimpl
def vlmr1_register_rewards(register) -> None:
    """Register this plugin's rewards."""
    register(KeywordReward)
