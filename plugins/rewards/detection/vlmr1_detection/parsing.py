"""Detection answers: JSON lists of ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}``, or "None".

Box convention: ``[x1, y1, x2, y2]``, continuous pixel coordinates, ``x2``/``y2``
exclusive, ``area = (x2 - x1) * (y2 - y1)`` — the convention pycocotools uses for ``bbox``
(it is written here once more, not imported from the grounding plugin, because plugins
never import each other).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE_RE = re.compile(r"```(?:json)?(.*?)```", re.DOTALL)


@dataclass
class Obj:
    """One listed object: its box (``None`` when missing or malformed) and normalised label."""

    box: list[float] | None
    label: str

    @property
    def valid(self) -> bool:
        """A box with positive width and height."""
        return self.box is not None and self.box[2] > self.box[0] and self.box[3] > self.box[1]


def normalize_label(label: Any, case_sensitive: bool = False) -> str:
    """Label text, whitespace-trimmed and lower-cased unless asked not to."""
    s = str(label).strip() if label is not None else ""
    return s if case_sensitive else s.lower()


def _box(value: Any) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    box = [float(v) for v in value]
    return box if all(math.isfinite(v) for v in box) else None


def _objects(data: Any, case_sensitive: bool) -> list[Obj] | None:
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return None
    out = []
    for o in data:
        if isinstance(o, dict):
            out.append(Obj(_box(o.get("bbox_2d")), normalize_label(o.get("label"), case_sensitive)))
        else:  # a stray number or string in the list: an object without a usable box
            out.append(Obj(None, ""))
    return out


def parse_objects(value: Any, case_sensitive: bool = False) -> list[Obj] | None:
    """Objects of a detection answer; ``[]`` for "None" (no objects); ``None`` when unparsable.

    Text is read from the last ``<answer>`` block if any, then from the last ```` ```json ````
    fence if any; the literal ``None`` (any case) and ``[]`` mean no objects. When the text
    is not JSON, the outermost ``[...]`` in it is tried.
    """
    if not isinstance(value, str):
        return _objects(value, case_sensitive)
    answers = _ANSWER_RE.findall(value)
    text = (answers[-1] if answers else value).strip()
    fences = _FENCE_RE.findall(text)
    if fences:
        text = fences[-1].strip()
    if text.lower() == "none":
        return []
    if not text:
        return None
    try:
        return _objects(json.loads(text), case_sensitive)
    except ValueError:
        pass
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            return _objects(json.loads(text[start:end + 1]), case_sensitive)
        except ValueError:
            return None
    return None


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes, continuous convention; 0 when the union is empty."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0
