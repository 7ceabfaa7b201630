"""Shared pieces of the synthetic tasks: split seeds, colour names, the lazy sample list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

from core.interfaces import Sample

#: VLM-R1's R1 question suffix (om-ai-lab/VLM-R1, src/open-r1-multimodal/src/open_r1/grpo_jsonl.py,
#: ``question_prompt``), appended to the question when ``answer_format == "r1"``.
R1_SUFFIX = (
    " First output the thinking process in <think> </think> tags and then output the final answer "
    "in <answer> </answer> tags."
)

#: Split name -> the code mixed into every per-sample seed. Different codes make the streams
#: disjoint for one ``seed``; aliases map to the same stream. The ``ood_*`` splits are held-out
#: evaluation sets of tasks that define them (``synthetic_grounding``).
SPLIT_CODES = {"train": 0, "eval": 1, "ood_reasoning": 2, "ood_visual": 3}
SPLIT_ALIASES = {"validation": "eval", "val": "eval", "test": "eval", "id": "eval"}

#: Pure, maximally separable shades for the default vocabulary; any other name goes through
#: PIL's CSS colour table (``PIL.ImageColor.getrgb``) rather than a hand-written one.
BASIC_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}


def canonical_split(split: str, allowed: tuple[str, ...] = ("train", "eval")) -> str:
    """One of ``allowed`` (``validation``/``val``/``test``/``id`` are aliases of ``eval``)."""
    s = SPLIT_ALIASES.get(split, split)
    if s not in allowed:
        raise ValueError(f"unknown split {split!r}; this task has {', '.join(repr(a) for a in allowed)} "
                         f"(aliases of 'eval': {', '.join(SPLIT_ALIASES)})")
    return s


def colour_rgb(name: str) -> tuple[int, int, int]:
    """RGB of a colour word (``ValueError`` naming it if PIL does not know it either)."""
    if name in BASIC_RGB:
        return BASIC_RGB[name]
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(name)
    except ValueError:
        raise ValueError(f"unknown colour {name!r}: use a CSS colour name (e.g. 'orange') "
                         "or '#rrggbb'") from None
    return (rgb[0], rgb[1], rgb[2])


def sample_rng(seed: int, split: str, index: int, stream: int = 0):
    """A numpy Generator for one sample, independent of process, order of access and platform.

    Seeded with ``SeedSequence([seed, split_code, index, stream])`` so samples are random-access
    (no sequential state to replay) and identical on every rank.
    """
    import numpy as np

    return np.random.default_rng([seed, SPLIT_CODES[split], index, stream])


class GeneratedSamples(Sequence[Sample]):
    """A read-only sequence whose items are generated on access by ``make(index)``."""

    def __init__(self, length: int, make: Callable[[int], Sample]) -> None:
        self._length = length
        self._make = make

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"sample index {index} out of range (0..{self._length - 1})")
        return self._make(index)
