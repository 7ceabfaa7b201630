"""Registration hooks of the synthetic task plugin (imports nothing heavy)."""

from __future__ import annotations

from core.hookspecs import Register, hookimpl


@hookimpl
def vlmr1_register_tasks(register: Register) -> None:
    """``synthetic_color``, ``synthetic_grounding`` and ``synthetic_scene_qa``."""
    from vlmr1_synthetic.color import SyntheticColor
    from vlmr1_synthetic.grounding import SyntheticGrounding
    from vlmr1_synthetic.scene_qa import SyntheticSceneQA

    register(SyntheticColor)
    register(SyntheticGrounding)
    register(SyntheticSceneQA)
