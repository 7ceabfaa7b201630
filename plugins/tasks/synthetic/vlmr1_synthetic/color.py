"""``synthetic_color``: "What colour is this image?" over a solid-colour image.

The smallest visual task that a tiny VLM learns from scratch with GRPO on a CPU (the
quickstart). Every sample is generated from ``(seed, split, index)`` alone, so a split is the
same in every process and every run, and ``train``/``eval`` never share a sample seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.interfaces import Sample, TaskFormat
from vlmr1_synthetic.common import R1_SUFFIX, GeneratedSamples, canonical_split, colour_rgb, sample_rng


@dataclass(frozen=True)
class SolidImage:
    """Zero-argument loader of one solid-colour image, optionally with uniform pixel noise.

    A small picklable object (not a closure) so samples survive DataLoader workers; the image
    is only built when the engine calls :meth:`Sample.load_images`.
    """

    rgb: tuple[int, int, int]
    size: int
    noise: float
    seed: int
    split: str
    index: int

    def __call__(self):
        """Render the image (RGB, ``size`` x ``size``)."""
        import numpy as np
        from PIL import Image

        arr = np.empty((self.size, self.size, 3), dtype=np.float32)
        arr[...] = self.rgb
        if self.noise > 0:
            # Stream 1 keeps the pixel noise independent of the label draw (stream 0).
            rng = sample_rng(self.seed, self.split, self.index, stream=1)
            arr += rng.uniform(-self.noise, self.noise, size=arr.shape)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


class SyntheticColor(TaskFormat):
    """Colour classification of a solid-colour image; the answer is the colour word.

    Message: ``[text, image]`` by default (the question before the image: tiny models need
    the prompt first when the question must select). ``solution`` is the colour word and
    ``reward_method`` is ``all_match`` (exact match after normalisation).
    """

    name = "synthetic_color"
    description = "offline 'what colour is this image?' task (solid colours, seeded)"

    class Options(BaseModel):
        """Options of ``synthetic_color``."""

        model_config = ConfigDict(extra="forbid")
        num_train: int = Field(512, ge=1, description="samples in the train split")
        num_eval: int = Field(64, ge=1, description="samples in the eval split")
        image_size: int = Field(28, ge=1, le=4096, description="side of the square image in pixels")
        colours: list[str] = Field(default_factory=lambda: ["red", "green", "blue", "yellow"], min_length=2,
                                   description="colour words (answers); CSS names or '#rrggbb'")
        noise: float = Field(0.0, ge=0, le=255, description="uniform per-pixel noise amplitude (+-, 0-255 units)")
        seed: int = Field(0, ge=0, description="seed of both splits (train/eval use disjoint streams)")
        balanced: bool = Field(
            False, description="label of sample i = colours[i % K] (each class equally often, interleaved); "
            "false = drawn at random from the seed")
        prompt: str = Field("What colour is this image?", min_length=1, description="the question text")
        answer_format: Literal["plain", "r1"] = Field(
            "plain", description="plain: the completion is the word; r1: <think>..</think><answer>word</answer>")
        text_position: Literal["before_image", "after_image"] = "before_image"

        @field_validator("colours")
        @classmethod
        def _known_distinct(cls, v: list[str]) -> list[str]:
            if len(set(v)) != len(v):
                raise ValueError(f"colours must be distinct, got {v}")
            rgbs = [colour_rgb(c) for c in v]  # raises naming an unknown colour
            if len(set(rgbs)) != len(rgbs):
                raise ValueError(f"colours {v} include two names for the same RGB value")
            return v

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._rgb = {c: colour_rgb(c) for c in self.options.colours}

    def question(self) -> str:
        """The prompt text shown with every image."""
        return self.options.prompt + (R1_SUFFIX if self.options.answer_format == "r1" else "")

    def reference_completion(self, word: str) -> str:
        """A correct completion in the configured answer format (SFT target, tests)."""
        if self.options.answer_format == "r1":
            return f"<think>The image is {word}.</think><answer>{word}</answer>"
        return word

    def load(self, split: str = "train") -> Sequence[Sample]:
        """The ``train`` or ``eval`` samples, generated lazily and deterministically."""
        split = canonical_split(split)
        n = self.options.num_train if split == "train" else self.options.num_eval
        # partial (not a lambda) keeps the sequence picklable for DataLoader workers.
        return GeneratedSamples(n, partial(self._sample, split))

    def _sample(self, split: str, index: int) -> Sample:
        o = self.options
        if o.balanced:
            word = o.colours[index % len(o.colours)]
        else:
            word = o.colours[int(sample_rng(o.seed, split, index).integers(len(o.colours)))]
        text = {"type": "text", "text": self.question()}
        image = {"type": "image"}
        content = [text, image] if o.text_position == "before_image" else [image, text]
        return Sample(
            id=f"{self.name}/{split}/{index:06d}",
            images=[SolidImage(self._rgb[word], o.image_size, o.noise, o.seed, split, index)],
            messages=[{"role": "user", "content": content}],
            solution=word,
            reward_method="all_match",
            meta={
                "task": self.name,
                "split": split,
                "index": index,
                "label": word,
                "image_sizes": [(o.image_size, o.image_size)],
                "reference_completion": self.reference_completion(word),
            },
        )
