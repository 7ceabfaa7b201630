"""``synthetic_grounding``: locate a coloured square or circle on a grid.

A referring-expression task with a known answer: "Locate the green circle." over an image
with one or more objects, each a distinct (colour, shape) pair in its own grid cell. The answer
is the target's box ``[x1, y1, x2, y2]`` in original-image pixels.

Box convention: **inclusive-exclusive** (x1, y1 is the first covered column/row; x2, y2 is
one past the last), so ``width = x2 - x1`` and the box is the tight bounding box of the
object's pixels. Integers throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.interfaces.task import Sample, TaskFormat
from vlmr1_synthetic.common import R1_SUFFIX, GeneratedSamples, canonical_split, colour_rgb, sample_rng

Shape = Literal["square", "circle"]


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: colour word, shape and its box (inclusive-exclusive pixels)."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    def as_dict(self) -> dict:
        """JSON-ready form for ``Sample.meta``."""
        return {"colour": self.colour, "shape": self.shape, "box": list(self.box)}


@dataclass(frozen=True)
class ShapesImage:
    """Zero-argument loader that renders the objects (picklable, built only when loaded)."""

    size: int
    background: tuple[int, int, int]
    objects: tuple[tuple[tuple[int, int, int], str, tuple[int, int, int, int]], ...]

    def __call__(self):
        """Render the image (RGB, ``size`` x ``size``)."""
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (self.size, self.size), self.background)
        draw = ImageDraw.Draw(img)
        for rgb, shape, (x1, y1, x2, y2) in self.objects:
            # PIL's boxes are inclusive on both ends; ours are exclusive at x2/y2.
            xy = (x1, y1, x2 - 1, y2 - 1)
            if shape == "square":
                draw.rectangle(xy, fill=rgb)
            else:
                draw.ellipse(xy, fill=rgb)
        return img


class SyntheticGrounding(TaskFormat):
    """Locate the named object; ``solution`` is its pixel box and ``reward_method`` is ``iou``.

    The image is split into a ``grid`` x ``grid`` lattice of cells; each object occupies one
    cell, at a random offset inside it when ``object_size`` is smaller than the cell. With
    several objects every object has a distinct (colour, shape) pair, so the question names
    exactly one of them.
    """

    name = "synthetic_grounding"
    description = "offline 'locate the green circle' grounding task (boxes in pixels, seeded)"

    class Options(BaseModel):
        """Options of ``synthetic_grounding``."""

        model_config = ConfigDict(extra="forbid")
        num_train: int = Field(512, ge=1)
        num_eval: int = Field(64, ge=1)
        image_size: int = Field(112, ge=4, le=4096, description="side of the square image in pixels")
        grid: int = Field(4, ge=1, le=64, description="cells per side; objects sit in distinct cells")
        object_size: int | None = Field(
            None, ge=2, description="object side in pixels; default: 3/4 of a cell (at least 2)")
        num_objects: int = Field(1, ge=1, description="objects per image (1 target + distractors)")
        shapes: list[Shape] = Field(default_factory=lambda: ["square", "circle"], min_length=1)
        colours: list[str] = Field(default_factory=lambda: ["red", "green", "blue", "yellow"], min_length=1)
        background: str = "black"
        seed: int = Field(0, ge=0)
        prompt: str = Field("Locate the {colour} {shape}.", description="question; {colour} and {shape} are filled in")
        answer_format: Literal["plain", "r1"] = Field(
            "plain",
            description="plain: the completion is '[x1, y1, x2, y2]'; r1: <think>..</think><answer>[..]</answer>")
        text_position: Literal["before_image", "after_image"] = "before_image"

        @field_validator("colours")
        @classmethod
        def _known_colours(cls, v: list[str]) -> list[str]:
            if len(set(v)) != len(v):
                raise ValueError(f"colours must be distinct, got {v}")
            for c in v:
                colour_rgb(c)
            return v

        @field_validator("shapes")
        @classmethod
        def _distinct_shapes(cls, v: list[str]) -> list[str]:
            if len(set(v)) != len(v):
                raise ValueError(f"shapes must be distinct, got {v}")
            return v

        @model_validator(mode="after")
        def _fits(self):
            cell = self.image_size // self.grid
            if cell < 2:
                raise ValueError(f"image_size {self.image_size} / grid {self.grid} leaves cells under 2 px")
            if self.object_size is not None and self.object_size > cell:
                raise ValueError(f"object_size {self.object_size} exceeds the cell size {cell} "
                                 f"(image_size {self.image_size} // grid {self.grid})")
            pairs = len(self.colours) * len(self.shapes)
            if self.num_objects > min(self.grid**2, pairs):
                raise ValueError(f"num_objects {self.num_objects} needs that many grid cells (have "
                                 f"{self.grid**2}) and distinct colour/shape pairs (have {pairs})")
            try:
                self.prompt.format(colour="red", shape="square")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"prompt may only use the fields {{colour}} and {{shape}}: {exc}") from None
            if colour_rgb(self.background) in {colour_rgb(c) for c in self.colours}:
                raise ValueError(f"background {self.background!r} equals one of the object colours")
            return self

    @property
    def cell_size(self) -> int:
        """Side of one grid cell in pixels."""
        return self.options.image_size // self.options.grid

    @property
    def object_size(self) -> int:
        """Side of every object in pixels."""
        o = self.options
        return o.object_size if o.object_size is not None else max(2, (3 * self.cell_size) // 4)

    def format_answer(self, box: Sequence[int]) -> str:
        """A correct completion for ``box`` in the configured answer format."""
        text = "[" + ", ".join(str(int(v)) for v in box) + "]"
        if self.options.answer_format == "r1":
            return f"<think>I look for the object.</think><answer>{text}</answer>"
        return text

    def load(self, split: str = "train") -> Sequence[Sample]:
        """The ``train`` or ``eval`` samples, generated lazily and deterministically."""
        split = canonical_split(split)
        n = self.options.num_train if split == "train" else self.options.num_eval
        return GeneratedSamples(n, partial(self._sample, split))

    def layout(self, split: str, index: int) -> tuple[list[ShapeObject], int]:
        """The objects of one sample and the index of the target among them."""
        o = self.options
        rng = sample_rng(o.seed, canonical_split(split), index)
        pairs = [(c, s) for c in o.colours for s in o.shapes]
        chosen = rng.choice(len(pairs), size=o.num_objects, replace=False)
        cells = rng.choice(o.grid * o.grid, size=o.num_objects, replace=False)
        cell, side = self.cell_size, self.object_size
        objects = []
        for p, c in zip(chosen, cells, strict=True):
            row, col = divmod(int(c), o.grid)
            dx, dy = (int(v) for v in rng.integers(0, cell - side + 1, size=2))
            x1, y1 = col * cell + dx, row * cell + dy
            colour, shape = pairs[int(p)]
            objects.append(ShapeObject(colour, shape, (x1, y1, x1 + side, y1 + side)))
        return objects, int(rng.integers(o.num_objects))

    def _sample(self, split: str, index: int) -> Sample:
        o = self.options
        objects, t = self.layout(split, index)
        target = objects[t]
        question = o.prompt.format(colour=target.colour, shape=target.shape)
        if o.answer_format == "r1":
            question += R1_SUFFIX
        text = {"type": "text", "text": question}
        image = {"type": "image"}
        content = [text, image] if o.text_position == "before_image" else [image, text]
        loader = ShapesImage(o.image_size, colour_rgb(o.background),
                             tuple((colour_rgb(ob.colour), ob.shape, ob.box) for ob in objects))
        return Sample(
            id=f"{self.name}/{split}/{index:06d}",
            images=[loader],
            messages=[{"role": "user", "content": content}],
            solution=list(target.box),
            reward_method="iou",
            meta={
                "task": self.name,
                "split": split,
                "index": index,
                "objects": [ob.as_dict() for ob in objects],
                "target_index": t,
                "box_convention": "pixels, inclusive-exclusive [x1, y1, x2, y2]",
                "image_sizes": [(o.image_size, o.image_size)],
                "reference_completion": self.format_answer(target.box),
            },
        )
