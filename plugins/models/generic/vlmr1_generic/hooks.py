"""Registration hook of the generic model-family plugin (imports nothing heavy)."""

from __future__ import annotations

from core.hookspecs import Register, hookimpl


@hookimpl
def vlmr1_register_models(register: Register) -> None:
    """Register the generic (fallback) family."""
    from vlmr1_generic.family import GenericFamily

    register(GenericFamily)
