"""vlmr1 rollout engine on vLLM (optional extra ``[vllm]``; vllm is imported lazily)."""

from vlmr1_vllm.engine import VLLMRollout

__all__ = ["VLLMRollout"]
