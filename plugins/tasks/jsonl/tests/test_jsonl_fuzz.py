"""Fuzz tests: every malformed row or image is either named in an error (file:line) or
counted as skipped; nothing else escapes and nothing is dropped silently.
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image
from vlmr1_jsonl.jsonl import VlmR1Jsonl
from vlmr1_jsonl.rec import RecJson

from core.interfaces import DataError

GOOD = {"id": "g", "image": "ok.png", "accu_reward_method": "iou",
        "conversations": [{"from": "human", "value": "<image>Where is the cat?"},
                          {"from": "gpt", "value": "<answer>[1, 2, 5, 6]</answer>"}]}
GOOD_MULTI = {"image": ["ok.png", "ok2.png"],
              "conversations": [{"from": "human", "value": "<image> vs <image>: defect?"},
                                {"from": "gpt", "value": "yes"}]}
GOOD_TEXT = {"conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": 2}]}
GOOD_REC = {"image": "ok.png", "problem": "the cat", "solution": [1, 2, 5, 6], "normalized_solution": [1, 2, 5, 6]}


def _conv(h="<image>q", g="a", **kw):
    return {"image": "ok.png", "conversations": [{"from": "human", "value": h}, {"from": "gpt", "value": g}], **kw}


#: (reason the row must be skipped for, raw line). Each one is bad for exactly that reason.
CATALOGUE: list[tuple[str, str | bytes]] = [
    ("malformed_json", json.dumps(GOOD)[:-7]),  # truncated
    ("malformed_json", "{'single': 'quotes'}"),
    ("malformed_json", json.dumps(GOOD) + "}"),
    ("invalid_utf8", b'{"conversations": "\xff\xfe"}'),
    ("not_an_object", "[1, 2, 3]"),
    ("not_an_object", "null"),
    ("not_an_object", '"a string"'),
    ("missing_field", json.dumps({"image": "ok.png"})),
    ("wrong_type", json.dumps({"conversations": "human: hi"})),
    ("bad_conversations", json.dumps({"conversations": [{"from": "human", "value": "q"}]})),
    ("bad_conversations", json.dumps({"conversations": [{"from": "gpt", "value": "q"},
                                                        {"from": "human", "value": "a"}]})),
    ("missing_field", json.dumps({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]})),
    ("wrong_type", json.dumps({"conversations": ["human", "gpt"]})),
    ("wrong_type", json.dumps(_conv(h=None))),
    ("wrong_type", json.dumps(_conv(h=["<image>q"]))),
    ("wrong_type", json.dumps(_conv(g={"answer": 1}))),
    ("wrong_type", json.dumps(_conv(g=True))),
    ("wrong_type", json.dumps({**_conv(), "image": 5})),
    ("wrong_type", json.dumps({**_conv(), "image": {"path": "ok.png"}})),
    ("wrong_type", json.dumps({**_conv(), "image": ["ok.png", 3]})),
    ("wrong_type", json.dumps({**_conv(), "image": [""]})),
    ("wrong_type", json.dumps(_conv(accu_reward_method=3))),
    ("missing_image", json.dumps({**_conv(), "image": "nope.png"})),
    ("missing_image", json.dumps({**_conv(), "image": "sub"})),  # a folder, not a file
    ("image_outside_folder", json.dumps({**_conv(), "image": "../outside.png"})),
    ("image_outside_folder", json.dumps({**_conv(), "image": "/etc/passwd"})),
    ("image_tag_mismatch", json.dumps(_conv(h="<image><image>two tags"))),
    ("image_tag_mismatch", json.dumps({"conversations": [{"from": "human", "value": "<image>q"},
                                                         {"from": "gpt", "value": "a"}]})),  # text-only + tag
    ("invalid_box", json.dumps(_conv(g="[30, 2, 10, 6]", accu_reward_method="iou"))),
    ("invalid_box", json.dumps(_conv(g="<answer>[1, 8, 5, 6]</answer>", accu_reward_method="iou"))),
    ("invalid_box", json.dumps(_conv(g="no box here", accu_reward_method="iou"))),
    ("invalid_box", json.dumps(_conv(g='[{"bbox_2d": [5, 5, 1, 1], "label": "cat"}]', accu_reward_method="map"))),
    ("invalid_box", json.dumps(_conv(g='```json\n{"bbox_2d": [1, 1, "x", 2]}\n```'))),
    ("malformed_json", '{"id": ' + "9" * 5000 + "}"),  # past Python's int digit limit
    ("malformed_json", "[" * 100000 + "]" * 100000),  # nested too deeply
    ("invalid_box", json.dumps(_conv(g="[1, 2, " + "9" * 400 + ", 6]", accu_reward_method="iou"))),
    ("invalid_box", '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "[1, 2, 3, 4]"}],'
                    ' "accu_reward_method": "iou", "x": 1}'.replace('"[1, 2, 3, 4]"', '"[1, NaN, 3, 4]"')),
    ("missing_image", json.dumps({**_conv(), "image": "ok\x00.png"})),  # NUL in a path
    ("unreadable_image", json.dumps({**_conv(), "image": "corrupt.png"})),
    ("unreadable_image", json.dumps({**_conv(), "image": "truncated.png"})),
    ("unreadable_image", json.dumps({**_conv(), "image": "empty.png"})),
]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(d / "ok.png")
    Image.new("RGB", (6, 6), (200, 20, 30)).save(d / "ok2.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    (d / "corrupt.png").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(300)))
    full = (d / "ok.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "empty.png").write_bytes(b"")
    return d


def _write(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _jsonl(path, folder, **kw) -> VlmR1Jsonl:
    return VlmR1Jsonl.from_options({"data_files": [str(path)], "image_folders": [str(folder)],
                                    "check_images": "decode", **kw})


def _partition(task, path: Path, n_lines: int) -> tuple[set[int], set[int]]:
    """Lines that became samples and lines that were skipped; they must cover every row once.

    Blank lines are not rows (JSON Lines convention) and are left out of the expectation.
    """
    samples = task.load("train")
    ok = [s.meta["source_line"] for s in samples]
    skipped = [sk.line for sk in task.log.skipped]
    assert all(sk.file == str(path) for sk in task.log.skipped)
    assert len(ok) == len(set(ok)) and len(skipped) == len(set(skipped))
    raw = path.read_bytes().split(b"\n")
    rows = {i for i in range(1, n_lines + 1) if raw[i - 1].strip()}
    assert set(ok) | set(skipped) == rows, "a row was dropped silently"
    assert not set(ok) & set(skipped)
    st = task.stats()
    assert st["skipped_rows"] == len(skipped)
    assert sum(v for k, v in st.items() if k.startswith("skipped/")) == len(skipped)
    return set(ok), set(skipped)


def test_catalogue_skip_counts_every_bad_row_with_its_reason(tmp_path, folder):
    lines: list[str | bytes] = []
    expected: dict[int, str] = {}
    for reason, bad in CATALOGUE:  # interleave good and bad rows
        lines.append(json.dumps(GOOD))
        lines.append(bad)
        expected[len(lines)] = reason
    lines += [json.dumps(GOOD_MULTI), json.dumps(GOOD_TEXT)]
    path = _write(tmp_path / "mixed.jsonl", lines)
    task = _jsonl(path, folder, on_bad_row="skip")
    ok, skipped = _partition(task, path, len(lines))
    assert skipped == set(expected)
    assert {sk.line: sk.reason for sk in task.log.skipped} == expected
    assert len(ok) == len(CATALOGUE) + 2


@pytest.mark.parametrize("reason, bad", CATALOGUE, ids=[f"{i}-{r}" for i, (r, _) in enumerate(CATALOGUE)])
def test_catalogue_error_names_file_and_line(tmp_path, folder, reason, bad):
    path = _write(tmp_path / "one_bad.jsonl", [json.dumps(GOOD), json.dumps(GOOD_TEXT), bad])
    with pytest.raises(DataError) as err:
        _jsonl(path, folder).load("train")
    assert str(err.value).startswith(f"{path}:3: ")
    assert f"[{reason}]" in str(err.value)
    assert err.value.file == str(path) and err.value.line == 3


def test_corrupt_images_without_decode_check_fail_lazily_with_file_and_line(tmp_path, folder):
    names = ["ok.png", "corrupt.png", "truncated.png", "empty.png"]
    path = _write(tmp_path / "lazy.jsonl", [json.dumps({**_conv(), "image": n}) for n in names])
    samples = VlmR1Jsonl.from_options({"data_files": str(path), "image_folders": str(folder),
                                       "check_images": "exists"}).load()
    assert len(samples) == 4  # existence is all that load() checks with check_images: exists
    samples[0].load_images()
    for line, s in enumerate(samples[1:], start=2):
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{line}: cannot read image"):
            s.load_images()


# ---- random mutations -----------------------------------------------------------------------
_POOL = [None, 0, -3.5, True, "", "<image>", "<image><image><image>", [], {}, [1, 2], [[]], "../outside.png",
         "/abs.png", "nope.png", "corrupt.png", "ok.png", ["ok.png", "ok2.png"], "[9, 9, 1, 1]",
         {"from": "human"}, "x" * 50, float("nan"), "iou", "map", "human", "gpt"]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(rng: random.Random, base: dict) -> str | bytes:
    kind = rng.randrange(6)
    text = json.dumps(base)
    if kind == 0:  # truncate
        return text[: rng.randrange(len(text))]
    if kind == 1:  # random bytes spliced in
        pos = rng.randrange(len(text))
        noise = bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randrange(1, 4)))
        return text.encode()[:pos] + noise + text.encode()[pos:]  # no b"\n": that would make two lines
    if kind == 2:  # delete a character span
        a = rng.randrange(len(text))
        return text[:a] + text[a + rng.randrange(1, 6):]
    obj = copy.deepcopy(base)
    paths = [p for p in _paths(obj) if p]
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if kind == 3 and isinstance(parent, dict):  # drop a key
        del parent[path[-1]]
    else:  # replace a value with one of a different shape
        parent[path[-1]] = copy.deepcopy(rng.choice(_POOL))
    return json.dumps(obj)


@pytest.mark.parametrize("fmt", ["jsonl", "rec"])
def test_random_mutations_are_named_or_counted(tmp_path, folder, fmt):
    rng = random.Random(1234)
    bases = [GOOD, GOOD_MULTI, GOOD_TEXT] if fmt == "jsonl" else [GOOD_REC]
    lines = [_mutate(rng, rng.choice(bases)) for _ in range(300)]
    make = _jsonl if fmt == "jsonl" else (lambda p, f, **kw: RecJson.from_options(
        {"data_files": str(p), "image_folders": str(f), "check_images": "decode", **kw}))

    # Skip mode: one file, every line is a sample or a counted skip.
    path = _write(tmp_path / f"fuzz.{fmt}.jsonl", lines)
    task = make(path, folder, on_bad_row="skip")
    ok, skipped = _partition(task, path, len(lines))
    assert len(skipped) > 100 and len(ok) > 10  # the fuzzer exercises both outcomes
    for s in task.load("train"):  # surviving rows really load
        assert len(s.load_images()) == len(s.meta["image_paths"])

    # Error mode: each skipped line on its own is a DataError naming that file and line 2.
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        one = _write(tmp_path / f"one.{fmt}.jsonl", [json.dumps(GOOD_REC if fmt == "rec" else GOOD), line])
        try:
            n = len(make(one, folder).load("train"))
        except DataError as exc:
            assert i in skipped, f"line {i} was accepted in skip mode but refused alone: {exc}"
            assert str(exc).startswith(f"{one}:2: ")
        else:
            assert i in ok and n == 2


def test_rec_array_elements_named_by_line(tmp_path, folder):
    rows = [GOOD_REC, {**GOOD_REC, "solution": [5, 2, 1, 6]}, {**GOOD_REC, "problem": 7}, "text", GOOD_REC]
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(rows, indent=1))
    starts = [i + 1 for i, ln in enumerate(path.read_text().splitlines()) if ln in (" {", ' "text",')]
    task = RecJson.from_options({"data_files": str(path), "image_folders": str(folder), "on_bad_row": "skip"})
    ok, skipped = [s.meta["source_line"] for s in task.load()], [sk.line for sk in task.log.skipped]
    assert ok == [starts[0], starts[4]]
    assert skipped == starts[1:4]
    assert [sk.reason for sk in task.log.skipped] == ["invalid_box", "wrong_type", "not_an_object"]
