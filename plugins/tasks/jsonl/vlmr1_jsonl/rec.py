"""``vlmr1_rec_json``: the REC JSON published with VLM-R1's data (RefCOCO/+/g, LISA-Grounding).

A file is a JSON list (or JSON Lines) of::

    {"image": "COCO_train2014_000000000009.jpg",
     "problem": "Please provide the bounding box coordinate of the region this sentence describes: ...",
     "solution": [x1, y1, x2, y2],            # original-image pixels
     "normalized_solution": [x1, y1, x2, y2]} # optional, 0-1000
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from core.interfaces import Sample
from vlmr1_jsonl.base import FileTask
from vlmr1_jsonl.common import (
    BadRow,
    FileTaskOptions,
    ImageRef,
    Source,
    check_box,
    iter_json_array,
    iter_jsonl,
    read_bytes,
    resolve_image,
)

KNOWN_KEYS = {"id", "image", "problem", "solution", "normalized_solution"}


class RecJson(FileTask):
    """REC rows -> single-image samples whose ``solution`` is the pixel box ``[x1, y1, x2, y2]``.

    Defaults follow the original REC recipe: the ``rec`` question template and reward method
    ``iou``. The message is ``[image, text]`` (image first, as the original) unless
    ``text_position: before_image``.
    """

    name = "vlmr1_rec_json"
    description = "VLM-R1 REC JSON (image, problem, pixel box solution)"

    class Options(FileTaskOptions):
        """File options (see :class:`FileTaskOptions`) with REC defaults."""

        question_template: str = Field("rec", description="r1 | rec | ic | od | none | a custom '{Question} ...'")
        reward_method: list[str] | None = Field(
            ["iou"], description="accu_reward_method per data file (or one for all)")
        text_position: Literal["after_image", "before_image"] = "after_image"

    def rows(self, src: Source) -> Iterator[tuple[int, Any]]:
        """A JSON array (as published) or JSON Lines, told apart by the first character."""
        data = read_bytes(src.path)
        head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        return iter_json_array(src.path, data) if head == b"[" else iter_jsonl(src.path, data)

    def make_sample(self, row: Any, src: Source, line: int) -> Sample:
        """One REC row -> one sample (raises :class:`BadRow`)."""
        if not isinstance(row, dict):
            raise BadRow("not_an_object", f"a row must be a JSON object, got {type(row).__name__}")
        for key in ("image", "problem", "solution"):
            if key not in row:
                raise BadRow("missing_field", f"row has no {key!r}")
        problem = row["problem"]
        if not isinstance(problem, str):
            raise BadRow("wrong_type", f"'problem' must be a string, got {type(problem).__name__}")
        box = check_box(row["solution"], "solution")
        normalized = row.get("normalized_solution")
        if normalized is not None:
            normalized = check_box(normalized, "normalized_solution")
            if not all(0 <= v <= 1000 for v in normalized):
                raise BadRow("invalid_box", f"normalized_solution {row['normalized_solution']!r} is outside 0-1000")
        o = self.options
        path = resolve_image(row["image"], src.image_folder, o.allow_outside_image_folder, o.check_images,
                             self.limits)
        text = {"type": "text", "text": self.template_prefix + problem + self.template_suffix}
        image = {"type": "image"}
        meta: dict[str, Any] = {
            "source_file": src.path,
            "source_line": line,
            "dataset": os.path.basename(src.path),
            "row_id": row.get("id"),
            "image_paths": [path],
            "solution_boxes": [box],
        }
        if normalized is not None:
            meta["normalized_solution"] = normalized
        extra = {k: v for k, v in row.items() if k not in KNOWN_KEYS}
        if extra:
            meta["extra"] = extra
        return Sample(
            id=self.unique_id(row.get("id"), src, line),
            images=[ImageRef(path, src.path, line, self.limits)],
            messages=self.messages([image, text] if o.text_position == "after_image" else [text, image]),
            solution=box,
            reward_method=src.reward_method,
            meta=meta,
        )
