"""Generation shared by training, evaluation and SFT: a sample's prompt, its completions, their reward items.

:func:`generate_groups` renders each sample's prompt and loads its images once, asks the rollout
engine (any :class:`~core.interfaces.RolloutEngine`) for its completions, and pairs each completion
with a :class:`~core.interfaces.RewardItem` carrying the solution, image sizes and the model
family's box transform back to original pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.interfaces import (
    Completion,
    PromptInput,
    RewardItem,
    RolloutEngine,
    Sample,
    SamplingParams,
)

if TYPE_CHECKING:
    from core.runtime.loader import ModelBundle


@dataclass
class Generations:
    """Completions of some samples, flat (one entry per completion), with what scoring and training need.

    ``samples[i]`` and ``prompts[i]`` are shared by the completions of one group (the same objects).
    """

    samples: list[Sample]
    prompts: list[PromptInput]
    completions: list[Completion]
    items: list[RewardItem]


def make_prompt(bundle: ModelBundle, sample: Sample) -> PromptInput:
    """Render a sample's messages and load its images (once per group)."""
    images = sample.load_images()
    return PromptInput(sample.messages, bundle.family.render_prompt(bundle.processor, sample.messages), images)


def reward_item(bundle: ModelBundle, sample: Sample, prompt: PromptInput, comp: Completion) -> RewardItem:
    """A completion with the sample's solution, sizes and the family's box transform."""
    fam, proc = bundle.family, bundle.processor
    orig = [im.size for im in prompt.images]
    resized = [fam.resized_image_size(proc, im) for im in prompt.images]

    def to_original(box: Sequence[float], i: int = 0) -> list[float]:
        return fam.box_to_original(box, orig[i], resized[i])

    return RewardItem(completion=comp.text, solution=sample.solution, prompt=sample.question,
                      reward_method=sample.reward_method, image_sizes=orig, box_to_original=to_original,
                      box_convention=fam.box_convention, meta=sample.meta, completion_length=len(comp.ids),
                      truncated=comp.truncated)


def generate_groups(bundle: ModelBundle, engine: RolloutEngine, samples: list[Sample], counts: list[int],
                    sampling: SamplingParams, seeds: list[int] | None = None,
                    offsets: list[int] | None = None) -> Generations:
    """Generate ``counts[i]`` completions for ``samples[i]``; each prompt is processed once.

    With ``seeds`` and ``offsets`` (the first copy of the group this rank holds), a partial group
    at a rank boundary is generated whole (``sampling.n`` rows from the group's seed) and cut to
    copies ``offsets[i] : offsets[i] + counts[i]``: the two ranks sharing a group then hold
    different copies, and exactly the ones a single process would have sampled.
    """
    prompts = [make_prompt(bundle, s) for s in samples]
    for p, seed in zip(prompts, seeds or [None] * len(prompts), strict=True):
        p.seed = seed
    whole = seeds is not None and offsets is not None
    gen_n = [sampling.n if whole and c < sampling.n else c for c in counts]
    out: list[list[Completion]] = [[] for _ in samples]
    for n in sorted(set(gen_n)):  # partial groups at rank boundaries get their own call
        idx = [i for i, c in enumerate(gen_n) if c == n]
        sp = SamplingParams(**{**sampling.__dict__, "n": n})
        for i, comps in zip(idx, engine.generate([prompts[i] for i in idx], sp), strict=True):
            first = offsets[i] if whole and n != counts[i] else 0  # type: ignore[index]
            out[i] = comps[first:first + counts[i]]
    flat_s, flat_p, flat_c, items = [], [], [], []
    for s, p, comps in zip(samples, prompts, out, strict=True):
        for c in comps:
            flat_s.append(s)
            flat_p.append(p)
            flat_c.append(c)
            items.append(reward_item(bundle, s, p, c))
    return Generations(flat_s, flat_p, flat_c, items)


def runs_of(slots: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """Collapse consecutive slots of one group into ``(group ids, counts, first copy index)``."""
    ids: list[int] = []
    counts: list[int] = []
    firsts: list[int] = []
    for p, j in slots:
        if ids and ids[-1] == p:
            counts[-1] += 1
        else:
            ids.append(p)
            counts.append(1)
            firsts.append(j)
    return ids, counts, firsts


def completion_record(step: int, sample: Sample, item: RewardItem, reward: float, advantage: float,
                      rewards: dict[str, float | None]) -> dict[str, Any]:
    """One ``completions.jsonl`` line: what the model saw (its images) and which reward method scored it."""
    images = [str(x) if isinstance(x, (str, os.PathLike)) else None for x in sample.images]
    return {"step": step, "id": sample.id, "prompt": item.prompt, "images": images, "num_images": len(images),
            "reward_method": item.reward_method, "completion": item.completion, "solution": item.solution,
            "reward": reward, "advantage": advantage, "rewards": rewards}
