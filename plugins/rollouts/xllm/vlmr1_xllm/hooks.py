"""Registration hooks of ``vlmr1-plugin-xllm`` (httpx is imported only when the engine runs)."""

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_rollouts(register) -> None:
    """The ``openai_server`` rollout engine (any OpenAI-compatible chat-completions server)."""
    from vlmr1_xllm.engine import OpenAIServerRollout

    register(OpenAIServerRollout)
