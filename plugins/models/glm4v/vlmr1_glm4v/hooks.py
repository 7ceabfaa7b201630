"""Registration hook of the GLM-4V plugin (imports nothing heavy)."""

from __future__ import annotations

from core.hookspecs import Register, hookimpl


@hookimpl
def vlmr1_register_models(register: Register) -> None:
    """Register the GLM-4V family when the installed transformers has the GLM-4.1V classes."""
    from vlmr1_glm4v.family import GLM4VFamily, glm4v_available

    ok, why = glm4v_available()
    if not ok:
        raise ImportError(why)
    register(GLM4VFamily)
