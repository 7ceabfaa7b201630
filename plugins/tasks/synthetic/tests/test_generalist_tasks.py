"""The generalist-base tasks: relational grounding expressions, scene QA, the shifted visual domain."""

from __future__ import annotations

import numpy as np
import pytest
from vlmr1_synthetic.grounding import SHIFTED_BACKGROUND, SyntheticGrounding
from vlmr1_synthetic.scene_qa import SyntheticSceneQA

from core.interfaces import RewardBatch, RewardContext, RewardItem


def _grounding(**kw) -> SyntheticGrounding:
    return SyntheticGrounding.from_options({"num_train": 200, "num_eval": 50, "num_objects": 3, **kw})


def _qa(**kw) -> SyntheticSceneQA:
    return SyntheticSceneQA.from_options({"num_train": 200, "num_eval": 50, **kw})


def _centre(box):
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


def test_relational_expressions_name_the_target():
    task = _grounding(expressions=["colour_shape", "only_shape", "left_of", "not_the", "largest"])
    seen = set()
    for s in task.load("train"):
        objs, t, q = s.meta["objects"], s.meta["target_index"], s.question
        target = objs[t]
        assert s.solution == target["box"]
        kind = s.meta["expression"]
        seen.add(kind)
        if kind == "colour_shape":
            assert q == f"Locate the {target['colour']} {target['shape']}."
        elif kind == "only_shape":
            assert q == f"Locate the only {target['shape']}."
            assert [o["shape"] for o in objs].count(target["shape"]) == 1
        elif kind == "left_of":
            ref = next(o for o in objs if f"{o['colour']} {o['shape']}" in q)
            assert _centre(target["box"])[0] < _centre(ref["box"])[0]
            assert _centre(target["box"])[1] // task.cell_size == _centre(ref["box"])[1] // task.cell_size
        elif kind == "not_the":
            assert len(objs) == 2 and f"{target['colour']} {target['shape']}" not in q
        else:
            assert q == "Locate the largest object."
            assert all(_area(o["box"]) < _area(target["box"]) for i, o in enumerate(objs) if i != t)
    assert seen == {"colour_shape", "only_shape", "left_of", "not_the", "largest"}


def test_expressions_default_keeps_the_old_samples_and_are_deterministic():
    old = [(s.question, s.solution) for s in _grounding().load("train")[:20]]
    assert old == [(s.question, s.solution) for s in _grounding(expressions=["colour_shape"]).load("train")[:20]]
    a = _grounding(expressions=["left_of", "largest"])
    b = _grounding(expressions=["left_of", "largest"])
    assert [(s.question, s.solution) for s in a.load("eval")] == [(s.question, s.solution) for s in b.load("eval")]
    assert [s.question for s in a.load("train")[:30]] != [s.question for s in a.load("eval")[:30]]
    # ood_reasoning is unchanged by the option (its own stream).
    ood = [s.solution for s in _grounding().load("ood_reasoning")[:10]]
    assert [s.solution for s in a.load("ood_reasoning")[:10]] == ood


def test_shifted_domain_changes_pixels_not_boxes():
    plain, shifted = _grounding(), _grounding(domain="shifted")
    for i in range(5):
        p, s = plain.load("train")[i], shifted.load("train")[i]
        assert p.solution == s.solution and p.question == s.question
        arr = np.asarray(s.load_images()[0])
        assert tuple(arr[0, 1]) in {SHIFTED_BACKGROUND, (70, 76, 96)} and s.meta["domain"] == "shifted"
        x1, y1, x2, y2 = s.solution
        # outlined: the object's centre shows the background, its border the object colour.
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        assert tuple(arr[cy, cx]) != tuple(arr[y1 + 1, cx]) or tuple(arr[cy, x1 + 1]) != tuple(arr[cy, cx])


def test_scene_qa_hand_checked_answers():
    task = _qa()
    kinds = set()
    for s in task.load("train"):
        objs, q, a = s.meta["objects"], s.question, s.solution
        kinds.add(s.meta["question_kind"])
        colours = [o["colour"] for o in objs]
        assert len(set(colours)) == len(colours)
        if q.startswith("What colour is the "):
            shape = q.removeprefix("What colour is the ").rstrip("?")
            (only,) = [o for o in objs if o["shape"] == shape]
            assert a == only["colour"]
        elif q.startswith("What shape is the "):
            colour = q.removeprefix("What shape is the ").removesuffix(" object?")
            assert a == next(o["shape"] for o in objs if o["colour"] == colour)
        elif q.startswith("How many "):
            shape = q.removeprefix("How many ").removesuffix("s are there?")
            assert a == str(sum(o["shape"] == shape for o in objs))
        else:
            c, sh = q.removeprefix("Is there a ").rstrip("?").split()
            assert a == ("yes" if any(o["colour"] == c and o["shape"] == sh for o in objs) else "no")
    assert kinds == {"colour", "shape", "count", "yes_no"}
    answers = [s.solution for s in task.load("train") if s.meta["question_kind"] == "yes_no"]
    assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_scene_qa_pixels_match_meta_and_is_deterministic():
    task = _qa(min_objects=2, max_objects=3)
    s = task.load("eval")[3]
    arr = np.asarray(s.load_images()[0])
    for o in s.meta["objects"]:
        x1, y1, x2, y2 = o["box"]
        rgb = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}[o["colour"]]
        assert tuple(arr[(y1 + y2) // 2, (x1 + x2) // 2]) == rgb
    again = _qa(min_objects=2, max_objects=3).load("eval")[3]
    assert (again.question, again.solution, again.meta["objects"]) == (s.question, s.solution, s.meta["objects"])
    assert [x.question for x in task.load("train")[:20]] != [x.question for x in task.load("eval")[:20]]


@pytest.mark.parametrize(("bad", "where"), [({"min_objects": 3, "max_objects": 2}, "min_objects"),
                                             ({"max_objects": 5}, "max_objects"),
                                             ({"questions": ["colour", "why"]}, "questions")])
def test_scene_qa_bad_options(bad, where):
    with pytest.raises(ValueError, match=where):
        _qa(**bad)


def test_gold_answers_score_one_through_the_rewards():
    from core.plugins import PluginHost

    reg = PluginHost("synthetic,grounding,text").registry
    try:
        router = reg.create("rewards", "accuracy", {"reward_options": {"iou": {"require_answer_tag": False}}})
    except LookupError as exc:
        pytest.skip(f"needs the grounding and text reward plugins: {exc}")
    router.setup(RewardContext(registry=reg))
    samples = list(_qa().load("eval")) + list(_grounding(expressions=["left_of", "largest", "not_the"],
                                                         domain="shifted").load("eval"))
    items = [RewardItem(completion=s.meta["reference_completion"], solution=s.solution, reward_method=s.reward_method,
                        image_sizes=s.meta["image_sizes"], meta=s.meta) for s in samples]
    assert router.score(RewardBatch(items)) == [1.0] * len(items)
