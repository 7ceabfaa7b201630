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


class RolloutError(RuntimeError):
    """A rollout engine could not generate (a server unreachable or answering errors, a back end that died).

    Raise it (or a subclass) for failures of the engine's environment rather than of its code:
    the apps then end with one ``error: ...`` line and exit code 1 instead of a traceback.
    """


class RolloutSetupError(ValueError):
    """A rollout engine cannot run as configured on this machine (wrong device for a mode, option it cannot honour).

    Bad input, not a failure while running: the apps end with one ``error: ...`` paragraph and
    exit code 2. Name the option to change (``rollout.options.mode``) in the message.
    """


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
    ``max_new_tokens``. ``logprobs`` (optional; one per id, NaN for an id the sampler did not
    score, e.g. an EOS the engine appended) are the log-probabilities of the sampled tokens under
    the distribution the engine actually sampled from: after temperature, top-k/top-p and any
    constraint (suppressed ids, guided choice), renormalised. The trainer compares them with its
    own log-probs (``rollout/logprob_diff_*``, ``rollout/kl_est``) and, with
    ``grpo.rollout_is_correction``, weights the loss by their ratio; ``None`` = not reported
    (nothing measured or corrected).
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
    """Generates completions. ``setup`` is called once before the first rollout.

    ``samples_from_policy``: true for an engine that samples with the training model itself (the
    built-in one); ``grpo.rollout_is_correction: null`` then applies no importance-sampling correction.
    """

    samples_from_policy: bool = False

    def guided(self) -> bool:
        """True when sampling is constrained beyond the policy (a ``choices`` option is set).

        The engine's log-probs are then of the constrained, renormalised distribution, far from
        the trainer's, so ``grpo.rollout_is_correction: null`` applies no correction (it would
        mostly shrink the loss); the mismatch is still measured.
        """
        return bool(getattr(getattr(self, "options", None), "choices", None))

    def setup(self, ctx: RolloutContext) -> None:
        """Keep what the engine needs from the training context."""
        self.ctx = ctx

    @abstractmethod
    def generate(self, prompts: list[PromptInput], sampling: SamplingParams) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each prompt, in prompt order."""

    def sync_weights(self, model: Any) -> None:
        """Make the engine sample from the current policy weights (no-op when it *is* the policy)."""

    def metrics(self) -> dict[str, float]:
        """Engine figures to log with the step that just ran (timings, cache hits); default none.

        Called once per optimizer step, after the weight sync; each key is logged as given
        (name them ``rollout/<what>``, e.g. ``rollout/server_generate_s``), values are floats.
        """
        return {}

    def close(self) -> None:
        """Release what the engine holds (HTTP clients, server processes, GPU memory); default no-op.

        Called once when the run ends; should be safe to call again.
        """


def eos_token_ids(model: Any, processor: Any) -> set[int]:
    """All EOS ids: the generation config's (may be a list) and the tokenizer's.

    Every engine must stop on the same ids as the policy's own ``generate`` (and as the
    loss's completion mask), so they are collected in one place.
    """
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    tok = getattr(processor, "tokenizer", processor)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


def split_completions(seqs: Any, eos_ids: set[int], pad_id: int | None) -> list[tuple[list[int], bool]]:
    """Cut each generated row after its first EOS; return ``(ids, truncated)`` per row.

    ``seqs`` is a 2-D tensor (or anything with ``tolist()``) of generated ids without the
    prompt. The EOS token is kept (the policy must learn to stop). A row with no EOS is
    truncated; its padding, if any, is removed.
    """
    out = []
    for row in seqs.tolist():
        ids: list[int] = []
        truncated = True
        for tok in row:
            ids.append(tok)
            if tok in eos_ids:
                truncated = False
                break
        if truncated and pad_id is not None and pad_id not in eos_ids:
            while ids and ids[-1] == pad_id:
                ids.pop()
        out.append((ids, truncated))
    return out
