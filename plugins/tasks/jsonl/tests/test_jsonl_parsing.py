"""Golden parsing tests of the VLM-R1 JSONL and REC JSON task formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError
from vlmr1_jsonl.jsonl import VlmR1Jsonl
from vlmr1_jsonl.rec import RecJson
from vlmr1_jsonl.templates import QUESTION_TEMPLATES

from core.interfaces import DataError

R1_SUFFIX = (" First output the thinking process in <think> </think> tags and then output the final answer "
             "in <answer> </answer> tags.")
REC_SUFFIX = R1_SUFFIX + " Output the final answer in JSON format."


def png(path: Path, colour=(255, 0, 0), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def row(human: str, gpt="<answer> red </answer>", image=None, **extra) -> dict:
    r = {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}], **extra}
    if image is not None:
        r["image"] = image
    return r


def task(**opts) -> VlmR1Jsonl:
    return VlmR1Jsonl.from_options(opts)


@pytest.fixture
def imgs(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    png(folder / "a.png", (255, 0, 0))
    png(folder / "b.png", (0, 0, 255), size=(5, 4))
    png(folder / "sub" / "c.png", (0, 255, 0))
    return folder


# ---- golden rows ----------------------------------------------------------------------------
def test_single_image_row(tmp_path, imgs):
    f = write_jsonl(tmp_path / "d.jsonl", [row("<image>What colour is it?", image="a.png", id="r1")])
    (s,) = task(data_files=str(f), image_folders=str(imgs)).load("train")
    assert s.id == "r1"
    assert s.messages == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is it?" + R1_SUFFIX}]}]
    assert s.solution == "red"
    assert s.reward_method is None
    assert [os.fspath(p) for p in s.images] == [str(imgs / "a.png")]
    assert s.meta["source_file"] == str(f) and s.meta["source_line"] == 1
    assert s.meta["reference_completion"] == "<answer> red </answer>"
    (img,) = s.load_images()
    assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0)) == (255, 0, 0)


def test_multi_image_row_places_images_at_tags(tmp_path, imgs):
    human = "Before: <image> After: <image> Is there a defect?"
    f = write_jsonl(tmp_path / "gui.jsonl", [row(human, gpt="yes", image=["a.png", "b.png"],
                                                 accu_reward_method="yes_no")])
    (s,) = task(data_files=[str(f)], image_folders=[str(imgs)], question_template="r1").load()
    assert s.messages[0]["content"] == [
        {"type": "text", "text": "Before: "},
        {"type": "image"},
        {"type": "text", "text": " After: "},
        {"type": "image"},
        {"type": "text", "text": " Is there a defect?" + R1_SUFFIX},
    ]
    before, after = s.load_images()
    assert before.getpixel((0, 0)) == (255, 0, 0) and after.getpixel((0, 0)) == (0, 0, 255)
    assert s.reward_method == "yes_no" and s.solution == "yes"
    # The concatenated text is exactly the original's template.format(Question=problem).
    assert s.question == QUESTION_TEMPLATES["r1"].replace("{Question}", human.replace("<image>", ""))


def test_text_only_row_and_numeric_answer(tmp_path):
    f = write_jsonl(tmp_path / "math.jsonl", [row("What is 2+2?", gpt=4, accu_reward_method="math")])
    (s,) = task(data_files=str(f), question_template="none").load()
    assert s.images == [] and s.load_images() == []
    assert s.messages == [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]
    assert s.solution == "4" and s.reward_method == "math"
    assert s.id == "math.jsonl:1"  # no id in the row: file:line


def test_fewer_tags_than_images_prepends_placeholders(tmp_path, imgs):
    f = write_jsonl(tmp_path / "d.jsonl", [row("Compare <image> with the first.", image=["a.png", "b.png"]),
                                           row("No tags here.", image=["a.png", "b.png"])])
    t = task(data_files=str(f), image_folders=str(imgs), question_template="none")
    s1, s2 = t.load()
    assert s1.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Compare "}, {"type": "image"},
                                         {"type": "text", "text": " with the first."}]
    assert [Path(p).name for p in s1.images] == ["a.png", "b.png"]
    assert s2.messages[0]["content"] == [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "No tags here."}]
    assert t.stats()["prepended_image_placeholders"] == 1  # the tag-less row is the ordinary "images first" case


def test_before_text_placement_matches_original(tmp_path, imgs):
    human = "Before: <image> After: <image> Defect?"
    f = write_jsonl(tmp_path / "d.jsonl", [row(human, image=["a.png", "b.png"])])
    (s,) = task(data_files=str(f), image_folders=str(imgs), image_placement="before_text").load()
    assert s.messages[0]["content"] == [{"type": "image"}, {"type": "image"},
                                        {"type": "text", "text": "Before:  After:  Defect?" + R1_SUFFIX}]


def test_templates_wrap_question_around_images(tmp_path, imgs):
    human = "<image>\nFind all cars."
    f = write_jsonl(tmp_path / "d.jsonl", [row(human, image="a.png")])
    for name, tmpl in QUESTION_TEMPLATES.items():
        (s,) = task(data_files=str(f), image_folders=str(imgs), question_template=name).load()
        content = s.messages[0]["content"]
        assert content[0] == {"type": "image"}, name  # the prefix joins the text, not a lone segment
        assert s.question == tmpl.replace("{Question}", "\nFind all cars."), name
    assert QUESTION_TEMPLATES["rec"] == "{Question}" + REC_SUFFIX
    assert QUESTION_TEMPLATES["od"].endswith("<answer> answer here </answer>\n{Question}")
    # A custom template may contain other braces (substitution, not str.format).
    (s,) = task(data_files=str(f), image_folders=str(imgs),
                question_template='Q: {Question} Answer like {"bbox_2d": [..]}').load()
    assert s.question == 'Q: \nFind all cars. Answer like {"bbox_2d": [..]}'


def test_system_prompt_and_answer_extraction(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [row("q", gpt="<think>hmm</think><answer> B </answer>"),
                                           row("q", gpt="plain answer "), row("q", gpt="<answer>x")])
    t = task(data_files=str(f), system_prompt="Be brief.")
    s1, s2, s3 = t.load()
    assert s1.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert [s1.solution, s2.solution, s3.solution] == ["B", "plain answer", "x"]


# ---- options ---------------------------------------------------------------------------------
def _two_datasets(tmp_path: Path):
    fa, fb = tmp_path / "ia", tmp_path / "ib"
    png(fa / "x.png", (255, 0, 0))
    png(fb / "x.png", (0, 0, 255))
    a = write_jsonl(tmp_path / "a.jsonl", [row("<image>q1", gpt="[1, 2, 3, 4]", image="x.png"),
                                           row("<image>q2", gpt="B", image="x.png", accu_reward_method="mcq")])
    b = write_jsonl(tmp_path / "b.jsonl", [row("<image>q3", gpt="3", image="x.png")])
    return a, b, fa, fb


def test_colon_string_and_list_options_agree(tmp_path):
    a, b, fa, fb = _two_datasets(tmp_path)
    t1 = task(data_files=f"{a}:{b}", image_folders=f"{fa}:{fb}", reward_method="iou:math")
    t2 = task(data_files=[str(a), str(b)], image_folders=[str(fa), str(fb)], reward_method=["iou", "math"])
    s1, s2 = t1.load(), t2.load()
    assert [(s.id, s.messages, s.solution, s.reward_method, [str(p) for p in s.images]) for s in s1] == \
           [(s.id, s.messages, s.solution, s.reward_method, [str(p) for p in s.images]) for s in s2]
    # Each file reads images from its own folder; the row's accu_reward_method overrides the file's.
    assert [s.reward_method for s in s1] == ["iou", "mcq", "math"]
    assert [s.load_images()[0].getpixel((0, 0)) for s in s1] == [(255, 0, 0), (255, 0, 0), (0, 0, 255)]
    assert s1[0].meta["solution_boxes"] == [[1.0, 2.0, 3.0, 4.0]]


def test_single_folder_and_method_broadcast_and_default_folder(tmp_path):
    a, b, fa, _ = _two_datasets(tmp_path)
    s = task(data_files=[str(a), str(a)], image_folders=str(fa), reward_method="iou").load()
    assert [x.reward_method for x in s] == ["iou", "mcq", "iou", "mcq"]
    assert all(Path(p).parent == fa for x in s for p in x.images)
    png(tmp_path / "x.png")  # default folder: the data file's own directory
    s = task(data_files=str(a)).load()
    assert Path(s[0].images[0]).parent == tmp_path


@pytest.mark.parametrize("opts, where", [
    ({"data_files": "a:b", "image_folders": "x:y:z"}, "image_folders has 3 entries but data_files has 2"),
    ({"data_files": "a:b", "reward_method": ["iou", "mcq", "math"]}, "reward_method has 3 entries"),
    ({"data_files": "a::b"}, "data_files has an empty entry"),
    ({"data_files": []}, "data_files"),
    ({"data_files": "a", "question_template": "no placeholder"}, "question_template"),
    ({"data_files": "a", "eval_files": "b", "val_split_ratio": 0.1}, "either eval_files or val_split_ratio"),
    ({"data_files": "a", "eval_image_folders": "x"}, "need eval_files"),
    ({"data_files": "a", "val_split_ratio": 1.0}, "val_split_ratio"),
    ({"data_files": "a", "on_bad_row": "ignore"}, "on_bad_row"),
    ({"data_files": "a", "data_file": "b"}, "data_file"),
])
def test_bad_options_name_the_option(opts, where):
    with pytest.raises(ValidationError, match=where):
        VlmR1Jsonl.Options.model_validate(opts)


def test_options_through_plugin_host(tmp_path):
    from core.plugins import PluginHost

    f = write_jsonl(tmp_path / "d.jsonl", [row("q")])
    host = PluginHost(plugins="jsonl")
    t = host.registry.create("tasks", "vlmr1_jsonl", {"data_files": str(f)})
    assert isinstance(t, VlmR1Jsonl) and len(t.load()) == 1
    assert host.registry.get("tasks", "vlmr1_rec_json") is RecJson


def test_missing_data_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: cannot read data file"):
        task(data_files=str(tmp_path / "nope.jsonl")).load()


# ---- splits ---------------------------------------------------------------------------------
def _many(tmp_path: Path, n=20) -> Path:
    return write_jsonl(tmp_path / "many.jsonl", [row(f"q{i}", gpt=str(i), id=f"id{i}") for i in range(n)])


def test_validation_split_deterministic_and_disjoint(tmp_path):
    f = _many(tmp_path)
    t1 = task(data_files=str(f), val_split_ratio=0.25, val_seed=3)
    t2 = task(data_files=str(f), val_split_ratio=0.25, val_seed=3)
    tr, ev = [s.id for s in t1.load("train")], [s.id for s in t1.load("eval")]
    assert len(ev) == 5 and len(tr) == 15 and not set(tr) & set(ev)
    assert sorted(tr + ev, key=lambda x: int(x[2:])) == [f"id{i}" for i in range(20)]
    assert [s.id for s in t2.load("eval")] == ev and [s.id for s in t2.load("train")] == tr  # order of calls
    assert tr == sorted(tr, key=lambda x: int(x[2:]))  # file order kept
    other = [s.id for s in task(data_files=str(f), val_split_ratio=0.25, val_seed=4).load("eval")]
    assert other != ev
    assert t1.stats()["rows_train"] == 15 and t1.stats()["rows_eval"] == 5
    code = ("from vlmr1_jsonl.jsonl import VlmR1Jsonl as T;"
            f"print([s.id for s in T.from_options({{'data_files': {str(f)!r}, 'val_split_ratio': 0.25,"
            "'val_seed': 3}).load('validation')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr(ev)


def test_eval_files_and_errors_without_eval(tmp_path, imgs):
    f = _many(tmp_path)
    e = write_jsonl(tmp_path / "ev" / "e.jsonl", [row("<image>eq", image="a.png")])
    t = task(data_files=str(f), eval_files=str(e), eval_image_folders=str(imgs), reward_method="mcq")
    (s,) = t.load("eval")
    assert s.reward_method == "mcq"  # a single reward_method also serves the eval files
    assert len(t.load("train")) == 20
    with pytest.raises(ValueError, match="no eval split: set its option eval_files"):
        task(data_files=str(f)).load("eval")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task(data_files=str(f)).load("dev")


def test_max_samples(tmp_path):
    f = _many(tmp_path)
    assert [s.id for s in task(data_files=str(f), max_samples=3).load()] == ["id0", "id1", "id2"]


def test_duplicate_ids_made_unique(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [row("a", id="x"), row("b", id="x"), row("c", id=7)])
    t = task(data_files=str(f))
    assert [s.id for s in t.load()] == ["x", "x@d.jsonl:2", "7"]
    assert t.stats()["duplicate_ids"] == 1


# ---- images ---------------------------------------------------------------------------------
def test_image_paths_may_not_escape_their_folder(tmp_path, imgs):
    png(tmp_path / "secret.png")
    for name in ("../secret.png", str(tmp_path / "secret.png"), "sub/../../secret.png"):
        f = write_jsonl(tmp_path / "d.jsonl", [row("q"), row("<image>q", image=name)])
        with pytest.raises(DataError, match=r"d\.jsonl:2: .*leaves its image folder.*image_outside_folder"):
            task(data_files=str(f), image_folders=str(imgs)).load()
        (_, s) = task(data_files=str(f), image_folders=str(imgs), allow_outside_image_folder=True).load()
        assert s.load_images()[0].size == (8, 6)
    f = write_jsonl(tmp_path / "d.jsonl", [row("<image>q", image="sub/../sub/c.png")])  # stays inside: fine
    assert len(task(data_files=str(f), image_folders=str(imgs)).load()) == 1


def test_corrupt_image_lazy_error_and_decode_check(tmp_path, imgs):
    (imgs / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    f = write_jsonl(tmp_path / "d.jsonl", [row("<image>q", image="a.png"), row("<image>q", image="bad.png")])
    good, bad = task(data_files=str(f), image_folders=str(imgs), check_images="exists").load()
    good.load_images()
    with pytest.raises(DataError, match=rf"{f}:2: cannot read image .*bad\.png"):
        bad.load_images()
    t = task(data_files=str(f), image_folders=str(imgs), check_images="decode", on_bad_row="skip")
    assert [s.meta["source_line"] for s in t.load()] == [1]
    assert t.stats()["skipped/unreadable_image"] == 1


def test_box_rows_validated(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        row("q", gpt="<answer>[10, 20, 30, 40]</answer>", accu_reward_method="iou"),
        row("q", gpt='```json\n[{"bbox_2d": [1, 1, 5, 5], "label": "car"}]\n```', accu_reward_method="map"),
        row("q", gpt="[3, 2, 1, 0]", accu_reward_method="math"),  # not a box row: a list of numbers is fine
        row("q", gpt="[30, 20, 10, 40]", accu_reward_method="iou"),
    ])
    with pytest.raises(DataError, match=r"d\.jsonl:4: .*x2 < x1.*invalid_box"):
        task(data_files=str(f)).load()
    t = task(data_files=str(f), on_bad_row="skip")
    s = t.load()
    assert [x.meta.get("solution_boxes") for x in s] == [[[10.0, 20.0, 30.0, 40.0]], [[1.0, 1.0, 5.0, 5.0]], None]
    assert s[0].solution == "[10, 20, 30, 40]"
    assert t.stats()["skipped/invalid_box"] == 1


def test_skips_are_logged(tmp_path, caplog):
    f = write_jsonl(tmp_path / "d.jsonl", [row("q"), "{not json"])
    with caplog.at_level("WARNING", logger="vlmr1.tasks.jsonl"):
        task(data_files=str(f), on_bad_row="skip").load()
    assert f"{f}:2" in caplog.text and "malformed_json" in caplog.text


# ---- REC JSON -------------------------------------------------------------------------------
def rec_row(image="a.png", box=(1, 2, 7, 5), **kw) -> dict:
    return {"image": image, "problem": "the red thing", "solution": list(box),
            "normalized_solution": [125, 333, 875, 833], **kw}


def test_rec_json_array_golden(tmp_path, imgs):
    f = tmp_path / "refcoco_val.json"
    f.write_text(json.dumps([rec_row(), rec_row("b.png", (0, 0, 5, 4))], indent=2))
    t = RecJson.from_options({"data_files": str(f), "image_folders": str(imgs)})
    s1, s2 = t.load()
    assert s1.solution == [1.0, 2.0, 7.0, 5.0] and s1.reward_method == "iou"
    assert s1.messages == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "the red thing" + REC_SUFFIX}]}]
    assert s1.meta["normalized_solution"] == [125.0, 333.0, 875.0, 833.0]
    # Line numbers are where each array element starts (indent=2: "[" then "  {" on line 2).
    lines = f.read_text().splitlines()
    assert s1.meta["source_line"] == 2 and lines[1].strip() == "{"
    assert lines[s2.meta["source_line"] - 1].strip() == "{" and s2.meta["source_line"] > 2
    assert s2.load_images()[0].size == (5, 4)


def test_rec_json_jsonl_and_bad_rows(tmp_path, imgs):
    f = write_jsonl(tmp_path / "rec.jsonl", [rec_row(), rec_row(box=(9, 2, 7, 5)),
                                             rec_row(normalized_solution=[0, 0, 1200, 10]), rec_row(image="zz.png")])
    with pytest.raises(DataError, match=r"rec\.jsonl:2: solution \[9, 2, 7, 5\] has x2 < x1"):
        RecJson.from_options({"data_files": str(f), "image_folders": str(imgs)}).load()
    t = RecJson.from_options({"data_files": str(f), "image_folders": str(imgs), "on_bad_row": "skip",
                              "text_position": "before_image", "question_template": "none"})
    (s,) = t.load()
    assert s.messages[0]["content"] == [{"type": "text", "text": "the red thing"}, {"type": "image"}]
    st = t.stats()
    assert st["skipped_rows"] == 3
    assert st["skipped/invalid_box"] == 2 and st["skipped/missing_image"] == 1


def test_rec_json_truncated_array_names_line(tmp_path, imgs):
    f = tmp_path / "r.json"
    text = json.dumps([rec_row(), rec_row()], indent=2)
    f.write_text(text[: len(text) - 30])
    with pytest.raises(DataError, match=r"r\.json:\d+: malformed JSON"):
        RecJson.from_options({"data_files": str(f), "image_folders": str(imgs), "on_bad_row": "skip"}).load()
