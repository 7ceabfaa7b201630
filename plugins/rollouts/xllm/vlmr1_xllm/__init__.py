"""vlmr1 rollout engine over OpenAI-compatible chat-completions servers (xLLM, vLLM, SGLang, core.serve)."""

from vlmr1_xllm.engine import OpenAIServerRollout, ServerError

__all__ = ["OpenAIServerRollout", "ServerError"]
