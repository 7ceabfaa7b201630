"""Registration hook of the InternVL plugin (imports nothing heavy)."""

from __future__ import annotations

from core.hookspecs import Register, hookimpl


@hookimpl
def vlmr1_register_models(register: Register) -> None:
    """Register the InternVL family."""
    from vlmr1_internvl.family import InternVLFamily

    register(InternVLFamily)
