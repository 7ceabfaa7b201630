"""Grounding (REC) rewards: IoU against the solution box, and the REC answer format.

References: om-ai-lab/VLM-R1 ``src/open-r1-multimodal/src/open_r1/vlm_modules/qwen_module.py``
(``iou_reward``, ``format_reward_rec``) and ``grpo_rec.py``.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import Reward, RewardBatch, RewardItem, area, iou, last_answer, parse_box

logger = logging.getLogger(__name__)


class IoUReward(Reward):
    """IoU between the predicted box, mapped to original-image pixels, and the solution box.

    The predicted box is read from the last ``<answer>`` block (JSON ``{"bbox_2d": [...]}``,
    a list of such — the first counts —, or a bare ``[x1, y1, x2, y2]``), mapped with
    ``item.box_to_original(box, image_index)`` (the model family's transform: Qwen2.5-VL
    writes pixels of the resized input, Qwen2-VL / InternVL 0-1000) and compared with the
    solution box, which is in original-image pixels (REC JSON ``solution``, a list, a JSON
    string, or text with ``<answer>`` tags). Box convention: continuous coordinates,
    ``x2``/``y2`` exclusive, ``area = (x2 - x1) * (y2 - y1)`` (see :mod:`core.interfaces.boxes`).

    Score: the IoU in [0, 1]; with ``threshold`` set, 1.0 when ``IoU > threshold`` else 0.0
    (the REC Acc@0.5 convention). No answer block (unless ``require_answer_tag: false``),
    no parsable box, or a degenerate predicted box (``x2 <= x1`` or ``y2 <= y1``, which is
    not reordered) → 0.0. A solution without a usable box makes the row not applicable
    (``None``, with a warning) — that is a data error, not a wrong answer.

    A family whose convention is ``unknown`` cannot map boxes; the reward then raises
    unless ``allow_unknown_convention: true`` (boxes are then used as written).
    """

    name = "iou"
    description = "IoU in original-image pixels (continuous, x2/y2 exclusive); optional threshold"
    methods: ClassVar[tuple[str, ...]] = ("iou", "rec")
    eval_metric: ClassVar[str | None] = "rec"

    class Options(BaseModel):
        """Threshold variant, answer-tag requirement, image index and convention check."""

        model_config = ConfigDict(extra="forbid")
        threshold: float | None = Field(None, ge=0.0, lt=1.0, description="score 1 if IoU > threshold else 0")
        require_answer_tag: bool = Field(True, description="read the box only from an <answer> block (VLM-R1)")
        image_index: int = Field(0, ge=0, description="which image of the sample the box refers to")
        allow_unknown_convention: bool = False

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._warned = False
        self._lock = threading.Lock()

    def score(self, batch: RewardBatch) -> list[float | None]:
        """IoU (or thresholded IoU) per completion."""
        return [self.score_item(it) for it in batch]

    def predicted_box(self, item: RewardItem) -> list[float] | None:
        """The completion's box in original-image pixels, or ``None``."""
        text = last_answer(item.completion)
        if text is None:
            if self.options.require_answer_tag:
                return None
            text = item.completion
        box = parse_box(text)
        if box is None:
            return None
        if item.box_convention == "unknown" and not self.options.allow_unknown_convention:
            raise ValueError(f"{self.name}: the model family's box convention is 'unknown', so predicted boxes "
                             "cannot be mapped to original-image pixels; declare the family's box_convention or "
                             "set this reward's option allow_unknown_convention: true")
        return [float(v) for v in item.box_to_original(box, self.options.image_index)]

    def score_item(self, item: RewardItem) -> float | None:
        """Score one completion."""
        sol = item.solution
        gold = parse_box((last_answer(sol) or sol) if isinstance(sol, str) else sol)
        if gold is None or area(gold) <= 0:
            with self._lock:
                if not self._warned:
                    self._warned = True
                    logger.warning("%s: solution %r has no usable box [x1, y1, x2, y2] with x2 > x1 and y2 > y1; "
                                   "such rows are not applicable", self.name, str(item.solution)[:80])
            return None
        pred = self.predicted_box(item)
        if pred is None or area(pred) <= 0:
            return 0.0
        value = iou(pred, gold)
        if self.options.threshold is not None:
            return float(value > self.options.threshold)
        return value


class RecFormatReward(Reward):
    r"""1.0 when the completion has ``<think>…</think>`` then an ``<answer>`` that holds a box, else 0.0.

    VLM-R1's ``format_reward_rec`` pattern (searched, not full-matched) is
    ``<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>``:
    a JSON-like object containing four integers in brackets. Options: ``require_object``
    (the box must sit inside ``{…}``, as in VLM-R1), ``allow_float`` (accept decimal numbers,
    which the ``iou`` reward also reads; VLM-R1 accepted integers only), ``full_match``
    (nothing may surround the two blocks).
    """

    name = "rec_format"
    description = "<think>…</think><answer>{… [x1, y1, x2, y2] …}</answer> (VLM-R1 REC format)"

    class Options(BaseModel):
        """Strictness switches."""

        model_config = ConfigDict(extra="forbid")
        require_object: bool = True
        allow_float: bool = True
        full_match: bool = False

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        num = r"-?\d+(?:\.\d+)?" if self.options.allow_float else r"\d+"
        box = rf"\[\s*{num}\s*,\s*{num}\s*,\s*{num}\s*,\s*{num}\s*\]"
        inner = rf".*?\{{.*{box}.*\}}.*?" if self.options.require_object else rf".*?{box}.*?"
        self._re = re.compile(rf"<think>.*?</think>\s*<answer>{inner}</answer>", re.DOTALL)

    def score(self, batch: RewardBatch) -> list[float | None]:
        """Format check per completion."""
        match = self._re.fullmatch if self.options.full_match else self._re.search
        return [float(match(it.completion.strip()) is not None) for it in batch]
