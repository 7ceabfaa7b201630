"""The policy update of one GRPO step: log-probs of the rollout, the loss, the optimizer step.

The ``update`` phase of :class:`core.grpo.trainer.GRPOTrainer`, where the maths meets the model:
how a rollout's completions are batched into training inputs (plain ``[prompt, completion]`` rows, or one packed row per
group with :mod:`core.grpo.prefix`), which log-probs are needed (old policy for ``mu > 1``,
reference for ``beta > 0``), and the clipped surrogate of :func:`core.grpo.loss.grpo_loss`
accumulated over micro-batches into ``mu`` optimizer steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from core.config import ConfigError, RunConfig
from core.grpo.guard import check_finite
from core.grpo.logprobs import build_train_inputs, completion_logprobs, pad_completions
from core.grpo.loss import LossNormalizer, MismatchStats, grpo_loss, rollout_is_weights, rollout_mismatch
from core.grpo.prefix import (
    CachedPrefix,
    PackedRows,
    cached_logprobs,
    can_cache_prefix,
    can_share_prefix,
    pack,
    packed_logprobs,
    prefer_cached,
    prepare_cached,
    process_unique,
    segments,
    text_hidden_size,
)

if TYPE_CHECKING:
    from core.grpo.batch import StepBatch
    from core.runtime.loader import ModelBundle


@dataclass
class Policy:
    """What the update trains: the prepared (accelerate-wrapped) model, its optimizer and schedule.

    ``micro_batch_size`` completions go through each forward/backward; ``trainable`` are the
    parameters whose gradient norm is clipped. ``rollout_correction`` is ``grpo.rollout_is_correction``
    resolved for the run's rollout engine (the trainer sets it once the engine exists).
    """

    cfg: RunConfig
    accelerator: Any
    model: Any
    bundle: ModelBundle
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    micro_batch_size: int
    rollout_correction: bool = False


def policy_update(policy: Policy, batch: StepBatch) -> None:
    """``grpo.num_iterations`` (mu) optimiser updates on one step's rollout; fills ``losses`` and ``stats``.

    Micro-batches of ``policy.micro_batch_size`` completions accumulate into each update; the
    first pass over them records the old-policy (mu > 1) and reference (beta > 0) log-probs
    without gradients. ``batch.keep`` (bool per completion) excludes dropped groups from the
    loss and its normalisers.
    """
    cfg, accelerator, model, bundle = policy.cfg, policy.accelerator, policy.model, policy.bundle
    optimizer, scheduler, trainable = policy.optimizer, policy.scheduler, policy.trainable
    mb_size = policy.micro_batch_size
    ro, adv, keep = batch.generations, batch.advantages, batch.keep
    assert ro is not None and adv is not None
    g = cfg.grpo
    tok = getattr(bundle.processor, "tokenizer", bundle.processor)
    dev = accelerator.device
    comp_ids, comp_mask = pad_completions([c.ids for c in ro.completions], tok.pad_token_id, dev)
    if g.mask_truncated_completions:
        trunc = torch.tensor([c.truncated for c in ro.completions], device=dev)
        comp_mask = comp_mask * (~trunc).long().unsqueeze(1)
    if keep is not None:
        comp_mask = comp_mask * keep.to(dev).long().unsqueeze(1)
    adv = adv.to(dev)
    n = len(ro.completions)
    sampler_lp = sampler_logprobs([c.logprobs for c in ro.completions], comp_ids.shape[1], dev)
    with_lp, all_n = accelerator.gather(torch.tensor([float(sum(c.logprobs is not None for c in ro.completions)),
                                                      float(n)], device=dev).reshape(1, 2)).sum(0).tolist()
    lp_frac = with_lp / max(all_n, 1.0)
    correct = policy.rollout_correction and sampler_lp is not None
    if policy.rollout_correction and g.rollout_is_correction and lp_frac == 0.0:
        raise ConfigError("grpo.rollout_is_correction: true, but the rollout engine returned no per-token "
                          "log-probs (Completion.logprobs) to correct with; enable them in rollout.options "
                          "(e.g. return_logprobs: true) or set grpo.rollout_is_correction: false")
    kept = n if keep is None else int(keep.sum())
    global_tokens = int(accelerator.gather(comp_mask.sum().reshape(1)).sum())
    norm = LossNormalizer(num_sequences=kept, num_tokens=int(comp_mask.sum()),
                          max_completion_length=g.max_completion_length, global_tokens=global_tokens,
                          num_processes=accelerator.num_processes)
    # Micro-batches: inputs are built once and reused by every iteration (mu > 1). With
    # grpo.prefix_sharing, where the family allows, each group's prompt and images run once
    # (core.grpo.prefix): a prompt pass whose KV cache the completions then run on, or (with
    # gradient checkpointing, or no cache in the forward) one packed row per prompt under a
    # block-causal mask; otherwise one [prompt, completion] row per completion.
    unwrapped = accelerator.unwrap_model(model)
    cached = g.prefix_sharing and can_cache_prefix(bundle.family, unwrapped)
    can_pack = g.prefix_sharing and can_share_prefix(bundle.family, unwrapped)
    shared = can_pack and not cached
    hidden = text_hidden_size(unwrapped)
    mbs = []
    for s in range(0, n, mb_size):
        idx = list(range(s, min(s + mb_size, n)))
        t = max(int(comp_mask[idx].sum(1).max()), 1)
        ids, mask = comp_ids[idx, :t], comp_mask[idx, :t]
        inputs: Any = None
        prompts = [ro.prompts[i] for i in idx]
        if (cached or shared) and len(segments(prompts)) < len(idx):  # some prompt has several completions
            done = process_unique(bundle.family, bundle.processor, prompts, dev)
            if cached and (not can_pack or prefer_cached(done, prompts, t, hidden)):
                inputs = prepare_cached(bundle.family, unwrapped, bundle.processor, prompts, ids, dev, processed=done)
            else:
                inputs = pack(bundle.family, unwrapped, bundle.processor, prompts, ids, dev, processed=done)
        if inputs is None:
            p_inputs = bundle.family.process(bundle.processor, [ro.prompts[i].text for i in idx],
                                             [ro.prompts[i].images for i in idx]).to(dev)
            inputs = build_train_inputs(p_inputs, ids, mask, bundle.family.per_token_keys)
        mbs.append((idx, inputs, mask, t))

    def logps(m: Any, inputs: Any, t: int) -> torch.Tensor:
        if isinstance(inputs, CachedPrefix):
            return cached_logprobs(m, inputs, g.temperature)
        if isinstance(inputs, PackedRows):
            return packed_logprobs(m, inputs, g.temperature)
        return completion_logprobs(m, inputs, t, g.temperature)

    old, ref = [None] * len(mbs), [None] * len(mbs)
    with torch.no_grad():
        for k, (_, inputs, _, t) in enumerate(mbs):
            if g.num_iterations > 1:
                old[k] = logps(model, inputs, t)
            if g.beta > 0:
                if bundle.lora:
                    with unwrapped.disable_adapter():
                        ref[k] = logps(model, inputs, t)
                else:
                    ref[k] = logps(bundle.ref_model, inputs, t)
    eps_high = g.epsilon_high if g.epsilon_high is not None else g.epsilon
    # Rollout/trainer mismatch, measured (and, with the correction, weighted) against the trainer's
    # log-probs before the update: old[k] for mu > 1, else the first pass's own (detached) values.
    is_w: list[torch.Tensor | None] = [None] * len(mbs)
    mm = MismatchStats()
    w_sum = w_tokens = 0.0
    w_min, w_max = float("inf"), float("-inf")
    losses: list[float] = []
    kl_sum = clipped = low = high = tokens = 0.0
    grad_norm = float("nan")
    model.train()
    for it in range(g.num_iterations):
        total = 0.0
        for k, (idx, inputs, mask, t) in enumerate(mbs):
            sync = k == len(mbs) - 1
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
            with ctx:
                lp = logps(model, inputs, t)
                if it == 0 and sampler_lp is not None:
                    base = (old[k] if old[k] is not None else lp).detach()
                    s_lp = sampler_lp[idx, :t]
                    one = rollout_mismatch(base, s_lp, mask)
                    mm.abs_diff_sum += one.abs_diff_sum
                    mm.kl_sum += one.kl_sum
                    mm.tokens += one.tokens
                    mm.abs_diff_max = max(mm.abs_diff_max, one.abs_diff_max)
                    if correct:
                        is_w[k] = w = rollout_is_weights(base, s_lp, mask, g.rollout_is_mode, g.rollout_is_min,
                                                         g.rollout_is_max)
                        wt = w.expand_as(mask)[mask.bool()]
                        if wt.numel():
                            w_sum, w_tokens = w_sum + float(wt.sum()), w_tokens + wt.numel()
                            w_min, w_max = min(w_min, float(wt.min())), max(w_max, float(wt.max()))
                out = grpo_loss(lp, old[k], ref[k], adv[idx], mask, norm, beta=g.beta,
                                epsilon_low=g.epsilon, epsilon_high=eps_high, loss_type=g.loss_type,
                                importance_sampling_level=g.importance_sampling_level, is_weights=is_w[k])
                accelerator.backward(out.loss)
            total += float(out.loss.detach())
            kl_sum += out.kl_sum
            clipped += out.clipped_tokens
            low += out.low_clipped_tokens
            high += out.high_clipped_tokens
            tokens += out.tokens
        if cfg.train.max_grad_norm is not None:
            gn = accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
            grad_norm = float(gn) if gn is not None else float("nan")  # DeepSpeed clips inside its engine
        # Stop before the optimizer writes NaN weights (core.grpo.guard names the likely setting).
        check_finite(total, grad_norm if cfg.train.max_grad_norm is not None and gn is not None else None, cfg,
                     int(scheduler.last_epoch) + 1, optimizer)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    if accelerator.num_processes > 1:
        # Each rank's loss is its share of the step's loss; DDP averages the gradients, so the
        # step's loss is the mean over ranks (equal to the single-process loss on the same batch).
        losses = accelerator.reduce(torch.tensor(losses, device=dev), reduction="mean").tolist()
    stats = accelerator.gather(torch.tensor([kl_sum, clipped, low, high, tokens], device=dev).reshape(1, -1))
    stats = stats.sum(0).tolist()
    tok_total = max(stats[4], 1.0)
    batch.losses = losses
    batch.stats.update({"kl": stats[0] / tok_total, "clip_ratio": stats[1] / tok_total,
                        "clip_ratio/low": stats[2] / tok_total, "clip_ratio/high": stats[3] / tok_total,
                        "grad_norm": grad_norm})
    batch.stats.update(_mismatch_metrics(accelerator, mm, correct, w_sum, w_tokens, w_min, w_max, lp_frac))


def sampler_logprobs(logprobs: list[list[float] | None], length: int, device: Any) -> torch.Tensor | None:
    """The engine's per-token log-probs as ``[N, length]`` (NaN where a completion or token has none).

    ``None`` when no completion has any (the engine does not report them).
    """
    if all(lp is None for lp in logprobs):
        return None
    out = torch.full((len(logprobs), length), float("nan"), dtype=torch.float32)
    for i, lp in enumerate(logprobs):
        if lp:
            m = min(len(lp), length)
            out[i, :m] = torch.tensor(lp[:m], dtype=torch.float32)
    return out.to(device)


def _mismatch_metrics(accelerator: Any, mm: MismatchStats, correct: bool, w_sum: float, w_tokens: float,
                      w_min: float, w_max: float, lp_frac: float) -> dict[str, float]:
    """``rollout/*`` metrics of the rollout/trainer mismatch and of the correction, over all processes.

    ``rollout/logprobs_frac`` (share of completions whose engine gave log-probs) is always
    logged: 0 says the engine reports none and nothing was measured or corrected.
    """
    dev = accelerator.device
    row = torch.tensor([mm.abs_diff_sum, mm.kl_sum, mm.tokens, w_sum, w_tokens, mm.abs_diff_max, w_max, -w_min],
                       dtype=torch.float64, device=dev).reshape(1, -1)
    rows = accelerator.gather(row)
    sums, maxes = rows[:, :5].sum(0).tolist(), rows[:, 5:].max(0).values.tolist()
    out = {"rollout/logprobs_frac": lp_frac, "rollout/is_correction": float(correct)}
    if sums[2] > 0:
        out.update({"rollout/logprob_diff_mean": sums[0] / sums[2], "rollout/logprob_diff_max": maxes[0],
                    "rollout/kl_est": sums[1] / sums[2]})
    if correct and sums[4] > 0:
        out.update({"rollout/is_weight_mean": sums[3] / sums[4], "rollout/is_weight_max": maxes[1],
                    "rollout/is_weight_min": -maxes[2]})
    return out
