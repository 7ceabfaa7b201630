"""vLLM-side logits processor for guided choice over token ids (imports vLLM; loaded by vLLM).

Colocate mode passes :class:`ChoiceLogitsProcessor` to ``vllm.LLM(logits_processors=[...])``; a
server loads it with ``--logits-processors vlmr1_vllm.logits:ChoiceLogitsProcessor``
(``cpu_env.sh serve`` does). Requests without ``extra_args["vlmr1_choice_ids"]`` are untouched.
It runs among vLLM's non-argmax-invariant processors, before temperature and top-k/top-p, so
``logprobs_mode: processed_logprobs`` reports log-probs of the constrained distribution, as
the built-in engine does.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from vlmr1_vllm.choices import EXTRA_ARG, build_trie


class ChoiceLogitsProcessor(AdapterLogitsProcessor):
    """Allow, at each step, only the next tokens of the request's choice sequences that match its output so far."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuse a malformed :data:`EXTRA_ARG` at the API boundary (HTTP 400 on a server)."""
        raw = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if raw is None:
            return
        try:
            seqs = json.loads(raw)
            ok = bool(seqs) and all(isinstance(s, list) and s and all(isinstance(t, int) for t in s) for s in seqs)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{EXTRA_ARG} must be a JSON list of non-empty lists of token ids")

    def is_argmax_invariant(self) -> bool:
        """It changes which token is the argmax (it is a constraint)."""
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> Callable[[list[int], torch.Tensor],
                                                                             torch.Tensor] | None:
        """The per-request constraint, or None when the request has no choice sequences."""
        raw = (params.extra_args or {}).get(EXTRA_ARG)
        if raw is None:
            return None
        seqs = json.loads(raw)
        trie = build_trie(seqs)
        # Past a complete sequence (only if the EOS closing it was not a stop token): EOS again.
        done = sorted({s[-1] for s in seqs})
        cache: dict[tuple[int, ...], torch.Tensor] = {}

        def constrain(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            key = tuple(output_ids)
            idx = cache.get(key)
            if idx is None:
                idx = cache[key] = torch.tensor(trie.get(key, done), dtype=torch.long, device=logits.device)
            out = torch.full_like(logits, float("-inf"))
            out[idx] = logits[idx]
            return out

        return constrain
