"""KL(π ‖ π_base) on evaluation prompts: the ``eval.kl_base`` metric of ``core.evaluate`` and training.

RL's Razor (Shenfeld, Pari, Agrawal, 2025) finds that forgetting of prior tasks tracks the KL of
the fine-tuned policy to its base measured on the new task's prompts. This module estimates it
with the training forward (:mod:`core.grpo.logprobs`), which is why it lives at the engine layer;
the base is loaded by :func:`core.runtime.evaluator.load_kl_base`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.runtime.evaluator import dataset_name, load_kl_base

if TYPE_CHECKING:
    from core.interfaces import RolloutEngine, Sample
    from core.plugins.plan import Plan
    from core.runtime.loader import ModelBundle


def kl_to_base(bundle: ModelBundle, engine: RolloutEngine, base_model: Any, samples: Sequence[Sample], *,
               max_new_tokens: int, batch_size: int, samples_per_prompt: int = 1, seed: int = 0,
               accelerator: Any = None, keep_rows: bool = False) -> dict[str, Any]:
    """Estimate KL(π ‖ π_base) on ``samples``' prompts: completions sampled from π, per-token log ratio.

    For each prompt ``samples_per_prompt`` completions are sampled from the policy ``bundle.model``
    through ``engine`` at temperature 1 (no top-k/top-p: the model's own distribution); both models
    score the sampled tokens with the training forward (:func:`core.grpo.logprobs.completion_logprobs`,
    EOS included) and ``log π − log π_base`` is averaged. The Monte-Carlo estimate of the KL per
    generated token is ``per_token`` = Σ log-ratios / Σ tokens (RL's Razor's forgetting predictor);
    ``per_sequence`` is the mean summed log-ratio of a completion (the sequence-level KL).
    ``datasets`` holds ``per_token`` per dataset (``meta["dataset"]``, e.g. each task of a mixture).
    With ``keep_rows`` the result has ``rows``: ``(sample, completion ids, summed log ratio)`` per
    completion (for tests). Sharded over the ranks of ``accelerator`` like :func:`evaluate`.
    """
    import torch

    from core.grpo.logprobs import build_train_inputs, completion_logprobs, pad_completions
    from core.interfaces import SamplingParams
    from core.runtime.generation import generate_groups

    world = accelerator.num_processes if accelerator is not None else 1
    if world > 1:
        samples = list(samples)[accelerator.process_index::world]
    model = bundle.model
    was_training = model.training
    model.eval()
    sampling = SamplingParams(n=samples_per_prompt, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                              top_p=1.0, top_k=None, repetition_penalty=1.0)
    pad = getattr(bundle.processor, "tokenizer", bundle.processor).pad_token_id or 0
    dev = next(base_model.parameters()).device
    totals: dict[str, list[float]] = {}  # dataset -> [log-ratio sum, tokens, completions]
    rows: list[tuple[Sample, list[int], float]] = []
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                chunk = list(samples[start:start + batch_size])
                gen = generate_groups(bundle, engine, chunk, [samples_per_prompt] * len(chunk), sampling)
                ids, mask = pad_completions([c.ids for c in gen.completions], pad, dev)
                p_in = bundle.family.process(bundle.processor, [p.text for p in gen.prompts],
                                             [p.images for p in gen.prompts]).to(dev)
                inputs = build_train_inputs(p_in, ids, mask, bundle.family.per_token_keys)
                t = ids.shape[1]
                diff = (completion_logprobs(model, inputs, t) - completion_logprobs(base_model, inputs, t)).double()
                per_row = (diff * mask).sum(1).tolist()
                for s, c, v in zip(gen.samples, gen.completions, per_row, strict=True):
                    acc = totals.setdefault(dataset_name(s, ""), [0.0, 0.0, 0.0])
                    acc[0] += v
                    acc[1] += len(c.ids)
                    acc[2] += 1
                    if keep_rows:
                        rows.append((s, list(c.ids), v))
    finally:
        model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        merged: dict[str, list[float]] = {}
        for part in gather_object([totals]):
            for ds, (a, b, c) in part.items():
                m = merged.setdefault(ds, [0.0, 0.0, 0.0])
                m[0], m[1], m[2] = m[0] + a, m[1] + b, m[2] + c
        totals = merged
    s_sum = sum(v[0] for v in totals.values())
    tokens = int(sum(v[1] for v in totals.values()))
    comps = int(sum(v[2] for v in totals.values()))
    out: dict[str, Any] = {
        "per_token": s_sum / tokens if tokens else math.nan,
        "per_sequence": s_sum / comps if comps else math.nan,
        "tokens": tokens, "completions": comps, "samples_per_prompt": samples_per_prompt,
    }
    if len(totals) > 1:
        out["datasets"] = {ds: (v[0] / v[1] if v[1] else math.nan) for ds, v in sorted(totals.items())}
    if keep_rows:
        out["rows"] = rows
    return out


class KLToBase:
    """``eval.kl_base`` for a run: loads the base model once, then :func:`kl_to_base` per evaluation."""

    def __init__(self, plan: Plan, path: str) -> None:
        self.plan, self.path = plan, path
        self._base: Any = None

    def __call__(self, bundle: ModelBundle, engine: RolloutEngine, samples: Sequence[Sample], *,
                 accelerator: Any = None, seed: int = 0, verify_hashes: bool = True) -> dict[str, Any]:
        """KL(π ‖ base) on ``samples`` (``base`` = the folder, ``per_token``, ``per_sequence`` ...)."""
        cfg = self.plan.config
        if self._base is None:
            self._base = load_kl_base(self.plan, bundle, self.path, verify_hashes=verify_hashes)
        res = kl_to_base(bundle, engine, self._base, samples,
                         max_new_tokens=cfg.eval.max_new_tokens or cfg.grpo.max_completion_length,
                         batch_size=cfg.eval.batch_size, samples_per_prompt=cfg.eval.kl_samples_per_prompt,
                         seed=seed, accelerator=accelerator)
        return {"base": self.path, **res}
