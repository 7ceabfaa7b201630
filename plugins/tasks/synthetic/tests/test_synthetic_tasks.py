"""Tests of the synthetic task plugin: determinism, split disjointness, images, options."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError
from vlmr1_synthetic.color import SyntheticColor
from vlmr1_synthetic.grounding import SyntheticGrounding

from core.interfaces import Sample


def _color(**kw) -> SyntheticColor:
    return SyntheticColor.from_options(kw)


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode())
        h.update(repr(s.solution).encode())
        h.update(s.question.encode())
        h.update(s.load_images()[0].tobytes())
    return h.hexdigest()


# ---- synthetic_color ----------------------------------------------------------------------
def test_color_registered_through_entry_point():
    from core.plugins import PluginHost

    host = PluginHost(plugins="synthetic")
    task = host.registry.create("tasks", "synthetic_color", {"num_train": 3})
    assert isinstance(task, SyntheticColor)
    assert len(task.load("train")) == 3
    assert host.registry.get("tasks", "synthetic_grounding") is SyntheticGrounding


def test_color_sample_shape_and_golden_pixels():
    task = _color(num_train=16, image_size=28)
    samples = task.load("train")
    assert len(samples) == 16 and len(task.load("eval")) == 64
    s = samples[0]
    assert isinstance(s, Sample)
    # The question stands before the image; exactly one placeholder for one image.
    assert s.messages == [{"role": "user", "content": [
        {"type": "text", "text": "What colour is this image?"}, {"type": "image"}]}]
    assert s.reward_method == "all_match"
    assert s.solution in {"red", "green", "blue", "yellow"}
    assert s.meta["reference_completion"] == s.solution
    (img,) = s.load_images()
    assert img.mode == "RGB" and img.size == (28, 28)
    golden = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
    for smp in samples:
        arr = np.asarray(smp.load_images()[0])
        assert (arr == golden[smp.solution]).all(), smp.id


def test_color_r1_format_and_text_after_image():
    s = _color(answer_format="r1", text_position="after_image", prompt="Which colour?").load("eval")[5]
    content = s.messages[0]["content"]
    assert content[0] == {"type": "image"}
    assert content[1]["text"] == ("Which colour? First output the thinking process in <think> </think> tags "
                                  "and then output the final answer in <answer> </answer> tags.")
    w = s.solution
    assert s.meta["reference_completion"] == f"<think>The image is {w}.</think><answer>{w}</answer>"


def test_color_deterministic_across_instances_and_access_order():
    a = _color(noise=20, seed=7).load("train")
    b = _color(noise=20, seed=7).load("train")
    # Random access: reading backwards gives the same samples as reading forwards.
    fwd = [(a[i].solution, a[i].load_images()[0].tobytes()) for i in range(20)]
    bwd = [(b[i].solution, b[i].load_images()[0].tobytes()) for i in reversed(range(20))][::-1]
    assert fwd == bwd
    assert a[-1].id == a[len(a) - 1].id
    with pytest.raises(IndexError):
        a[len(a)]


def test_color_identical_in_another_process():
    here = _digest(_color(noise=12, seed=3).load("eval")[:8])
    code = ("from vlmr1_synthetic.color import SyntheticColor;"
            "import hashlib;h=hashlib.sha256();"
            "[ (h.update(s.id.encode()),h.update(repr(s.solution).encode()),h.update(s.question.encode()),"
            "h.update(s.load_images()[0].tobytes())) for s in "
            "SyntheticColor.from_options({'noise':12,'seed':3}).load('eval')[:8]];print(h.hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_color_splits_disjoint_and_seed_matters():
    task = _color(noise=8, num_train=64, num_eval=64)
    train, ev = task.load("train"), task.load("eval")
    assert not {s.id for s in train} & {s.id for s in ev}
    train_imgs = {s.load_images()[0].tobytes() for s in train}
    assert not any(s.load_images()[0].tobytes() in train_imgs for s in ev)
    assert [s.solution for s in train] != [s.solution for s in ev]
    other = _color(noise=8, num_train=64, seed=1).load("train")
    assert [s.solution for s in other] != [s.solution for s in train]
    # Aliases share the eval stream.
    assert task.load("validation")[3].id == ev[3].id


def test_color_label_balance():
    from collections import Counter

    counts = Counter(s.solution for s in _color().load("train"))
    assert set(counts) == {"red", "green", "blue", "yellow"}
    assert all(0.15 < c / 512 < 0.35 for c in counts.values()), counts


def test_color_noise_bounded():
    s = _color(noise=30).load("train")[0]
    arr = np.asarray(s.load_images()[0]).astype(int)
    base = np.array({"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
                     "yellow": (255, 255, 0)}[s.solution])
    diff = np.abs(arr - base)
    assert diff.max() <= 30 and diff.max() > 0


def test_color_custom_colours_and_pickle():
    task = _color(colours=["orange", "#123456"], num_train=30)
    sols = {s.solution for s in task.load("train")}
    assert sols == {"orange", "#123456"}
    s = task.load("train")[0]
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.load_images()[0].tobytes() == s.load_images()[0].tobytes()
    seq = pickle.loads(pickle.dumps(task.load("train")))
    assert seq[4].id == task.load("train")[4].id


@pytest.mark.parametrize("bad, where", [
    ({"colours": ["red", "nocolour"]}, "nocolour"),
    ({"colours": ["red", "red"]}, "distinct"),
    ({"colours": ["red"]}, "colours"),
    ({"colours": ["red", "#ff0000"]}, "same RGB"),
    ({"answer_format": "json"}, "answer_format"),
    ({"num_trian": 3}, "num_trian"),
])
def test_color_bad_options(bad, where):
    with pytest.raises(ValidationError, match=where):
        _color(**bad)


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        _color().load("dev")


# ---- synthetic_grounding ------------------------------------------------------------------
def _bbox_of_pixels(arr: np.ndarray, rgb, cell: tuple[int, int], size: int = 28) -> list[int]:
    """Tight box of the pixels of colour ``rgb`` inside grid cell ``(col, row)``."""
    col, row = cell
    sub = arr[row * size:(row + 1) * size, col * size:(col + 1) * size]
    ys, xs = np.nonzero((sub == rgb).all(-1))
    return [int(xs.min()) + col * size, int(ys.min()) + row * size,
            int(xs.max()) + 1 + col * size, int(ys.max()) + 1 + row * size]


@pytest.mark.parametrize("num_objects", [1, 2])
def test_grounding_boxes_are_tight_inclusive_exclusive(num_objects):
    from vlmr1_synthetic.common import colour_rgb

    task = SyntheticGrounding.from_options({"num_objects": num_objects, "num_eval": 24})
    for s in task.load("eval"):
        arr = np.asarray(s.load_images()[0])
        assert arr.shape == (112, 112, 3)
        objs = s.meta["objects"]
        assert len(objs) == num_objects
        assert len({(o["colour"], o["shape"]) for o in objs}) == num_objects  # question names one object
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            cell = (x1 // 28, y1 // 28)
            assert _bbox_of_pixels(arr, colour_rgb(o["colour"]), cell) == o["box"], (s.id, o)
            assert x2 - x1 == y2 - y1 == task.object_size == 21
            # Each object stays inside one grid cell of 28 px.
            assert x1 // 28 == (x2 - 1) // 28 and y1 // 28 == (y2 - 1) // 28
        target = objs[s.meta["target_index"]]
        assert s.solution == target["box"]
        assert s.reward_method == "iou"
        assert s.question == f"Locate the {target['colour']} {target['shape']}."
        assert s.meta["reference_completion"] == "[" + ", ".join(map(str, target["box"])) + "]"


def test_grounding_golden_square_and_circle_pixels():
    task = SyntheticGrounding.from_options({"image_size": 8, "grid": 1, "object_size": 8, "shapes": ["square"]})
    arr = np.asarray(task.load("train")[0].load_images()[0])
    assert (arr != 0).any(-1).all()  # an 8x8 square fills the whole 8x8 image
    assert task.load("train")[0].solution == [0, 0, 8, 8]
    task = SyntheticGrounding.from_options({"image_size": 20, "grid": 1, "object_size": 20, "shapes": ["circle"]})
    arr = np.asarray(task.load("train")[0].load_images()[0])
    filled = (arr != 0).any(-1)
    assert not filled[0, 0] and filled[10, 10]  # a circle leaves the corners empty


def test_grounding_deterministic_and_disjoint():
    a = SyntheticGrounding.from_options({"num_objects": 2, "seed": 5})
    b = SyntheticGrounding.from_options({"num_objects": 2, "seed": 5})
    assert _digest(a.load("train")[:10]) == _digest(b.load("train")[:10])
    tr = [tuple(s.solution) + (s.question,) for s in a.load("train")[:64]]
    ev = [tuple(s.solution) + (s.question,) for s in a.load("eval")[:64]]
    assert tr != ev


def test_grounding_r1_format():
    s = SyntheticGrounding.from_options({"answer_format": "r1"}).load("train")[0]
    assert s.question.endswith("in <answer> </answer> tags.")
    assert s.meta["reference_completion"].endswith(f"<answer>[{', '.join(map(str, s.solution))}]</answer>")


@pytest.mark.parametrize("bad, where", [
    ({"num_objects": 9, "colours": ["red", "blue"]}, "num_objects"),
    ({"object_size": 40}, "object_size"),
    ({"image_size": 6, "grid": 4}, "cells"),
    ({"prompt": "Find the {thing}"}, "prompt"),
    ({"shapes": ["triangle"]}, "shapes"),
    ({"background": "red"}, "background"),
])
def test_grounding_bad_options(bad, where):
    with pytest.raises(ValidationError, match=where):
        SyntheticGrounding.from_options(bad)


# ---- synthetic_grounding: the held-out out-of-domain splits -------------------------------
def test_grounding_train_and_eval_unchanged_by_ood_splits():
    """The training distribution is pinned: golden first samples of ``train`` and ``eval``."""
    task = SyntheticGrounding.from_options({"num_objects": 2})
    s = task.load("train")[0]
    assert s.question == "Locate the yellow circle." and s.solution == [1, 34, 22, 55]
    assert [o["box"] for o in s.meta["objects"]] == [[84, 84, 105, 105], [1, 34, 22, 55]]
    e = task.load("eval")[1]
    assert e.question == "Locate the blue square." and e.solution == [87, 91, 108, 112]
    assert task.load("id")[1].id == e.id  # `id` is an alias of `eval`


def test_grounding_ood_reasoning_expressions_name_the_target():
    from vlmr1_synthetic.common import colour_rgb
    from vlmr1_synthetic.grounding import REASONING_KINDS

    task = SyntheticGrounding.from_options({"num_objects": 2, "num_eval": 60})
    kinds = set()
    for s in task.load("ood_reasoning"):
        objs, t = s.meta["objects"], s.meta["target_index"]
        target = objs[t]
        kinds.add(s.meta["expression"])
        assert s.solution == target["box"] and s.meta["split"] == "ood_reasoning"
        assert len({(o["colour"], o["shape"]) for o in objs}) == len(objs)
        others = [o for i, o in enumerate(objs) if i != t]
        if s.meta["expression"] == "only_shape":
            assert s.question == f"Locate the only {target['shape']}."
            assert all(o["shape"] != target["shape"] for o in others)
        elif s.meta["expression"] == "left_of":
            ref = next(o for o in others if s.question.endswith(f"left of the {o['colour']} {o['shape']}."))
            assert target["box"][1] // 28 == ref["box"][1] // 28  # same grid row
            assert target["box"][2] <= ref["box"][0]  # entirely to its left
        else:
            assert s.meta["expression"] == "not_the" and len(objs) == 2
            assert s.question == f"Locate the object that is not the {others[0]['colour']} {others[0]['shape']}."
            # The colour/shape phrase a training-only model keys on names the *other* object.
            assert f"{target['colour']} {target['shape']}" not in s.question
        arr = np.asarray(s.load_images()[0])
        x1, y1, x2, y2 = target["box"]
        assert (arr[(y1 + y2) // 2, (x1 + x2) // 2] == colour_rgb(target["colour"])).all()
    assert kinds == set(REASONING_KINDS)


def test_grounding_ood_visual_adds_distractors_and_a_new_background():
    from vlmr1_synthetic.common import colour_rgb

    task = SyntheticGrounding.from_options({"num_objects": 2, "num_eval": 20})
    assert task.num_objects_in("ood_visual") == 6 and task.num_objects_in("train") == 2
    for s in task.load("ood_visual"):
        objs = s.meta["objects"]
        assert len(objs) == 6 and s.meta["background"] == "#202020"
        target = objs[s.meta["target_index"]]
        assert s.question == f"Locate the {target['colour']} {target['shape']}." and s.solution == target["box"]
        arr = np.asarray(s.load_images()[0])
        occupied = {(o["box"][0] // 28, o["box"][1] // 28) for o in objs}
        free = next((c, r) for r in range(4) for c in range(4) if (c, r) not in occupied)
        assert (arr[free[1] * 28 + 14, free[0] * 28 + 14] == colour_rgb("#202020")).all()
    # Capped by the colour/shape pairs: 2 colours x 1 shape leaves room for 2 objects only.
    small = SyntheticGrounding.from_options({"num_objects": 1, "colours": ["red", "blue"], "shapes": ["square"]})
    assert small.num_objects_in("ood_visual") == 2
    with pytest.raises(ValidationError, match="ood_background"):
        SyntheticGrounding.from_options({"ood_background": "red"})


def test_grounding_split_names_are_checked():
    task = SyntheticGrounding.from_options({})
    with pytest.raises(ValueError, match="unknown split 'ood_size'.*'ood_reasoning'"):
        task.load("ood_size")
    with pytest.raises(ValueError, match="unknown split 'ood_visual'"):
        _color().load("ood_visual")  # the colour task has no OOD splits


def test_grounding_split_example_sheet(tmp_path):
    """The README's example image renders (one row per evaluation split)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "make_split_examples.py"
    spec = importlib.util.spec_from_file_location("make_split_examples", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from PIL import Image

    out = mod.main(str(tmp_path / "sheet.png"))
    assert Image.open(out).size[1] > 3 * 224
