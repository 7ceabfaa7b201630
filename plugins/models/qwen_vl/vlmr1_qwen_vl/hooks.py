"""Registration hook of the Qwen-VL plugin (imports nothing heavy)."""

from __future__ import annotations

from core.hookspecs import Register, hookimpl


@hookimpl
def vlmr1_register_models(register: Register) -> None:
    """Register Qwen2-VL, Qwen2.5-VL and, where transformers provides it, Qwen3-VL."""
    from vlmr1_qwen_vl.family import Qwen2VLFamily, Qwen3VLFamily, Qwen25VLFamily, qwen3_vl_available

    register(Qwen2VLFamily)
    register(Qwen25VLFamily)
    if qwen3_vl_available()[0]:
        register(Qwen3VLFamily)
