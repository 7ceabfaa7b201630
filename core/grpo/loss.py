"""GRPO advantages and the clipped-surrogate policy loss.

Notation (one optimisation step): ``N`` completions in ``N / G`` groups of ``G``, completion
length ``T`` (right-padded), ``mask`` marks real completion tokens.

Advantages (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)``
with the unbiased std as TRL computes it; ``scale="batch"`` divides by the std over the whole
batch instead (Liu et al. 2025, "Understanding R1-Zero-like training"), ``"none"`` not at all.

Loss per token: ``-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL_k3``,
where ``rho = exp(logp - logp_old)`` (token level) or the exponentiated length-normalised
sum of the log-ratio over the sequence (``sequence`` level, GSPO, Zheng et al. 2025) and
``KL_k3 = exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3 estimator).

Aggregation (``loss_type``), exact over the whole step however it is split into
micro-batches (each micro-batch's term is divided by the *step's* normaliser):
  * ``grpo``: mean over sequences of each sequence's token mean (the original GRPO paper);
  * ``bnpo``: sum over tokens / number of tokens in the local batch;
  * ``dr_grpo``: sum over tokens / (number of sequences * max_completion_length) (Dr. GRPO);
  * ``dapo``: sum over tokens / number of tokens in the *global* batch (all processes; DAPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, baseline: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages for rewards ordered group by group; also returns each group's std ``[N/G]``.

    ``baseline="group"`` (GRPO): ``A = r - mean(group)``. ``baseline="batch"`` (REINFORCE++'s
    global baseline, arXiv 2501.03262): ``A = r - mean(batch)``, which still gives a signal when
    all G completions of a prompt score the same (a group baseline gives them zero). ``scale``
    then divides by the group's std (``group``), the batch's std (``batch``) or nothing.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    std = grouped.std(dim=1, keepdim=True)
    if baseline == "group":
        adv = grouped - grouped.mean(dim=1, keepdim=True)
    elif baseline == "batch":
        adv = grouped - rewards.mean()
    else:
        raise ValueError(f"baseline must be group or batch, not {baseline!r}")
    if scale == "group":
        adv = adv / (std + eps)
    elif scale == "batch":
        adv = adv / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale!r}")
    return adv.reshape(-1), std.reshape(-1)


@dataclass
class LossNormalizer:
    """The step-wide denominators that make micro-batched losses sum to the full-batch loss.

    ``num_sequences`` and ``num_tokens`` are local to this process; ``global_tokens`` is the
    token count over all processes (for ``dapo``); ``num_processes`` undoes DDP's gradient
    averaging for the globally normalised ``dapo`` loss.
    """

    num_sequences: int
    num_tokens: int
    max_completion_length: int
    global_tokens: int | None = None
    num_processes: int = 1


@dataclass
class LossOutput:
    """The loss to backpropagate and detached statistics of the micro-batch."""

    loss: torch.Tensor
    kl_sum: float  # sum over tokens of the per-token KL (for a token-weighted mean)
    clipped_tokens: float
    low_clipped_tokens: float
    high_clipped_tokens: float
    tokens: float


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    norm: LossNormalizer,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
) -> LossOutput:
    """Clipped surrogate (+ k3 KL) for one micro-batch; see the module docstring."""
    mask = mask.to(logps.dtype)
    old = old_logps if old_logps is not None else logps.detach()
    log_ratio = logps - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be token or sequence, not {importance_sampling_level!r}")
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0 and ref_logps is not None:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(norm.num_sequences, 1)
    elif loss_type == "bnpo":
        loss = masked.sum() / max(norm.num_tokens, 1)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / max(norm.num_sequences * norm.max_completion_length, 1)
    elif loss_type == "dapo":
        total = norm.global_tokens if norm.global_tokens is not None else norm.num_tokens
        loss = masked.sum() * norm.num_processes / max(total, 1)
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).expand_as(mask).to(mask.dtype) * mask
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).expand_as(mask).to(mask.dtype) * mask
    return LossOutput(
        loss=loss,
        kl_sum=float((kl.detach() * mask).sum()) if kl is not None else 0.0,
        clipped_tokens=float((low + high).sum()),
        low_clipped_tokens=float(low.sum()),
        high_clipped_tokens=float(high.sum()),
        tokens=float(mask.sum()),
    )
