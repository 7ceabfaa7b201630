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

Rollout correction (TRL's ``vllm_importance_sampling_correction``; Yao et al. 2025, "Your efficient
RL framework secretly brings you off-policy RL training"): the rollout engine samples from its
own distribution ``q`` (vLLM's kernels, precision, top-p, guided choice), not exactly the
trainer's ``pi_old``. With the sampler's per-token log-probs, each token's loss is multiplied
by an importance weight ``w`` (:func:`rollout_is_weights`, detached) before the KL term is added:
``token_*`` modes use ``w_t = exp(logp_old_t - logq_t)``, ``sequence_*`` modes one
``w = exp(sum_t (logp_old_t - logq_t))`` per completion; ``*_truncate`` clamps ``w`` to
``[clip_min, clip_max]``, ``*_mask`` sets ``w`` outside that range to 0. Tokens without a
sampler log-prob (NaN) get ``w_t = 1``.

Aggregation (``loss_type``), exact over the whole step however it is split into
micro-batches (each micro-batch's term is divided by the *step's* normaliser):
  * ``grpo``: mean over sequences of each sequence's token mean (the original GRPO paper);
  * ``bnpo``: sum over tokens / number of tokens in the local batch;
  * ``dr_grpo``: sum over tokens / (number of sequences * max_completion_length) (Dr. GRPO);
  * ``dapo``: sum over tokens / number of tokens in the *global* batch (all processes; DAPO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, baseline: str = "group",
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages for rewards ordered group by group; also returns each group's std ``[N/G]``.

    ``baseline="group"`` (GRPO): ``A = r - mean(group)``. ``baseline="batch"`` (REINFORCE++'s
    global baseline, arXiv 2501.03262): ``A = r - mean(batch)``, which still gives a signal when
    all G completions of a prompt score the same (a group baseline gives them zero). ``scale``
    then divides by the group's std (``group``), the batch's std (``batch``) or nothing.

    ``valid`` (bool ``[N]``, default all) leaves rows out: a row whose reward failed has no real
    score, so it is excluded from every mean and std and gets advantage 0 (the caller also masks
    it out of the loss). A group's std over fewer than two valid rows is 0 (zero variance).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if valid is None or bool(valid.all()):
        grouped = rewards.view(-1, group_size)
        std = grouped.std(dim=1, keepdim=True)
        mean, batch_mean, batch_std = grouped.mean(dim=1, keepdim=True), rewards.mean(), rewards.std()
    else:
        ok = valid.reshape(-1, group_size).to(rewards.dtype)
        grouped = torch.where(ok.bool(), rewards.view(-1, group_size), torch.zeros((), dtype=rewards.dtype))
        k = ok.sum(dim=1, keepdim=True)
        mean = grouped.sum(dim=1, keepdim=True) / k.clamp(min=1)
        var = (((grouped - mean) * ok) ** 2).sum(dim=1, keepdim=True) / (k - 1).clamp(min=1)
        std = torch.where(k > 1, var.sqrt(), torch.zeros_like(var))
        kept = rewards[valid.reshape(-1)]
        batch_mean = kept.mean() if kept.numel() else torch.zeros((), dtype=rewards.dtype)
        batch_std = kept.std() if kept.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    if baseline == "group":
        adv = grouped - mean
    elif baseline == "batch":
        adv = grouped - batch_mean
    else:
        raise ValueError(f"baseline must be group or batch, not {baseline!r}")
    if scale == "group":
        adv = adv / (std + eps)
    elif scale == "batch":
        adv = adv / (batch_std + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale!r}")
    if valid is not None:
        adv = torch.where(valid.reshape(-1, group_size), adv, torch.zeros((), dtype=adv.dtype))
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
    is_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate (+ k3 KL) for one micro-batch; see the module docstring.

    ``is_weights`` (``[B, T]`` or ``[B, 1]``, from :func:`rollout_is_weights`) multiply each
    token's surrogate before the KL term is added, as TRL does; ``None`` leaves the loss as is.
    """
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
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
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


IS_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_is_weights(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> torch.Tensor:
    """Truncated/masked importance weights ``pi_old / q`` for the rollout correction (TRL 1.16's formula).

    ``trainer_logps`` are the trainer's log-probs of the sampled tokens before the update
    (``[B, T]``, no gradient), ``sampler_logps`` the rollout engine's (NaN where it gave none: such
    tokens count as ratio 1). Token modes return ``[B, T]``, sequence modes ``[B, 1]`` (the ratio
    of the whole completion, ``exp`` of the *sum* of the masked per-token differences). Defaults
    are TRL's: ``sequence_mask``, ``clip_max`` 3, no ``clip_min``.
    """
    if mode not in IS_MODES:
        raise ValueError(f"rollout importance-sampling mode must be one of {', '.join(IS_MODES)}, not {mode!r}")
    diff = torch.nan_to_num((trainer_logps.detach() - sampler_logps) * mask.to(trainer_logps.dtype), nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        if clip_min is None and clip_max is None:
            raise ValueError(f"rollout importance-sampling mode {mode!r} needs clip_min or clip_max")
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@dataclass
class MismatchStats:
    """Sums over the tokens where both the sampler and the trainer gave a log-prob (combine, then divide)."""

    abs_diff_sum: float = 0.0
    abs_diff_max: float = 0.0
    kl_sum: float = 0.0
    tokens: float = 0.0


def rollout_mismatch(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> MismatchStats:
    """``|logp_trainer - logq|`` (sum, max) and the k3 estimate of KL(q || pi) over the masked tokens.

    The tokens were sampled from ``q``, so with ``r = pi / q`` the k3 estimator ``r - 1 - log r``
    (non-negative, unbiased) estimates ``KL(q || pi)``. Tokens whose sampler log-prob is NaN are left out.
    """
    d = (trainer_logps.detach() - sampler_logps).float()
    ok = mask.bool() & ~torch.isnan(d)
    d = d[ok]
    if d.numel() == 0:
        return MismatchStats()
    return MismatchStats(abs_diff_sum=float(d.abs().sum()), abs_diff_max=float(d.abs().max()),
                         kl_sum=float((torch.exp(d) - 1 - d).sum()), tokens=float(d.numel()))
