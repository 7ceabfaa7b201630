"""Box parsing and IoU in one convention, shared by the grounding/detection rewards and ``core.evaluate``.

In core because a reward plugin and the evaluator must read an answer's box the same way and
plugins never import each other.

Box convention (used by every reward of this plugin): ``[x1, y1, x2, y2]`` in **continuous**
pixel coordinates of the original image, ``(x1, y1)`` the top-left corner and ``(x2, y2)``
the bottom-right corner, **exclusive** (a box covering pixel columns 0..9 is ``[0, 0, 10, ...]``),
so ``area = (x2 - x1) * (y2 - y1)`` and no ``+1`` anywhere. A box with ``x2 <= x1`` or
``y2 <= y1`` is degenerate (zero area).

VLM-R1's ``iou`` (``vlm_modules/qwen_module.py``, ``grpo_rec.py``) mixed conventions: the
intersection used inclusive corners (``min(x2) - 1``, ``… + 1``) while the areas in the union
did not, so overlaps at most 1 pixel wide or high counted as no overlap (a 1-pixel box
compared with itself scored 0). For integer boxes with wider overlaps both agree.
pycocotools and torchvision's ``box_iou`` use the continuous convention used here.
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
_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_BARE_BOX_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")


def last_answer(text: str) -> str | None:
    """Content of the last ``<answer>`` block, or ``None`` when there is none."""
    m = _ANSWER_RE.findall(text)
    return m[-1].strip() if m else None


def as_box(value: Any) -> list[float] | None:
    """A box from a parsed value: ``[x1, y1, x2, y2]``, ``{"bbox_2d"|"bbox"|"box": ...}`` or a list of those (first)."""
    if isinstance(value, dict):
        for key in ("bbox_2d", "bbox", "box"):
            if key in value:
                return as_box(value[key])
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            box = [float(v) for v in value]
            return box if all(math.isfinite(v) for v in box) else None
        if value and isinstance(value[0], (dict, list, tuple)):
            return as_box(value[0])  # a list of objects or boxes: the first one
    return None


def parse_box(text: Any) -> list[float] | None:
    """The first box in ``text``, or ``None``.

    JSON is tried first (``{"bbox_2d": [...]}``, a list of such, ``[x1, y1, x2, y2]``), then
    the first bare ``[x1, y1, x2, y2]`` of numbers. Non-string input (a list or dict, as
    REC JSON solutions are) is read directly.
    """
    if not isinstance(text, str):
        return as_box(text)
    s = re.sub(r"```(?:json)?", "", text).strip()
    try:
        box = as_box(json.loads(s))
        if box is not None:
            return box
    except ValueError:
        pass
    m = _BARE_BOX_RE.search(s)
    return [float(g) for g in m.groups()] if m else None


def area(box: Sequence[float]) -> float:
    """``(x2 - x1) * (y2 - y1)``, 0 for a degenerate box."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes in the continuous convention (0 if the union is empty)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


# ---- detection answers: JSON lists of {"bbox_2d": [x1, y1, x2, y2], "label": ...}, or "None" --------
@dataclass
class DetObject:
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


def _strict_box(value: Any) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    box = [float(v) for v in value]
    return box if all(math.isfinite(v) for v in box) else None


def _objects(data: Any, case_sensitive: bool) -> list[DetObject] | None:
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return None
    out = []
    for o in data:
        if isinstance(o, dict):
            out.append(DetObject(_strict_box(o.get("bbox_2d")), normalize_label(o.get("label"), case_sensitive)))
        else:  # a stray number or string in the list: an object without a usable box
            out.append(DetObject(None, ""))
    return out


def parse_objects(value: Any, case_sensitive: bool = False,
                  require_answer_tag: bool = False) -> list[DetObject] | None:
    """Objects of a detection answer; ``[]`` for "None" (no objects); ``None`` when unparsable.

    Text is read from the last ``<answer>`` block if any (``None`` without one when
    ``require_answer_tag``), then from the last ```` ```json ```` fence if any; the literal
    ``None`` (any case) and ``[]`` mean no objects. When the text is not JSON, the outermost
    ``[...]`` in it is tried.
    """
    if not isinstance(value, str):
        return _objects(value, case_sensitive)
    answers = _ANSWER_RE.findall(value)
    if not answers and require_answer_tag:
        return None
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
