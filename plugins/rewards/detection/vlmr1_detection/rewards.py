"""Detection rewards: COCO mAP / AP50 (pycocotools), ``odLength`` and ``weighted_sum``.

Reference: om-ai-lab/VLM-R1 ``src/open-r1-multimodal/src/open_r1/grpo_jsonl.py``
(``calculate_map``, ``map_reward``, ``od_reward``, ``odLength_reward``, ``detection_score``
and the ``accuracy_reward`` dispatch: methods ``map``, ``od_ap``, ``od_ap50``, ``odLength``,
``weighted_sum``).

Answers (and solutions) are JSON lists of ``{"bbox_2d": [x1, y1, x2, y2], "label": "..."}``,
optionally in an ``<answer>`` block and/or a ```` ```json ```` fence; ``None`` means the
image holds no object of the asked classes. Common rules of every reward here:

* solution and prediction both "no objects" → 1.0; exactly one of them empty → 0.0;
* a prediction that cannot be parsed → 0.0 (VLM-R1's ``map`` read an unparsable answer as
  an empty list, which scored 1.0 on images without objects — a reward hack); so is one with
  no ``<answer>`` block unless ``require_answer_tag: false`` (the same option and default as
  the grounding ``iou`` reward);
* a solution that cannot be parsed → not applicable (``None``, with a warning);
* predicted boxes are mapped to original-image pixels with ``item.box_to_original(box, 0)``
  (``map_boxes: false`` compares them as written, for data whose ground truth is in the
  model's coordinates, as some VLM-R1 OVD files are); ground truth is in original pixels.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import DetObject, Reward, RewardBatch, RewardItem, iou, parse_objects

logger = logging.getLogger(__name__)

# pycocotools prints progress from every call; stdout is redirected around those calls, and
# a lock keeps concurrent calls of this plugin from racing on the redirection.
_COCO_LOCK = threading.Lock()


class DetectionOptions(BaseModel):
    """Options shared by the detection rewards."""

    model_config = ConfigDict(extra="forbid")
    map_boxes: bool = Field(True, description="map predicted boxes with the model family's transform")
    require_answer_tag: bool = Field(
        True, description="read objects only from an <answer> block (VLM-R1; as the grounding `iou` reward); "
                          "false: the block if present, else the whole completion")
    label_case_sensitive: bool = False
    allow_unknown_convention: bool = False


class _DetectionReward(Reward):
    """Parsing, coordinate mapping and the "None" rules; subclasses score two object lists."""

    Options: ClassVar[type[BaseModel]] = DetectionOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._warned = False
        self._lock = threading.Lock()

    def score(self, batch: RewardBatch) -> list[float | None]:
        """Score each completion."""
        return [self.score_item(it) for it in batch]

    def score_item(self, item: RewardItem) -> float | None:
        """Apply the common rules, then :meth:`compare`."""
        cs = self.options.label_case_sensitive
        gts = parse_objects(item.solution, cs)
        if gts is None:
            with self._lock:
                if not self._warned:
                    self._warned = True
                    logger.warning("%s: solution %r is neither a JSON list of {bbox_2d, label} nor 'None'; "
                                   "such rows are not applicable", self.name, str(item.solution)[:80])
            return None
        preds = parse_objects(item.completion, cs, require_answer_tag=self.options.require_answer_tag)
        if preds is None:
            return 0.0
        if not gts or not preds:
            return float(not gts and not preds)
        return self.compare(self._to_original(item, preds), gts, item)

    def _to_original(self, item: RewardItem, preds: list[DetObject]) -> list[DetObject]:
        if not self.options.map_boxes:
            return preds
        if item.box_convention == "unknown" and not self.options.allow_unknown_convention:
            raise ValueError(f"{self.name}: the model family's box convention is 'unknown', so predicted boxes "
                             "cannot be mapped to original-image pixels; declare the family's box_convention, or "
                             "set this reward's option map_boxes: false or allow_unknown_convention: true")
        return [DetObject(None if o.box is None else [float(v) for v in item.box_to_original(o.box, 0)], o.label)
                for o in preds]

    def compare(self, preds: list[DetObject], gts: list[DetObject], item: RewardItem) -> float:  # pragma: no cover
        raise NotImplementedError


def coco_ap(preds: list[DetObject], gts: list[DetObject],
            image_size: tuple[int, int] | None = None) -> tuple[float, float]:
    """``(AP@[.5:.95], AP@.5)`` of one image with pycocotools (all areas, 100 detections).

    Categories are the ground truth's labels; every prediction has score 1.0 (the models
    give none), so ties keep the answer's order. Predictions with a label absent from the
    ground truth or a degenerate box are left out (they could not match anything). The
    values equal ``COCOeval.summarize()``'s ``stats[0]`` and ``stats[1]``, read from
    ``eval["precision"]`` so that nothing is printed. Returns ``(0, 0)`` when no prediction is
    left, as VLM-R1's ``calculate_map`` did.
    """
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats: dict[str, int] = {}
    anns = []
    for i, g in enumerate(gts):
        if g.box is None:
            continue
        cid = cats.setdefault(g.label, len(cats) + 1)
        x1, y1, x2, y2 = g.box
        anns.append({"id": i + 1, "image_id": 1, "category_id": cid, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "area": max(0.0, x2 - x1) * max(0.0, y2 - y1), "iscrowd": 0})
    dets = []
    for p in preds:
        if p.valid and p.label in cats:
            x1, y1, x2, y2 = p.box  # type: ignore[misc]
            dets.append({"image_id": 1, "category_id": cats[p.label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": 1.0})
    if not dets or not anns:
        return 0.0, 0.0
    w, h = image_size or (1, 1)
    gt_json: dict[str, Any] = {"images": [{"id": 1, "width": w, "height": h}], "annotations": anns,
                               "categories": [{"id": c, "name": n} for n, c in cats.items()]}
    with _COCO_LOCK, contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_json
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # [iou thr, recall, category] at area "all", maxDets 100

    def mean_valid(x: Any) -> float:
        v = x[x > -1]
        return float(np.mean(v)) if v.size else 0.0

    return mean_valid(prec), mean_valid(prec[0])


class MapReward(_DetectionReward):
    """COCO AP@[.5:.95] of the answer's boxes against the solution's (``ap50: true`` → AP@.5).

    Rows: methods ``map`` and ``od_ap`` (VLM-R1's ``map_reward`` / ``od_reward`` with
    ``score_type=0``). See :func:`coco_ap` for how pycocotools is driven.
    """

    name = "map"
    description = "COCO mAP@[.5:.95] via pycocotools (ap50 option for AP@.5)"
    methods: ClassVar[tuple[str, ...]] = ("map", "od_ap")
    eval_metric: ClassVar[str | None] = "detection"

    class Options(DetectionOptions):
        """Which AP."""

        ap50: bool = Field(False, description="report AP@IoU=0.5 instead of AP@[.5:.95]")

    def compare(self, preds: list[DetObject], gts: list[DetObject], item: RewardItem) -> float:
        """AP of one image."""
        ap, ap50 = coco_ap(preds, gts, item.image_sizes[0] if item.image_sizes else None)
        return ap50 if self.options.ap50 else ap


class MapAP50Reward(MapReward):
    """COCO AP@IoU=0.5, for rows with method ``od_ap50`` (VLM-R1 ``score_type=1``)."""

    name = "map50"
    description = "COCO AP@.5 via pycocotools"
    methods: ClassVar[tuple[str, ...]] = ("od_ap50",)
    eval_metric: ClassVar[str | None] = "detection"

    class Options(MapReward.Options):
        """AP@.5 by default."""

        ap50: bool = True


class ODLengthReward(_DetectionReward):
    """``odLength``: AP@[.5:.95] × min(1, #ground-truth objects / #predicted objects).

    The factor penalises listing more objects than there are (every listed entry counts,
    including malformed ones), which plain AP barely does when scores are all equal.
    """

    name = "od_length"
    description = "odLength: mAP × min(1, #gt / #pred)"
    methods: ClassVar[tuple[str, ...]] = ("odLength",)
    eval_metric: ClassVar[str | None] = "detection"

    def compare(self, preds: list[DetObject], gts: list[DetObject], item: RewardItem) -> float:
        """AP times the length factor."""
        ap, _ = coco_ap(preds, gts, item.image_sizes[0] if item.image_sizes else None)
        return ap * min(1.0, len(gts) / len(preds))


class WeightedSumReward(_DetectionReward):
    """``weighted_sum``: greedy IoU matching scored by position and completeness.

    Greedy matching (VLM-R1 ``detection_score``): repeatedly take the unmatched
    (prediction, ground truth) pair with the highest IoU while it is ``>= iou_threshold``;
    a matched pair with different labels keeps the match but contributes IoU 0. Then::

        position     = Σ matched IoU / #gt          (mean over ground-truth objects; misses count 0)
        label        = #matched pairs with equal labels / #gt
        completeness = 1 − (#unmatched gt / #gt + #unmatched pred / #pred) / 2
        score        = (alpha·position + beta·label + gamma·completeness) / (alpha + beta + gamma)

    with VLM-R1's defaults alpha 0.7, beta 0, gamma 0.3. IoU uses the continuous box
    convention (VLM-R1's mixed an inclusive intersection with exclusive areas).
    """

    name = "weighted_sum"
    description = "0.7·matched IoU + 0.3·(1 − (miss + false-alarm rate)/2), greedy IoU≥0.5 with label check"
    methods: ClassVar[tuple[str, ...]] = ("weighted_sum",)
    eval_metric: ClassVar[str | None] = "detection"

    class Options(DetectionOptions):
        """Matching threshold and weights."""

        iou_threshold: float = Field(0.5, ge=0.0, le=1.0)
        alpha: float = Field(0.7, ge=0.0)
        beta: float = Field(0.0, ge=0.0)
        gamma: float = Field(0.3, ge=0.0)

    def compare(self, preds: list[DetObject], gts: list[DetObject], item: RewardItem) -> float:
        """Greedy matching and the weighted score."""
        o = self.options
        if o.alpha + o.beta + o.gamma <= 0:
            raise ValueError("weighted_sum: alpha + beta + gamma must be > 0")
        pairs = sorted(
            ((iou(p.box, g.box) if p.box is not None and g.box is not None else 0.0, pi, gi)
             for pi, p in enumerate(preds) for gi, g in enumerate(gts)),
            key=lambda t: -t[0],
        )
        used_p: set[int] = set()
        used_g: set[int] = set()
        position = 0.0
        labels_ok = 0
        for value, pi, gi in pairs:  # highest IoU first == VLM-R1's repeated arg-max (first max on ties)
            if value < o.iou_threshold:
                break
            if pi in used_p or gi in used_g:
                continue
            used_p.add(pi)
            used_g.add(gi)
            if preds[pi].label == gts[gi].label:
                position += value
                labels_ok += 1
        n_gt, n_pred = len(gts), len(preds)
        completeness = 1.0 - ((n_gt - len(used_g)) / n_gt + (n_pred - len(used_p)) / n_pred) / 2.0
        total = o.alpha * position / n_gt + o.beta * labels_ok / n_gt + o.gamma * completeness
        return total / (o.alpha + o.beta + o.gamma)
