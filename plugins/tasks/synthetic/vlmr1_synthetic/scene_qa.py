"""``synthetic_scene_qa``: short questions about a scene of coloured squares and circles.

The question kinds a generalist base needs beside grounding, over the same scenes as
``synthetic_grounding`` (objects with distinct colours, one per grid cell):

- ``colour``: "What colour is the circle?" (exactly one object has that shape) -> ``red``;
- ``shape``: "What shape is the red object?" -> ``circle``;
- ``count``: "How many circles are there?" -> ``2`` (a digit; 0 is possible);
- ``yes_no``: "Is there a blue square?" -> ``yes`` / ``no`` (half each, drawn per sample).

Every answer is one word scored by exact match (``reward_method`` ``all_match``). Deterministic
from ``(seed, split, index)`` like the other synthetic tasks, with disjoint ``train`` / ``eval``
streams; ``domain: shifted`` renders the scenes in ``synthetic_grounding``'s shifted visual domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.interfaces import Sample, TaskFormat
from vlmr1_synthetic.common import R1_SUFFIX, GeneratedSamples, canonical_split, colour_rgb, sample_rng
from vlmr1_synthetic.grounding import ShapeObject, render

QUESTION_KINDS = ("colour", "shape", "count", "yes_no")


class SyntheticSceneQA(TaskFormat):
    """One-word answers about a scene: colour, shape, count, yes/no (see the module doc)."""

    name = "synthetic_scene_qa"
    description = "offline colour / shape / counting / yes-no questions about a scene of shapes (seeded)"

    class Options(BaseModel):
        """Options of ``synthetic_scene_qa``."""

        model_config = ConfigDict(extra="forbid")
        num_train: int = Field(512, ge=1)
        num_eval: int = Field(64, ge=1)
        image_size: int = Field(112, ge=8, le=4096)
        grid: int = Field(4, ge=2, le=64)
        min_objects: int = Field(1, ge=1, description="fewest objects in a scene")
        max_objects: int = Field(4, ge=1, description="most objects in a scene (<= colours and grid cells)")
        shapes: list[Literal["square", "circle"]] = Field(default_factory=lambda: ["square", "circle"], min_length=2)
        colours: list[str] = Field(default_factory=lambda: ["red", "green", "blue", "yellow"], min_length=2)
        background: str = "black"
        questions: list[Literal["colour", "shape", "count", "yes_no"]] = Field(
            default_factory=lambda: list(QUESTION_KINDS), min_length=1, description="kinds, one drawn per sample")
        domain: Literal["default", "shifted"] = "default"
        seed: int = Field(0, ge=0)
        answer_format: Literal["plain", "r1"] = "plain"
        text_position: Literal["before_image", "after_image"] = "before_image"

        @field_validator("colours")
        @classmethod
        def _known(cls, v: list[str]) -> list[str]:
            if len(set(v)) != len(v):
                raise ValueError(f"colours must be distinct, got {v}")
            for c in v:
                colour_rgb(c)
            return v

        @model_validator(mode="after")
        def _fits(self):
            if self.min_objects > self.max_objects:
                raise ValueError(f"min_objects {self.min_objects} > max_objects {self.max_objects}")
            if self.max_objects > min(len(self.colours), self.grid**2):
                raise ValueError(f"max_objects {self.max_objects} needs that many distinct colours "
                                 f"(have {len(self.colours)}) and grid cells (have {self.grid**2})")
            if colour_rgb(self.background) in {colour_rgb(c) for c in self.colours}:
                raise ValueError(f"background {self.background!r} equals one of the object colours")
            return self

    def load(self, split: str = "train") -> Sequence[Sample]:
        """The ``train`` or ``eval`` samples, generated lazily and deterministically."""
        split = canonical_split(split)
        n = self.options.num_train if split == "train" else self.options.num_eval
        return GeneratedSamples(n, partial(self._sample, split))

    def scene(self, split: str, index: int) -> tuple[list[ShapeObject], str, str, str]:
        """Objects, question, answer and question kind of one sample."""
        o = self.options
        rng = sample_rng(o.seed, split, index)
        kind = o.questions[int(rng.integers(len(o.questions)))]
        k = int(rng.integers(o.min_objects, o.max_objects + 1))
        colours = [o.colours[int(i)] for i in rng.choice(len(o.colours), size=k, replace=False)]
        shapes = [o.shapes[int(i)] for i in rng.integers(len(o.shapes), size=k)]
        if kind == "colour":  # exactly one object of the asked shape
            asked = o.shapes[int(rng.integers(len(o.shapes)))]
            others = [s for s in o.shapes if s != asked]
            shapes = [asked] + [others[int(rng.integers(len(others)))] for _ in range(k - 1)]
        cell = o.image_size // o.grid
        side = max(2, (3 * cell) // 4)
        cells = rng.choice(o.grid**2, size=k, replace=False)
        objects = []
        for c, s, cl in zip(colours, shapes, cells, strict=True):
            row, col = divmod(int(cl), o.grid)
            dx, dy = (int(v) for v in rng.integers(0, cell - side + 1, size=2))
            objects.append(ShapeObject(c, s, (col * cell + dx, row * cell + dy, col * cell + dx + side,
                                              row * cell + dy + side)))
        if kind == "colour":
            question, answer = f"What colour is the {shapes[0]}?", colours[0]
        elif kind == "shape":
            t = int(rng.integers(k))
            question, answer = f"What shape is the {colours[t]} object?", shapes[t]
        elif kind == "count":
            asked = o.shapes[int(rng.integers(len(o.shapes)))]
            question, answer = f"How many {asked}s are there?", str(shapes.count(asked))
        else:
            present = set(zip(colours, shapes, strict=True))
            if rng.random() < 0.5:
                c, s = sorted(present)[int(rng.integers(len(present)))]
            else:
                absent = sorted((c, s) for c in o.colours for s in o.shapes if (c, s) not in present)
                c, s = absent[int(rng.integers(len(absent)))]
            question, answer = f"Is there a {c} {s}?", "yes" if (c, s) in present else "no"
        order = [int(i) for i in rng.permutation(k)]
        return [objects[i] for i in order], question, answer, kind

    def _sample(self, split: str, index: int) -> Sample:
        o = self.options
        objects, question, answer, kind = self.scene(split, index)
        if o.answer_format == "r1":
            question += R1_SUFFIX
            reference = f"<think>I look at the objects.</think><answer>{answer}</answer>"
        else:
            reference = answer
        text, image = {"type": "text", "text": question}, {"type": "image"}
        content = [text, image] if o.text_position == "before_image" else [image, text]
        return Sample(
            id=f"{self.name}/{split}/{index:06d}",
            images=[render(o.image_size, o.background, objects, o.domain)],
            messages=[{"role": "user", "content": content}],
            solution=answer,
            reward_method="all_match",
            meta={"task": self.name, "split": split, "index": index, "question_kind": kind,
                  "objects": [ob.as_dict() for ob in objects], "domain": o.domain,
                  "image_sizes": [(o.image_size, o.image_size)], "reference_completion": reference},
        )
