"""Golden tests of the evaluation metrics on hand-made predictions (no model involved)."""

from __future__ import annotations

import json
import math

import pytest

from core.config import ConfigError, build_config
from core.interfaces import RewardItem, Sample
from core.runtime.evaluator import (
    DetObject,
    box_iou,
    detection_sample,
    detection_summary,
    metric_kind,
    parse_box,
    parse_objects,
    rec_sample,
    rec_summary,
    reward_summary,
    score_records,
    select_samples,
    summarize,
)


def _cfg(rewards=None):
    return build_config({"task": {"name": "synthetic_grounding"},
                         "rewards": rewards or [{"name": "iou"}]})


def _item(completion, solution, scale=1.0, size=(100, 100)):
    def to_original(box, i=0):
        return [v * scale for v in box]

    return RewardItem(completion=completion, solution=solution, box_to_original=to_original, image_sizes=[size])


# ---- REC ---------------------------------------------------------------------------------------
def test_rec_acc_at_05_of_three_known_boxes():
    gold = [0, 0, 10, 10]
    items = [
        _item("[0, 0, 10, 10]", gold),                      # IoU 1
        _item("<answer>[0, 0, 10, 5]</answer>", gold),      # IoU exactly 0.5: NOT correct (IoU > 0.5)
        _item('{"bbox_2d": [5, 5, 15, 15]}', gold),         # IoU 25 / 175 = 1/7
    ]
    per = [rec_sample(it) for it in items]
    assert [p["iou"] for p in per] == pytest.approx([1.0, 0.5, 1 / 7])
    assert [p["correct"] for p in per] == [True, False, False]
    s = rec_summary(per)
    assert s["acc@0.5"] == pytest.approx(1 / 3)
    assert s["mean_iou"] == pytest.approx((1 + 0.5 + 1 / 7) / 3)
    assert s["parse_rate"] == 1.0


def test_rec_maps_the_predicted_box_to_original_pixels_before_iou():
    # Qwen2.5-VL writes pixels of the resized input: 56 px seen for a 112 px original = scale 2.
    p = rec_sample(_item("[0, 0, 5, 5]", [0, 0, 10, 10], scale=2.0))
    assert p["iou"] == 1.0 and p["pred_box"] == [0.0, 0.0, 10.0, 10.0]
    # Without the mapping the same answer would be wrong.
    assert rec_sample(_item("[0, 0, 5, 5]", [0, 0, 10, 10]))["iou"] == pytest.approx(0.25)


def test_rec_unparsable_degenerate_and_missing_solution():
    assert rec_sample(_item("no box here", [0, 0, 10, 10])) | {} == {
        "iou": 0.0, "correct": False, "parsed": False, "pred_box": None, "gold_box": [0.0, 0.0, 10.0, 10.0]}
    degenerate = rec_sample(_item("[10, 10, 0, 0]", [0, 0, 10, 10]))
    assert degenerate["parsed"] and degenerate["iou"] == 0.0
    assert rec_sample(_item("[0, 0, 10, 10]", "not a box")) is None  # not applicable, not wrong
    # Solutions as REC JSON text with <answer> tags are read too.
    assert rec_sample(_item("[0, 0, 10, 10]", '<answer>{"bbox_2d": [0, 0, 10, 10]}</answer>'))["iou"] == 1.0


def test_require_answer_tag():
    assert parse_box("[1, 2, 3, 4]") == [1.0, 2.0, 3.0, 4.0]
    assert parse_box("[1, 2, 3, 4]", require_answer_tag=True) is None
    assert parse_box("<think>[9, 9, 9, 9]</think><answer>[1, 2, 3, 4]</answer>", require_answer_tag=True) == [
        1.0, 2.0, 3.0, 4.0]
    assert parse_box('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]\n```') == [1.0, 2.0, 3.0, 4.0]


def test_box_iou_continuous_convention():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0  # not above 1 (VLM-R1's +1 bug)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching boxes do not overlap
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)


# ---- detection -----------------------------------------------------------------------------------
def test_detection_coco_map_ap50_precision_recall_golden():
    # Image 1: one "a" box found exactly. Image 2: the "b" box found at IoU 0.78 (TP at IoU
    # thresholds .50-.75: 6 of 10 -> AP_b = 0.6), plus a "c" object that is not in the ground truth.
    # COCO mAP = (1.0 + 0.6) / 2 = 0.8, AP50 = 1.0; precision@0.5 = 2 TP / 3 predictions, recall = 2 / 2.
    items = [
        _item('[{"bbox_2d": [0, 0, 10, 10], "label": "a"}]', [{"bbox_2d": [0, 0, 10, 10], "label": "a"}]),
        _item('<answer>[{"bbox_2d": [0, 0, 10, 7.8], "label": "B"}, {"bbox_2d": [50, 50, 60, 60], '
              '"label": "c"}]</answer>',
              json.dumps([{"bbox_2d": [0, 0, 10, 10], "label": "b"}])),
    ]
    per = [detection_sample(it) for it in items]
    assert [p["tp@0.5"] for p in per] == [1, 1]
    s = detection_summary(per)
    assert s["mAP"] == pytest.approx(0.8)
    assert s["AP50"] == pytest.approx(1.0)
    assert s["precision@0.5"] == pytest.approx(2 / 3)
    assert s["recall@0.5"] == pytest.approx(1.0)
    assert s["parse_rate"] == 1.0


def test_detection_maps_boxes_and_handles_none_and_garbage():
    # A miss: the right label at IoU 1/3 -> no TP; boxes scaled x2 by the family transform.
    p = detection_sample(_item('[{"bbox_2d": [0, 0, 5, 15], "label": "a"}]',
                               [{"bbox_2d": [0, 0, 10, 10], "label": "a"}], scale=2.0))
    assert p["preds"][0].box == [0.0, 0.0, 10.0, 30.0] and p["tp@0.5"] == 0
    assert parse_objects("None") == [] and parse_objects("<answer>None</answer>") == []
    garbage = detection_sample(_item("I see a cat", [{"bbox_2d": [0, 0, 10, 10], "label": "a"}]))
    assert garbage["parsed"] is False and garbage["num_pred"] == 0
    assert detection_sample(_item("[]", "not json")) is None
    s = detection_summary([garbage])
    assert s["mAP"] == 0.0 and s["recall@0.5"] == 0.0 and math.isnan(s["precision@0.5"])


def test_detection_no_ground_truth_boxes_is_nan_not_zero():
    s = detection_summary([detection_sample(_item("None", "None"))])
    assert math.isnan(s["mAP"]) and math.isnan(s["AP50"])


def test_detobject_labels_are_normalised():
    assert parse_objects('[{"bbox_2d": [1, 2, 3, 4], "label": " Red Circle "}]') == [
        DetObject([1.0, 2.0, 3.0, 4.0], "red circle")]


# ---- reward-scored kinds, grouping, selection --------------------------------------------------------
def test_reward_summary_threshold_and_not_applicable():
    s = reward_summary([1.0, 0.0, None, 1.0, float("nan")], threshold=1.0)
    assert s == {"accuracy": pytest.approx(2 / 3), "mean_score": pytest.approx(2 / 3)}


def _record(kind, completion, solution, dataset="d1", method=None):
    s = Sample(id=f"{dataset}/{completion}", images=[], messages=[], solution=solution, reward_method=method)
    reward = {"math": "math", "exact_match": "all_match"}.get(kind, kind.split(":", 1)[-1])
    return {"sample": s, "item": RewardItem(completion=completion, solution=solution), "dataset": dataset,
            "kind": kind, "reward": None if kind in ("rec", "detection") else reward}


def test_math_and_exact_match_use_the_rewards_with_training_options():
    from core.plugins import PluginHost

    reg = PluginHost(["math", "text"]).registry
    cfg = _cfg([{"name": "math", "options": {"isolation": "inline"}}])
    records = [
        _record("math", "<answer>0.5</answer>", "\\frac{1}{2}", "m"),
        _record("math", "<answer>3</answer>", "$2$", "m"),
        _record("exact_match", "  Red. ", "red", "c"),
        _record("exact_match", "blue", "red", "c"),
        _record("exact_match", "green", "green", "c"),
    ]
    summary = score_records(records, cfg, reg)
    assert summary["m"]["math"]["accuracy"] == 0.5 and summary["m"]["math"]["n"] == 2
    assert summary["c"]["exact_match"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["all"]["exact_match"]["n"] == 3  # several datasets -> an overall line per kind
    assert [r["metrics"]["correct"] for r in records] == [True, False, True, False, True]


def test_summarize_per_dataset():
    recs = []
    for ds, ious in (("refcoco_val", [1.0, 0.2]), ("lisa_test", [0.6])):
        for v in ious:
            recs.append({"dataset": ds, "kind": "rec", "metrics": {"iou": v, "correct": v > 0.5, "parsed": True}})
    recs.append({"dataset": "lisa_test", "kind": "rec", "metrics": None})  # no gold box: skipped
    s = summarize(recs, 1.0)
    assert s["refcoco_val"]["rec"]["acc@0.5"] == 0.5
    assert s["lisa_test"]["rec"] == {"n": 1, "skipped": 1, "acc@0.5": 1.0, "mean_iou": 0.6, "parse_rate": 1.0}
    assert s["all"]["rec"]["acc@0.5"] == pytest.approx(2 / 3)


def test_metric_kind_by_reward_method_and_flag():
    from core.plugins import PluginHost

    reg = PluginHost(["text", "grounding", "detection", "math"]).registry
    cfg = _cfg([{"name": "all_match"}])

    def kind(method, forced=None):
        return metric_kind(Sample(id="x", images=[], messages=[], reward_method=method), forced, reg, cfg).kind

    assert kind("iou") == "rec" and kind("odLength") == "detection" and kind("math") == "math"
    assert kind("all_match") == "exact_match" and kind("mcq") == "reward:mcq"
    # no method: the kind the config's first reward declares (all_match: exact_match), as training's eval
    assert kind(None) == "exact_match"
    assert kind("mcq", "math") == "math" and kind("iou", "reward:mcq") == "reward:mcq"
    with pytest.raises(ConfigError, match="no installed reward declares eval_metric 'nope'"):
        kind("iou", "nope")
    assert kind("iou", "detection") == "detection"
    with pytest.raises(ConfigError, match="no installed reward serves reward_method 'nonsense'"):
        kind("nonsense")


def test_select_samples_limit_and_seed():
    data = list(range(20))
    assert select_samples(data, 5, 0, shuffle=False) == [0, 1, 2, 3, 4]
    a = select_samples(data, 5, 1, shuffle=True)
    assert a == select_samples(data, 5, 1, shuffle=True) and a == sorted(a) and len(a) == 5
    assert a != select_samples(data, 5, 2, shuffle=True)
    assert select_samples(data, None, 0, shuffle=True) == data


def test_reward_errors_and_timeouts_are_reported_not_silently_zero():
    """An outage of the eval reward reads as counted errors, not as "accuracy 0.000"."""
    import time as _time

    from core.interfaces import Reward
    from core.plugins.registry import Registry

    class Flaky(Reward):
        name = "flaky"

        def score(self, batch):
            if any(it.completion == "hang" for it in batch):
                _time.sleep(3)
            if any(it.completion == "boom" for it in batch):
                raise ConnectionError("judge server down")
            return [1.0] * len(batch)

    reg = Registry()
    reg.add("rewards", Flaky, "test")
    cfg = _cfg([{"name": "flaky", "timeout_s": 0.5}])
    records = [_record("reward:flaky", c, "x", "d") for c in ("ok", "boom", "ok2")]
    summary = score_records(records, cfg, reg)
    s = summary["d"]["reward:flaky"]
    assert s["reward_errors"] == 1 and s["reward_timeouts"] == 0 and s["accuracy"] == pytest.approx(2 / 3)
    assert records[1]["metrics"]["reward_failure"] == "error" and "reward_failure" not in records[0]["metrics"]
    records = [_record("reward:flaky", c, "x", "d") for c in ("hang", "ok")]
    s = score_records(records, cfg, reg)["d"]["reward:flaky"]
    assert s["reward_errors"] == 2 and s["reward_timeouts"] == 2


def test_training_eval_line_shows_reward_failures():
    from core.runtime.evaluator import eval_line

    ok = {"accuracy": 0.5, "metric": "rec", "num_samples": 4, "reward_errors": 0, "reward_timeouts": 0}
    assert eval_line("after training", ok).startswith("eval after training: accuracy 0.500 (rec, n=4")
    assert "reward errors 0/4" in eval_line("after training", ok)
    down = {**ok, "accuracy": 0.0, "metric": "reward:judge", "mean_reward": 0.0, "reward_errors": 4,
            "reward_timeouts": 4}
    line = eval_line("before training", down)
    assert "reward errors 4/4, timeouts 4" in line and "lower bound" in line


def test_runner_result_marks_failed_rows():
    from core.interfaces import Reward, RewardBatch
    from core.runtime.reward_runner import RewardRunner, RewardSpec

    class Half(Reward):
        name = "half"

        def score(self, batch):
            return [1.0 if it.completion == "a" else float("nan") for it in batch]

    res = RewardRunner([RewardSpec("half", Half(), 1.0, 5.0, "zero")])(
        RewardBatch([RewardItem(completion=c, solution="") for c in ("a", "b")]))
    assert res.failed[:, 0].tolist() == [False, True] and res.timed_out[:, 0].tolist() == [False, False]
