"""Rollout-engine interface: produce G completions for each prompt.

The built-in engine uses transformers ``generate`` on the policy itself; plugins add vLLM
(colocated or ``trl vllm-serve``) and OpenAI-compatible servers. Prompts arrive once per
group with ``n = G``: an engine that can share the prompt's prefill (and image encoding)
across the group should do so.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.interfaces.base import Component

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class SamplingParams:
    """Sampling settings, honoured by every engine."""

    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    do_sample: bool = True
    repetition_penalty: float = 1.0


@dataclass
class PromptInput:
    """One prompt: its chat messages, rendered text and loaded images."""

    messages: list[dict[str, Any]]
    text: str
    images: list[Image.Image] = field(default_factory=list)
    #: Seed for this prompt's samples, derived by the trainer from (run seed, step, group): an engine
    #: that honours it makes sampling independent of batching and of the number of processes.
    seed: int | None = None


@dataclass
class Completion:
    """One generated completion.

    ``ids`` excludes padding and everything after the first EOS (the EOS itself is kept so
    the policy learns to stop); ``truncated`` is true when no EOS was produced within
    ``max_new_tokens``. ``logprobs`` are the sampler's per-token log-probabilities when the
    engine provides them.
    """

    ids: list[int]
    text: str
    truncated: bool = False
    logprobs: list[float] | None = None


@dataclass
class RolloutContext:
    """What an engine may use: the live policy, its processor and family, the device."""

    model: Any
    processor: Any
    family: Any
    device: Any
    suppressed_token_ids: list[int] = field(default_factory=list)


class RolloutEngine(Component):
    """Generates completions. ``setup`` is called once before the first rollout."""

    def setup(self, ctx: RolloutContext) -> None:
        """Keep what the engine needs from the training context."""
        self.ctx = ctx

    @abstractmethod
    def generate(self, prompts: list[PromptInput], sampling: SamplingParams) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each prompt, in prompt order."""

    def sync_weights(self, model: Any) -> None:
        """Make the engine sample from the current policy weights (no-op when it *is* the policy)."""
