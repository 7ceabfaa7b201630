"""An image corrupt past a valid header, found only when training decodes it.

Loading checks headers (``check_images: header``), so such a row is a valid sample until the
rollout decodes its pixels. Under ``on_bad_row: skip`` the run must go on: the sample is
replaced by another prompt, a warning names its file and line, ``data/skipped_samples`` counts
it, and evaluation leaves it out; under ``on_bad_row: error`` the run stops (exit 2, bad input) naming the row.
Real tiny runs through ``python -m core.train``'s entry point.
"""

from __future__ import annotations

import json
import random

import pytest
import yaml
from PIL import Image

COLOURS = {"a.png": "red", "b.png": "green", "c.png": "blue", "d.png": "yellow"}


@pytest.fixture
def run_dir(tmp_path):
    rng = random.Random(0)
    for name in COLOURS:  # noise: the PNG's pixel data is long enough to cut in half
        Image.frombytes("RGB", (56, 56), rng.randbytes(56 * 56 * 3)).save(tmp_path / name)
    full = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(full[: len(full) // 2])  # header intact, pixel data cut
    with Image.open(tmp_path / "b.png") as im:  # what check_images: header sees: a fine 56x56 PNG
        assert im.size == (56, 56)
    rows = [{"image": name, "conversations": [{"from": "human", "value": "<image>What colour is this image?"},
                                              {"from": "gpt", "value": f"<answer>{colour}</answer>"}]}
            for name, colour in COLOURS.items()]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, data


def config(root, data, on_bad_row: str):
    cfg = {
        "plugins": ["jsonl", "qwen-vl"],
        "model": {"family": "qwen2_5_vl", "path": str(root / "tiny"), "tiny": {"hidden_size": 32, "num_layers": 1}},
        "task": {"name": "vlmr1_jsonl", "options": {"data_files": [str(data)], "image_folders": [str(root)],
                                                   "eval_files": [str(data)], "eval_image_folders": [str(root)],
                                                   "on_bad_row": on_bad_row}},
        "rewards": [{"name": "accuracy"}],
        "grpo": {"num_generations": 2, "max_completion_length": 2, "beta": 0.0},
        "train": {"per_device_batch_size": 4, "max_steps": 2, "shuffle": False},
        "logging": {"output_dir": str(root / f"out_{on_bad_row}"), "tensorboard": False, "progress_bar": False,
                    "plot": False, "log_completions_every": 1},
        "checkpoint": {"save_final": False},
        "eval": {"num_samples": 4, "batch_size": 4},
    }
    path = root / f"{on_bad_row}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root / f"out_{on_bad_row}"


def test_skip_replaces_the_sample_warns_and_counts(run_dir, capsys):
    from core.train import main

    root, data = run_dir
    path, out = config(root, data, "skip")
    assert main(["--config", str(path)]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert f"warning: skipping a sample whose image cannot be decoded (on_bad_row: skip): {data}:2: " in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/skipped_samples"] for r in rows] == [1.0, 0.0]  # step 1 held prompts a, b; step 2 c, d
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert logged and all("b.png" not in json.dumps(r["images"]) for r in logged)
    assert len(logged) == 2 * 2 * 2  # every slot was filled: 2 steps x 2 prompts x G 2
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["after"]["num_samples"] == 3  # the undecodable eval row is left out


def test_error_stops_the_run_naming_the_row(run_dir, capsys):
    from core.train import main

    root, data = run_dir
    path, _ = config(root, data, "error")
    assert main(["--config", str(path)]) == 2  # bad input
    err = capsys.readouterr().err
    assert f"{data}:2: " in err and "cannot read image" in err and "b.png" in err
