"""Guided choice over token ids: the built-in engine's ``choices``, for vLLM.

vLLM's own guided choice (structured outputs ``choice``) constrains the *text*: any token
sequence that spells a choice is allowed, e.g. ``"r" + "ed"`` as well as ``"red"``, and on the
quickstart's tiny 512-token vocabulary many such spellings exist (a quarter of the samples were
cut at the 4-token limit, some were no colour at all). The built-in engine allows exactly one
sequence per choice, its canonical tokenisation followed by one EOS. To sample the same
distribution, the engine sends vLLM those sequences (``SamplingParams.extra_args[EXTRA_ARG]``,
a JSON string: vLLM's ``vllm_xargs`` take strings and flat lists only) and vLLM applies them with
:class:`vlmr1_vllm.logits.ChoiceLogitsProcessor`, which this module's pure helpers drive.

Nothing here imports vLLM (the helpers run and are tested in the trainer's environment).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

#: The ``extra_args`` / ``vllm_xargs`` key that carries a request's choice sequences.
EXTRA_ARG = "vlmr1_choice_ids"
#: What a server must be started with for :data:`EXTRA_ARG` to take effect.
SERVER_FLAG = "--logits-processors vlmr1_vllm.logits:ChoiceLogitsProcessor"


def choice_sequences(choices: Sequence[str], tok: Any, eos: set[int]) -> list[list[int]]:
    """Each choice's canonical token ids plus one EOS (``min(eos)``), as the built-in engine builds them."""
    stop = min(eos)
    return [list(tok.encode(c, add_special_tokens=False)) + [stop] for c in choices]


def encode_sequences(seqs: Sequence[Sequence[int]]) -> str:
    """The :data:`EXTRA_ARG` value for ``seqs`` (a compact JSON string)."""
    return json.dumps([list(map(int, s)) for s in seqs], separators=(",", ":"))


def build_trie(seqs: Sequence[Sequence[int]]) -> dict[tuple[int, ...], list[int]]:
    """Allowed next token ids after each prefix of ``seqs`` (the empty prefix included)."""
    trie: dict[tuple[int, ...], set[int]] = {}
    for ids in seqs:
        for i in range(len(ids)):
            trie.setdefault(tuple(ids[:i]), set()).add(int(ids[i]))
    return {k: sorted(v) for k, v in trie.items()}


def is_choice(ids: Sequence[int], seqs: Sequence[Sequence[int]]) -> bool:
    """Whether a completion's ids are exactly one of ``seqs`` (untruncated, EOS included)."""
    return any(list(ids) == list(s) for s in seqs)
