"""Golden values for IoU (continuous boxes, coordinate transforms) and the REC format reward."""

from __future__ import annotations

import functools
import logging

import pytest
from vlmr1_grounding.rewards import IoUReward, RecFormatReward

from core.interfaces import ModelFamily, RewardBatch, RewardContext, RewardItem, iou, parse_box
from core.plugins import PluginHost


def answer(box_json: str) -> str:
    return f"<think>the dog is on the left</think><answer>{box_json}</answer>"


def score(reward, completion, solution, **kw):
    return reward.score(RewardBatch([RewardItem(completion=completion, solution=solution, **kw)]))[0]


# ---- the box convention (hand-computed) ---------------------------------------------------------
@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),
    ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges: x2 is exclusive
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),  # 1-pixel box (VLM-R1's mixed formula scored it 0)
    ([0, 0, 10, 10], [9, 0, 19, 10], 10 / 190),  # overlap 1 px wide (VLM-R1: 0)
    ([0, 0, 10, 10], [0, 0, 10, 10.5], 100 / 105),
    ([5, 5, 5, 9], [0, 0, 10, 10], 0.0),  # zero width
    ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # empty union
])
def test_iou_hand_computed(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ('{"bbox_2d": [10, 20, 30, 40], "label": "dog"}', [10, 20, 30, 40]),
    ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]', [1, 2, 3, 4]),  # first object
    ('```json\n[{"bbox_2d": [1.5, 2, 3, 4.25], "label": "dog"}]\n```', [1.5, 2, 3, 4.25]),
    ("The box is [10, 20, 30, 40].", [10, 20, 30, 40]),
    ("[10,20,30,40]", [10, 20, 30, 40]),
    ('{"bbox_2d": [10, 20, 30]}', None),  # three numbers
    ('{"bbox_2d": [10, 20, 30, 40], "label": "do', [10, 20, 30, 40]),  # broken JSON: the bare list reads
    ('{"bbox_2d": [10, 20, 30, 40', None),  # unclosed list
    ("no box here", None),
    ("", None),
    ([1, 2, 3, 4], [1, 2, 3, 4]),
    ({"bbox_2d": [1, 2, 3, 4]}, [1, 2, 3, 4]),
    (["a", "b", "c", "d"], None),
])
def test_parse_box(text, expected):
    assert parse_box(text) == expected


# ---- IoU reward ----------------------------------------------------------------------------
def test_iou_reward_identity_convention():
    r = IoUReward()
    assert score(r, answer('{"bbox_2d": [5, 5, 15, 15], "label": "dog"}'), [0, 0, 10, 10]) == pytest.approx(1 / 7)
    assert score(r, answer("[0, 0, 10, 10]"), "<answer> [0, 0, 10, 10] </answer>") == 1.0
    assert score(r, answer("[0, 0, 10, 10]"), '{"bbox_2d": [0, 0, 10, 5]}') == 0.5


class _Family(ModelFamily):
    name = "test-family"


def transform(convention: str, original: tuple[int, int], resized: tuple[int, int]):
    fam = type("F", (_Family,), {"box_convention": convention})()

    def to_original(box, i=0):
        return fam.box_to_original(box, original, resized)

    return to_original


def test_qwen25_resized_coordinates_are_mapped_back():
    # Original 1000x500 image seen by the model resized to 700x350 (scale 10/7 on both axes).
    to_orig = transform("absolute_resized", (1000, 500), (700, 350))
    comp = answer('{"bbox_2d": [70, 35, 140, 70], "label": "dog"}')  # = [100, 50, 200, 100] original
    r = IoUReward()
    kw = dict(box_to_original=to_orig, box_convention="absolute_resized", image_sizes=[(1000, 500)])
    assert score(r, comp, [100, 50, 200, 100], **kw) == pytest.approx(1.0)
    assert score(r, comp, [100, 50, 200, 150], **kw) == pytest.approx(0.5)
    # Read without the transform the box overlaps far less (inter 40x20, union 2450 + 5000 - 800).
    assert score(r, comp, [100, 50, 200, 100]) == pytest.approx(800 / 6650)
    # Qwen2-VL / InternVL write 0-1000 relative coordinates.
    rel = transform("normalized_1000", (1000, 500), (700, 350))
    assert score(r, answer("[100, 100, 200, 200]"), [100, 50, 200, 100], box_to_original=rel,
                 box_convention="normalized_1000") == pytest.approx(1.0)


def test_iou_threshold_variant_is_strict():
    r = IoUReward.from_options({"threshold": 0.5})
    assert score(r, answer("[0, 0, 10, 10]"), [0, 0, 10, 10]) == 1.0
    assert score(r, answer("[0, 0, 10, 5]"), [0, 0, 10, 10]) == 0.0  # IoU exactly 0.5 is not > 0.5
    assert score(r, answer("[0, 0, 10, 6]"), [0, 0, 10, 10]) == 1.0  # IoU 0.6


@pytest.mark.parametrize("completion", [
    "",
    "[0, 0, 10, 10]",  # no answer block
    "<think>x</think>",
    answer("the dog"),
    answer('{"bbox_2d": [0, 0, 10]}'),
    answer('{"bbox_2d": "left"}'),
    answer("[10, 0, 0, 10]"),  # x2 < x1 is not reordered
    answer("[0, 10, 10, 0]"),  # y2 < y1
    answer("[5, 5, 5, 5]"),  # degenerate
])
def test_iou_edge_cases_score_zero(completion):
    assert score(IoUReward(), completion, [0, 0, 10, 10]) == 0.0


def test_iou_without_answer_tag_requirement_and_last_block():
    r = IoUReward.from_options({"require_answer_tag": False})
    assert score(r, "The dog is at [0, 0, 10, 10].", [0, 0, 10, 10]) == 1.0
    # with tags, the last block counts
    assert score(IoUReward(), "<answer>[20,20,30,30]</answer> no, <answer>[0, 0, 10, 10]</answer>",
                 [0, 0, 10, 10]) == 1.0


def test_bad_solution_is_not_applicable_with_one_warning(caplog):
    r = IoUReward()
    with caplog.at_level(logging.WARNING):
        out = r.score(RewardBatch([RewardItem(answer("[0,0,1,1]"), "the dog"),
                                   RewardItem(answer("[0,0,1,1]"), [5, 5, 5, 9]),
                                   RewardItem(answer("[0,0,1,1]"), [0, 0, 1, 1])]))
    assert out == [None, None, 1.0]
    assert sum("no usable box" in rec.getMessage() for rec in caplog.records) == 1


def test_unknown_convention_is_refused_unless_allowed():
    comp = answer("[0, 0, 10, 10]")
    with pytest.raises(ValueError, match="box convention is 'unknown'"):
        score(IoUReward(), comp, [0, 0, 10, 10], box_convention="unknown")
    r = IoUReward.from_options({"allow_unknown_convention": True})
    assert score(r, comp, [0, 0, 10, 10], box_convention="unknown") == 1.0


def test_image_index_is_passed_to_the_transform():
    seen = []

    def to_orig(box, i=0):
        seen.append(i)
        return [v * 2 for v in box]

    r = IoUReward.from_options({"image_index": 1})
    assert score(r, answer("[0, 0, 5, 5]"), [0, 0, 10, 10], box_to_original=to_orig) == 1.0
    assert seen == [1]


def test_transform_is_used_with_functools_partial_too():
    fam = type("F", (_Family,), {"box_convention": "absolute_resized"})()
    to_orig = functools.partial(lambda box, i, f: f.box_to_original(box, (200, 100), (100, 50)), f=fam)
    assert score(IoUReward(), answer("[0, 0, 50, 25]"), [0, 0, 100, 50], box_to_original=to_orig) == 1.0


# ---- REC format ---------------------------------------------------------------------------
@pytest.mark.parametrize("completion, default, no_object, ints_only, full", [
    (answer('{"bbox_2d": [1, 2, 3, 4], "label": "dog"}'), 1.0, 1.0, 1.0, 1.0),
    (answer('[{"bbox_2d": [1,2,3,4]}]'), 1.0, 1.0, 1.0, 1.0),
    (answer("[1, 2, 3, 4]"), 0.0, 1.0, 0.0, 0.0),  # no JSON object around the box
    (answer('{"bbox_2d": [1.5, 2, 3, 4]}'), 1.0, 1.0, 0.0, 1.0),  # decimals
    (answer('{"bbox_2d": [1, 2, 3]}'), 0.0, 0.0, 0.0, 0.0),
    (answer("the dog"), 0.0, 0.0, 0.0, 0.0),
    ('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 0.0, 0.0, 0.0, 0.0),  # no think block
    ("Sure. " + answer('{"bbox_2d": [1, 2, 3, 4]}'), 1.0, 1.0, 1.0, 0.0),  # text before: searched
    ("", 0.0, 0.0, 0.0, 0.0),
])
def test_rec_format(completion, default, no_object, ints_only, full):
    variants = [({}, default), ({"require_object": False}, no_object), ({"allow_float": False}, ints_only),
                ({"full_match": True}, full)]
    for opts, expected in variants:
        assert RecFormatReward.from_options(opts).score(RewardBatch([RewardItem(completion, None)])) == [expected], opts


# ---- routing ------------------------------------------------------------------------------
def test_accuracy_router_sends_rec_and_iou_rows_to_iou():
    registry = PluginHost(plugins="grounding").registry
    router = registry.create("rewards", "accuracy", {"reward_options": {"iou": {"threshold": 0.5}}})
    router.setup(RewardContext(registry=registry))
    items = [RewardItem(answer("[0, 0, 10, 10]"), [0, 0, 10, 10], reward_method="rec"),
             RewardItem(answer("[0, 0, 10, 4]"), [0, 0, 10, 10], reward_method="iou")]
    assert router.score(RewardBatch(items)) == [1.0, 0.0]
