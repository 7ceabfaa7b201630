"""Registration hooks of the synthetic task plugin (imports nothing heavy)."""

from __future__ import annotations

from core.hookspecs import Register, hookimpl


@hookimpl
def vlmr1_register_tasks(register: Register) -> None:
    """``synthetic_color`` and ``synthetic_grounding``."""
    from vlmr1_synthetic.color import SyntheticColor
    from vlmr1_synthetic.grounding import SyntheticGrounding

    register(SyntheticColor)
    register(SyntheticGrounding)
