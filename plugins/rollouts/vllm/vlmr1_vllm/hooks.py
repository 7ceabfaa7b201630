"""Registration hooks of ``vlmr1-plugin-vllm`` (vllm is NOT imported here)."""

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_rollouts(register) -> None:
    """The ``vllm`` rollout engine."""
    from vlmr1_vllm.engine import VLLMRollout

    register(VLLMRollout)
