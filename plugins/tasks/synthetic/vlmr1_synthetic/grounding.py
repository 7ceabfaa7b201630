"""``synthetic_grounding``: locate a coloured square or circle on a grid.

A referring-expression task with a known answer: "Locate the green circle." over an image
with one or more objects, each a distinct (colour, shape) pair in its own grid cell. The answer
is the target's box ``[x1, y1, x2, y2]`` in original-image pixels.

Splits: ``train`` and ``eval`` (alias ``id``) share one distribution ("Locate the {colour}
{shape}."). Two held-out splits that training never sees measure out-of-domain grounding, the
claim R1-style RL is judged on (VLM-R1's LISA-Grounding result):

- ``ood_reasoning`` (LISA-like): the same kind of images, but the expression names the target
  indirectly -- "the only circle", "the object left of the red square", "the object that is
  not the blue circle" -- so reading the box off a memorised colour/shape phrase is not enough;
- ``ood_visual``: the training expressions over a visual shift -- ``ood_distractors`` (4) more
  objects per image and an unseen ``ood_background`` colour (dark gray).

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

from core.interfaces import Sample, TaskFormat
from vlmr1_synthetic.common import R1_SUFFIX, GeneratedSamples, canonical_split, colour_rgb, sample_rng

Shape = Literal["square", "circle"]

#: Every split ``load`` accepts (``id``, ``val``, ``validation``, ``test`` are aliases of ``eval``).
SPLITS = ("train", "eval", "ood_reasoning", "ood_visual")
#: The held-out out-of-domain splits (evaluation only; same size as ``eval``).
OOD_SPLITS = ("ood_reasoning", "ood_visual")
#: ``ood_reasoning``'s expression kinds, drawn uniformly per sample.
REASONING_KINDS = ("only_shape", "left_of", "not_the")


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
    #: ``shifted`` domain: diagonal stripes of ``stripe`` over the background every 6 px, and
    #: objects drawn as outlines ``outline`` px wide (0 = filled). Boxes are unchanged.
    stripe: tuple[int, int, int] | None = None
    outline: int = 0

    def __call__(self):
        """Render the image (RGB, ``size`` x ``size``)."""
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (self.size, self.size), self.background)
        draw = ImageDraw.Draw(img)
        if self.stripe is not None:
            for k in range(-self.size, self.size, 6):
                draw.line((k, 0, k + self.size, self.size), fill=self.stripe, width=2)
        for rgb, shape, (x1, y1, x2, y2) in self.objects:
            # PIL's boxes are inclusive on both ends; ours are exclusive at x2/y2.
            xy = (x1, y1, x2 - 1, y2 - 1)
            kw = {"outline": rgb, "width": self.outline} if self.outline else {"fill": rgb}
            if shape == "square":
                draw.rectangle(xy, **kw)
            else:
                draw.ellipse(xy, **kw)
        return img


#: Expression kinds of ``expressions`` (train/eval): the training phrase and the relational ones.
EXPRESSION_KINDS = ("colour_shape", "only_shape", "left_of", "not_the", "largest")
#: The ``shifted`` visual domain's background and stripe colours.
SHIFTED_BACKGROUND, SHIFTED_STRIPE = (40, 44, 60), (70, 76, 96)


def shifted_rgb(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The ``shifted`` domain's muted shade of an object colour (same hue family, less saturated)."""
    return tuple(int(0.7 * c + 50) for c in rgb)  # type: ignore[return-value]


def render(size: int, background: str, objects: Sequence[ShapeObject], domain: str) -> ShapesImage:
    """The image loader of ``objects`` in the ``default`` or ``shifted`` visual domain."""
    if domain == "shifted":
        return ShapesImage(size, SHIFTED_BACKGROUND,
                           tuple((shifted_rgb(colour_rgb(ob.colour)), ob.shape, ob.box) for ob in objects),
                           stripe=SHIFTED_STRIPE, outline=max(2, (objects[0].box[2] - objects[0].box[0]) // 4))
    return ShapesImage(size, colour_rgb(background), tuple((colour_rgb(ob.colour), ob.shape, ob.box) for ob in objects))


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
        ood_distractors: int = Field(4, ge=0, description="ood_visual: objects added to num_objects (capped by "
                                                          "the grid and the colour/shape pairs)")
        ood_background: str = Field("#202020", description="ood_visual: the unseen background colour (dark gray; "
                                                           "a mid gray makes a black-trained tiny model write no "
                                                           "box at all)")
        expressions: list[Literal["colour_shape", "only_shape", "left_of", "not_the", "largest"]] = Field(
            default_factory=lambda: ["colour_shape"], min_length=1,
            description="train/eval referring expressions, one drawn per sample: colour_shape 'the green circle', "
                        "only_shape 'the only circle', left_of, not_the, largest 'the largest object'")
        domain: Literal["default", "shifted"] = Field(
            "default", description="shifted: a new visual domain (striped blue-gray background, outlined objects, "
                                   "muted colours) for every split")

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
            object_rgb = {colour_rgb(c) for c in self.colours}
            for field_name in ("background", "ood_background"):
                if colour_rgb(getattr(self, field_name)) in object_rgb:
                    raise ValueError(f"{field_name} {getattr(self, field_name)!r} equals one of the object colours")
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

    def splits(self) -> tuple[str, ...]:
        """``train``, ``eval`` and the held-out ``ood_reasoning`` / ``ood_visual``."""
        return SPLITS

    def load(self, split: str = "train") -> Sequence[Sample]:
        """The samples of ``split`` (see :data:`SPLITS`), generated lazily and deterministically."""
        split = canonical_split(split, SPLITS)
        n = self.options.num_train if split == "train" else self.options.num_eval
        return GeneratedSamples(n, partial(self._sample, split))

    def _object(self, rng, colour: str, shape: str, cell_index: int) -> ShapeObject:
        cell, side = self.cell_size, self.object_size
        row, col = divmod(int(cell_index), self.options.grid)
        dx, dy = (int(v) for v in rng.integers(0, cell - side + 1, size=2))
        x1, y1 = col * cell + dx, row * cell + dy
        return ShapeObject(colour, shape, (x1, y1, x1 + side, y1 + side))

    def num_objects_in(self, split: str) -> int:
        """Objects per image in ``split`` (``ood_visual`` adds ``ood_distractors``, capped)."""
        o = self.options
        if canonical_split(split, SPLITS) != "ood_visual":
            return o.num_objects
        cap = min(o.grid**2, len(o.colours) * len(o.shapes))
        return min(o.num_objects + o.ood_distractors, cap)

    def layout(self, split: str, index: int) -> tuple[list[ShapeObject], int]:
        """The objects of one ``train``/``eval``/``ood_visual`` sample and the target's index."""
        o = self.options
        split = canonical_split(split, SPLITS)
        rng = sample_rng(o.seed, split, index)
        k = self.num_objects_in(split)
        pairs = [(c, s) for c in o.colours for s in o.shapes]
        chosen = rng.choice(len(pairs), size=k, replace=False)
        cells = rng.choice(o.grid * o.grid, size=k, replace=False)
        objects = [self._object(rng, *pairs[int(p)], int(c)) for p, c in zip(chosen, cells, strict=True)]
        return objects, int(rng.integers(k))

    def reasoning_layout(self, index: int, split: str = "ood_reasoning",
                         kinds: Sequence[str] | None = None) -> tuple[list[ShapeObject], int, str, str]:
        """One ``ood_reasoning`` sample: objects, target index, question and expression kind.

        ``only_shape``: exactly one object has the target's shape ("Locate the only circle.").
        ``left_of``: the target and a reference object share a grid row, the target to its
        left ("Locate the object left of the red square."). ``not_the``: two objects; the
        target is the one not named ("Locate the object that is not the blue circle.").
        Images have ``max(2, num_objects)`` objects with distinct (colour, shape) pairs, like
        training images; ``only_shape`` needs two shapes and falls back to ``left_of``.
        """
        o = self.options
        if split == "ood_reasoning":
            rng = sample_rng(o.seed, "ood_reasoning", index)
        else:  # train/eval with `expressions`: stream 2, apart from the colour_shape layouts
            rng = sample_rng(o.seed, split, index, stream=2)
        kinds = [k for k in (kinds or REASONING_KINDS) if k != "only_shape" or len(o.shapes) > 1] or ["left_of"]
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "colour_shape":
            objects, t = self.layout(split, index)
            return objects, t, o.prompt.format(colour=objects[t].colour, shape=objects[t].shape), kind
        if kind == "largest":
            return self._largest_layout(rng)
        k = 2 if kind == "not_the" else max(2, o.num_objects)
        k = min(k, o.grid**2, len(o.colours) * len(o.shapes))
        if kind == "only_shape":
            shape = o.shapes[int(rng.integers(len(o.shapes)))]
            other = [s for s in o.shapes if s != shape]
            target_pair = (o.colours[int(rng.integers(len(o.colours)))], shape)
            rest = [(c, s) for c in o.colours for s in other]
            picks = [rest[int(i)] for i in rng.choice(len(rest), size=min(k - 1, len(rest)), replace=False)]
            pairs = [target_pair, *picks]
        else:
            all_pairs = [(c, s) for c in o.colours for s in o.shapes]
            pairs = [all_pairs[int(i)] for i in rng.choice(len(all_pairs), size=k, replace=False)]
        if kind == "left_of" and o.grid >= 2:
            row = int(rng.integers(o.grid))
            left, right = sorted(int(c) for c in rng.choice(o.grid, size=2, replace=False))
            fixed = [row * o.grid + left, row * o.grid + right]
            free = [c for c in range(o.grid**2) if c not in fixed]
            cells = fixed + [free[int(i)] for i in rng.choice(len(free), size=len(pairs) - 2, replace=False)]
        else:
            cells = [int(c) for c in rng.choice(o.grid**2, size=len(pairs), replace=False)]
        objects = [self._object(rng, c, s, cell) for (c, s), cell in zip(pairs, cells, strict=True)]
        if kind == "only_shape":
            question = f"Locate the only {objects[0].shape}."
        elif kind == "left_of":
            ref = objects[1]
            question = f"Locate the object left of the {ref.colour} {ref.shape}."
        else:
            ref = objects[1]
            question = f"Locate the object that is not the {ref.colour} {ref.shape}."
        # Shuffle the drawing order so the target is not always the first object listed.
        order = [int(i) for i in rng.permutation(len(objects))]
        return [objects[i] for i in order], order.index(0), question, kind

    def _largest_layout(self, rng) -> tuple[list[ShapeObject], int, str, str]:
        """``largest``: the target at full ``object_size``, the others at most 2/3 of it."""
        o = self.options
        k = min(max(2, o.num_objects), o.grid**2, len(o.colours) * len(o.shapes))
        all_pairs = [(c, s) for c in o.colours for s in o.shapes]
        pairs = [all_pairs[int(i)] for i in rng.choice(len(all_pairs), size=k, replace=False)]
        cells = [int(c) for c in rng.choice(o.grid**2, size=k, replace=False)]
        full = self.object_size
        small = max(1, (2 * full) // 3)
        objects = []
        for j, ((c, s), cell) in enumerate(zip(pairs, cells, strict=True)):
            side = full if j == 0 else int(rng.integers(max(1, small // 2), small + 1))
            row, col = divmod(cell, o.grid)
            dx, dy = (int(v) for v in rng.integers(0, self.cell_size - side + 1, size=2))
            x1, y1 = col * self.cell_size + dx, row * self.cell_size + dy
            objects.append(ShapeObject(c, s, (x1, y1, x1 + side, y1 + side)))
        order = [int(i) for i in rng.permutation(k)]
        return [objects[i] for i in order], order.index(0), "Locate the largest object.", "largest"

    def _sample(self, split: str, index: int) -> Sample:
        o = self.options
        kind = "colour_shape"
        if split == "ood_reasoning":
            objects, t, question, kind = self.reasoning_layout(index)
        elif split in ("train", "eval") and o.expressions != ["colour_shape"]:
            objects, t, question, kind = self.reasoning_layout(index, split, o.expressions)
        else:
            objects, t = self.layout(split, index)
            question = o.prompt.format(colour=objects[t].colour, shape=objects[t].shape)
        target = objects[t]
        background = o.ood_background if split == "ood_visual" else o.background
        if o.answer_format == "r1":
            question += R1_SUFFIX
        text = {"type": "text", "text": question}
        image = {"type": "image"}
        content = [text, image] if o.text_position == "before_image" else [image, text]
        loader = render(o.image_size, background, objects, o.domain)
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
                "expression": kind,
                "background": background,
                "domain": o.domain,
                "box_convention": "pixels, inclusive-exclusive [x1, y1, x2, y2]",
                "image_sizes": [(o.image_size, o.image_size)],
                "reference_completion": self.format_answer(target.box),
            },
        )
