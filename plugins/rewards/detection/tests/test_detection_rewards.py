"""Golden values for the detection rewards: COCO mAP / AP50 (cross-checked by hand), odLength, weighted_sum."""

from __future__ import annotations

import json
import logging

import pytest
from vlmr1_detection.rewards import MapAP50Reward, MapReward, ODLengthReward, WeightedSumReward, coco_ap

from core.interfaces import DetObject, RewardBatch, RewardContext, RewardItem, parse_objects
from core.plugins import PluginHost

CAT = [0, 0, 10, 10]
CAT2 = [20, 20, 30, 30]


def objs(*pairs) -> list[dict]:
    return [{"bbox_2d": b, "label": lab} for b, lab in pairs]


def ans(objects, fence: bool = True) -> str:
    body = objects if isinstance(objects, str) else json.dumps(objects)
    if fence:
        body = f"```json\n{body}\n```"
    return f"<think>I see them</think><answer>{body}</answer>"


def sol(objects) -> str:
    body = objects if isinstance(objects, str) else "```json\n" + json.dumps(objects) + "\n```"
    return f"<answer>{body}</answer>"


def score(reward, completion, solution, **kw):
    return reward.score(RewardBatch([RewardItem(completion=completion, solution=solution, **kw)]))[0]


# ---- parsing ------------------------------------------------------------------------------
def test_parse_objects_forms():
    o = objs(([1, 2, 3, 4], "Cat"))
    assert parse_objects(ans(o)) == [DetObject([1, 2, 3, 4], "cat")]  # fenced, label lower-cased
    assert parse_objects(ans(o, fence=False)) == [DetObject([1, 2, 3, 4], "cat")]
    assert parse_objects(ans(o), case_sensitive=True)[0].label == "Cat"
    assert parse_objects('Here: [{"bbox_2d": [1, 2, 3, 4], "label": "cat"}] done') == [DetObject([1, 2, 3, 4], "cat")]
    assert parse_objects('{"bbox_2d": [1, 2, 3, 4], "label": "cat"}') == [DetObject([1, 2, 3, 4], "cat")]
    assert parse_objects(o) == [DetObject([1, 2, 3, 4], "cat")]  # already a list
    assert parse_objects("<answer>None</answer>") == []
    assert parse_objects("<answer> none </answer>") == []
    assert parse_objects(ans("[]")) == []
    # malformed entries are kept (they count as predictions) but have no box
    assert parse_objects('[{"bbox_2d": [1, 2, 3], "label": "cat"}, 7]') == [DetObject(None, "cat"), DetObject(None, "")]


@pytest.mark.parametrize("text", ["", "<answer></answer>", ans('[{"bbox_2d": [1, 2, 3, 4], "label": '), "the cat",
                                  ans('"cat"')])
def test_parse_objects_unparsable(text):
    assert parse_objects(text) is None


# ---- mAP: pycocotools against hand computation ---------------------------------------------------
def test_coco_ap_one_of_two_found_hand_computed():
    # 2 gt cats, 1 exact detection: precision 1 up to recall 0.5, nothing beyond. COCO's
    # 101-point interpolation: recall points 0.00..0.50 (51 of 101) have precision 1.
    ap, ap50 = coco_ap([DetObject(CAT, "cat")], [DetObject(CAT, "cat"), DetObject(CAT2, "cat")])
    assert ap == pytest.approx(51 / 101) and ap50 == pytest.approx(51 / 101)


def test_coco_ap_partial_overlap_hand_computed():
    # IoU 0.72 (10x7.2 inside 10x10): a match at thresholds .50 .55 .60 .65 .70, not .75 ... .95
    ap, ap50 = coco_ap([DetObject([0, 0, 10, 7.2], "cat")], [DetObject(CAT, "cat")])
    assert ap == pytest.approx(5 / 10) and ap50 == pytest.approx(1.0)


def test_coco_ap_false_positive_order_hand_computed():
    fp = DetObject([50, 50, 60, 60], "cat")
    # equal scores keep the answer's order: TP first -> precision 1 at recall 1 -> AP 1
    assert coco_ap([DetObject(CAT, "cat"), fp], [DetObject(CAT, "cat")]) == pytest.approx((1.0, 1.0))
    # FP first -> the TP comes at precision 1/2 -> AP 1/2
    assert coco_ap([fp, DetObject(CAT, "cat")], [DetObject(CAT, "cat")]) == pytest.approx((0.5, 0.5))


def test_coco_ap_two_classes_mean():
    gts = [DetObject(CAT, "cat"), DetObject(CAT2, "dog")]
    # cat AP 1, dog AP 0 (its box misses) -> mean 0.5; a label absent from the gt is dropped
    preds = [DetObject(CAT, "cat"), DetObject([40, 40, 50, 50], "dog"), DetObject(CAT2, "zebra")]
    assert coco_ap(preds, gts) == pytest.approx((0.5, 0.5))
    assert coco_ap([DetObject(CAT, "zebra")], gts) == (0.0, 0.0)


def test_coco_ap_prints_nothing(capsys):
    coco_ap([DetObject(CAT, "cat")], [DetObject(CAT, "cat")])
    assert capsys.readouterr().out == ""


# ---- map / map50 rewards ---------------------------------------------------------------------
def test_map_reward_rules():
    r = MapReward()
    two = sol(objs((CAT, "cat"), (CAT2, "cat")))
    assert score(r, ans(objs((CAT, "cat"))), two) == pytest.approx(51 / 101)
    assert score(r, ans(objs((CAT, "cat"), (CAT2, "cat"))), two) == pytest.approx(1.0)
    assert score(r, ans(objs(([0, 0, 10, 7.2], "cat"))), sol(objs((CAT, "cat")))) == pytest.approx(0.5)
    assert score(MapAP50Reward(), ans(objs(([0, 0, 10, 7.2], "cat"))), sol(objs((CAT, "cat")))) == pytest.approx(1)
    assert score(MapReward.from_options({"ap50": True}), ans(objs(([0, 0, 10, 7.2], "cat"))),
                 sol(objs((CAT, "cat")))) == pytest.approx(1.0)


@pytest.mark.parametrize("completion, solution, expected", [
    (ans("None", fence=False), sol("None"), 1.0),  # no objects, none predicted
    (ans("[]", fence=False), "None", 1.0),
    (ans(objs((CAT, "cat"))), sol("None"), 0.0),  # objects predicted on an empty image
    (ans("None", fence=False), sol(objs((CAT, "cat"))), 0.0),  # nothing predicted
    ("", sol("None"), 0.0),  # unparsable prediction: 0 even on an empty image (VLM-R1 gave 1.0)
    (ans('[{"bbox_2d": [0, 0'), sol("None"), 0.0),
    (ans(objs(([10, 0, 0, 10], "cat"))), sol(objs((CAT, "cat"))), 0.0),  # x2 < x1: dropped
    (ans(objs((CAT, "Cat "))), sol(objs((CAT, "cat"))), 1.0),  # label normalised
])
def test_map_none_and_edge_cases(completion, solution, expected):
    assert score(MapReward(), completion, solution) == pytest.approx(expected)
    assert score(ODLengthReward(), completion, solution) == pytest.approx(expected)


def test_bad_solution_is_not_applicable(caplog):
    with caplog.at_level(logging.WARNING):
        assert score(MapReward(), ans(objs((CAT, "cat"))), "a cat") is None
    assert "not applicable" in caplog.text


def test_predicted_boxes_are_mapped_to_original_pixels():
    def to_orig(box, i=0):  # resized 500x250 -> original 1000x500
        return [v * 2 for v in box]

    comp = ans(objs(([0, 0, 5, 5], "cat")))
    kw = dict(box_to_original=to_orig, box_convention="absolute_resized")
    assert score(MapReward(), comp, sol(objs((CAT, "cat"))), **kw) == pytest.approx(1.0)
    assert score(MapReward.from_options({"map_boxes": False}), comp, sol(objs((CAT, "cat"))), **kw) == 0.0
    with pytest.raises(ValueError, match="unknown"):
        score(MapReward(), comp, sol(objs((CAT, "cat"))), box_convention="unknown")


# ---- odLength ---------------------------------------------------------------------------------
def test_od_length_hand_computed():
    r = ODLengthReward()
    fp = ([50, 50, 60, 60], "cat")
    # AP 1 (TP first) x min(1, 1/2)
    assert score(r, ans(objs((CAT, "cat"), fp)), sol(objs((CAT, "cat")))) == pytest.approx(0.5)
    # 1 of 2 found: AP 51/101 x min(1, 2/1) = 51/101
    assert score(r, ans(objs((CAT, "cat"))), sol(objs((CAT, "cat"), (CAT2, "cat")))) == pytest.approx(51 / 101)
    # a malformed entry still counts as a listed object: AP 1 x 1/2
    assert score(r, ans('[{"bbox_2d": [0, 0, 10, 10], "label": "cat"}, {"label": "cat"}]'),
                 sol(objs((CAT, "cat")))) == pytest.approx(0.5)


# ---- weighted_sum ---------------------------------------------------------------------------------
def test_weighted_sum_hand_computed():
    gt = sol(objs((CAT, "cat"), ([20, 0, 30, 10], "dog")))
    pred = ans(objs(([0, 0, 10, 5], "cat"), ([20, 0, 30, 10], "dog"), ([50, 50, 60, 60], "bird")))
    # matches: dog IoU 1, cat IoU 0.5 (>= 0.5); bird unmatched.
    # position = 1.5/2 = 0.75; completeness = 1 - (0/2 + 1/3)/2 = 5/6; 0.7*0.75 + 0.3*5/6 = 0.775
    assert score(WeightedSumReward(), pred, gt) == pytest.approx(0.775)
    # beta weights the label accuracy: (0.7*0.75 + 1*2/2 + 0.3*5/6) / 2
    assert score(WeightedSumReward.from_options({"beta": 1.0}), pred, gt) == pytest.approx((0.525 + 1 + 0.25) / 2)


@pytest.mark.parametrize("pred, expected", [
    (objs((CAT, "dog")), 0.3),  # matched box, wrong label: IoU counts 0, completeness 1
    (objs(([0, 0, 10, 4], "cat")), 0.0),  # IoU 0.4 < 0.5: miss 1, false alarm 1
    (objs((CAT, "cat"), (CAT, "cat")), 0.7 + 0.3 * (1 - 0.25)),  # duplicate: fa 1/2
    (objs(([10, 0, 0, 10], "cat")), 0.0),  # x2 < x1: IoU 0
    ("None", 0.0),
])
def test_weighted_sum_edge_cases(pred, expected):
    comp = ans(pred, fence=pred != "None")
    assert score(WeightedSumReward(), comp, sol(objs((CAT, "cat")))) == pytest.approx(expected)


def test_weighted_sum_none_cases_and_greedy_order():
    r = WeightedSumReward()
    assert score(r, ans("None", fence=False), sol("None")) == 1.0
    assert score(r, ans(objs((CAT, "cat"))), "None") == 0.0
    # greedy takes the best pair first: pred0 overlaps gt0 by 0.6 and gt1 by 1.0 -> it goes to gt1,
    # pred1 (IoU 0.6 with gt0) then takes gt0: position (1 + 0.6)/2, completeness 1
    gt = sol(objs(([0, 0, 10, 10], "a"), ([0, 0, 10, 6], "a")))
    pred = ans(objs(([0, 0, 10, 6], "a"), ([0, 4, 10, 10], "a")))
    assert score(r, pred, gt) == pytest.approx(0.7 * 0.8 + 0.3)


# ---- routing ---------------------------------------------------------------------------------
def test_accuracy_router_serves_vlmr1_detection_methods():
    registry = PluginHost(plugins="detection").registry
    router = registry.create("rewards", "accuracy")
    router.setup(RewardContext(registry=registry))
    one = sol(objs((CAT, "cat")))
    partial = ans(objs(([0, 0, 10, 7.2], "cat")))
    items = [RewardItem(partial, one, reward_method=m) for m in ("map", "od_ap", "od_ap50", "odLength")]
    items.append(RewardItem(ans(objs((CAT, "cat"))), one, reward_method="weighted_sum"))
    assert router.score(RewardBatch(items)) == pytest.approx([0.5, 0.5, 1.0, 0.5, 1.0])


# ---- require_answer_tag (same option and default as the grounding iou reward) -------------------------
BARE = json.dumps(objs((CAT, "cat")))  # a correct answer, but outside any <answer> block
ONE = sol(objs((CAT, "cat")))


@pytest.mark.parametrize("cls", [MapReward, MapAP50Reward, ODLengthReward, WeightedSumReward])
def test_answer_tag_required_by_default(cls):
    assert cls.Options().require_answer_tag is True
    assert score(cls(), BARE, ONE) == 0.0  # the old parser read the bare JSON and scored 1.0
    assert score(cls(), "None", sol("None")) == 0.0  # "no objects" must be answered in the block too
    assert score(cls(), ans(objs((CAT, "cat"))), ONE) == pytest.approx(1.0)


@pytest.mark.parametrize("cls", [MapReward, MapAP50Reward, ODLengthReward, WeightedSumReward])
def test_answer_tag_optional_when_switched_off(cls):
    r = cls.from_options({"require_answer_tag": False})
    assert score(r, BARE, ONE) == pytest.approx(1.0)
    assert score(r, "None", sol("None")) == 1.0
    assert score(r, ans(objs(([50, 50, 60, 60], "cat"))), ONE) == 0.0  # the block still wins when present


def test_router_methods_follow_the_option():
    registry = PluginHost(plugins="detection").registry
    for opts, expected in (({}, 0.0), ({"reward_options": {m: {"require_answer_tag": False} for m in
                                                             ("map", "map50", "od_length", "weighted_sum")}}, 1.0)):
        router = registry.create("rewards", "accuracy", opts)
        router.setup(RewardContext(registry=registry))
        items = [RewardItem(BARE, ONE, reward_method=m) for m in ("map", "od_ap", "od_ap50", "odLength",
                                                                   "weighted_sum")]
        assert router.score(RewardBatch(items)) == pytest.approx([expected] * 5)
