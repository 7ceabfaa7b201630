"""Training-time forward: per-token log-probabilities of completion tokens.

The training forward must see exactly the multimodal inputs generation saw (pixel values,
image grids, per-token type ids ...), or models such as Qwen2.5-VL silently fall back to
1-D positions and the log-probabilities no longer describe the sampled policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def pad_completions(
    ids: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad completion id lists into ``(ids [N, T], mask [N, T])``."""
    t = max((len(x) for x in ids), default=0) or 1
    out = torch.full((len(ids), t), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(ids), t), dtype=torch.long, device=device)
    for i, row in enumerate(ids):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
            mask[i, : len(row)] = 1
    return out, mask


def build_train_inputs(
    prompt_inputs: Mapping[str, Any],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    per_token_keys: tuple[str, ...] = ("token_type_ids", "mm_token_type_ids"),
) -> dict[str, Any]:
    """Append completions to left-padded prompt inputs (one row per completion).

    ``prompt_inputs`` is the processor output for the same rows (prompt repeated per
    completion). Keys aligned with ``input_ids`` (``per_token_keys``) are extended with zeros:
    completion tokens are text tokens.
    """
    prompt_ids = prompt_inputs["input_ids"]
    out = dict(prompt_inputs)
    out["input_ids"] = torch.cat([prompt_ids, completion_ids], dim=1)
    out["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], completion_mask.to(prompt_ids.device)], dim=1)
    for key in per_token_keys:
        val = prompt_inputs.get(key)
        if isinstance(val, torch.Tensor) and val.shape == prompt_ids.shape:
            out[key] = torch.cat([val, torch.zeros_like(completion_ids, dtype=val.dtype)], dim=1)
    return out


def completion_logprobs(
    model: Any, train_inputs: Mapping[str, Any], num_completion_tokens: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities ``[N, T]`` of the last ``T`` tokens of ``train_inputs["input_ids"]``.

    Logits are divided by the sampling ``temperature`` (the policy that generated the tokens
    is the tempered one, as in TRL). Only the last ``T + 1`` positions' logits are
    materialised (``logits_to_keep``), so the vocabulary projection is not paid for prompts.
    """
    t = num_completion_tokens
    out = model(**train_inputs, logits_to_keep=t + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = train_inputs["input_ids"][:, -t:]
    # log_softmax + gather; computed row by row to bound peak memory of [N, T, V] float copies.
    rows = []
    for lg, tg in zip(logits, targets, strict=True):
        rows.append(torch.log_softmax(lg, dim=-1).gather(-1, tg.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)
