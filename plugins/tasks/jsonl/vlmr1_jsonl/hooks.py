"""Registration hooks of the JSONL task plugin (imports nothing heavy)."""

from __future__ import annotations

from core.hookspecs import Register, hookimpl


@hookimpl
def vlmr1_register_tasks(register: Register) -> None:
    """``vlmr1_jsonl`` and ``vlmr1_rec_json``."""
    from vlmr1_jsonl.jsonl import VlmR1Jsonl
    from vlmr1_jsonl.rec import RecJson

    register(VlmR1Jsonl)
    register(RecJson)
