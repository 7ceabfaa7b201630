"""Registration hook of the Mistral 3 plugin (imports nothing heavy: torch and transformers load later)."""

from __future__ import annotations

from core.hookspecs import Register, hookimpl


@hookimpl
def vlmr1_register_models(register: Register) -> None:
    """Register the Mistral 3 family."""
    from vlmr1_mistral3.family import Mistral3Family

    register(Mistral3Family)
