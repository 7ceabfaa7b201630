"""The real-scale REC and GUI recipes train unmodified on data written for the original VLM-R1.

The data is JSONL in the original project's format (``image`` a path or a list of paths,
``conversations`` human/gpt, ``accu_reward_method``), with real PNG files; the configs are
``examples/rec/config.yaml`` and ``examples/gui/config.yaml`` as shipped, with command-line
overrides only for what a CPU test must change (the tiny model, data paths, step and batch
sizes, float32, no flash-attention, the cpu device). Every run is ``python -m core.train``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.testing.procs import communicate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
STEPS = 2

# ---- data in the original VLM-R1 format ---------------------------------------------------
REC_QUESTION = "<image>Please provide the bounding box coordinate of the region this sentence describes: {}."
GUI_QUESTION = ("<image>This is the screen before the action.\n<image>This is the screen after tapping '{}'. "
                "Does the screen after the action show a GUI defect? Answer with the defect type or 'no defect'.")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}


def write_rec_data(root: Path, n: int = 6) -> Path:
    """RefCOCO-style rows: one COCO-like image each, the gpt turn a pixel box, method ``iou``."""
    from PIL import Image, ImageDraw

    (root / "coco" / "train2014").mkdir(parents=True)
    rows = []
    for i in range(n):
        name, rgb = list(COLOURS.items())[i % 3]
        w, h = 96 + 16 * (i % 3), 72 + 8 * (i % 2)  # different sizes: boxes must map per image
        img = Image.new("RGB", (w, h), (235, 235, 235))
        box = [8 + 4 * i, 10, 8 + 4 * i + 40, 50]
        ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=rgb)
        rel = f"train2014/COCO_train2014_{i:012d}.png"
        img.save(root / "coco" / rel)
        rows.append({"id": i, "image": rel,
                     "conversations": [{"from": "human", "value": REC_QUESTION.format(f"the {name} rectangle")},
                                       {"from": "gpt", "value": json.dumps(box)}],
                     "accu_reward_method": "iou"})
    path = root / "refcoco_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_gui_data(root: Path, n: int = 4) -> Path:
    """GUI defect detection rows: two screenshots (before, after) per row, two ``<image>`` tags."""
    from PIL import Image, ImageDraw

    (root / "screens").mkdir(parents=True)
    answers = ["no defect", "text overlap", "missing content", "no defect"]
    rows = []
    for i in range(n):
        paths = []
        for j, tag in enumerate(("before", "after")):
            img = Image.new("RGB", (64 + 8 * j, 112), (250, 250, 250))
            d = ImageDraw.Draw(img)
            d.rectangle([4, 4, 59, 20], fill=(60, 120, 200))
            if tag == "after" and answers[i] != "no defect":
                d.rectangle([10, 30 + 5 * i, 50, 60], fill=(200, 40, 40))
            rel = f"screens/app{i}_{tag}.png"
            img.save(root / rel)
            paths.append(rel)
        row = {"id": f"gui-{i}", "image": paths,
               "conversations": [{"from": "human", "value": GUI_QUESTION.format(f"button {i}")},
                                 {"from": "gpt", "value": answers[i]}]}
        if i % 2:  # as in mixed files: some rows carry their method, the others take the file's
            row["accu_reward_method"] = "all_match"
        rows.append(row)
    path = root / "gui_defects_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def add_row_with_missing_image(data_file: Path) -> int:
    """Append a row whose image file does not exist; return its 1-based line number."""
    lines = data_file.read_text().splitlines()
    row = json.loads(lines[0])
    row["id"] = "missing-image"
    row["image"] = "train2014/COCO_train2014_999999999999.png"
    lines.insert(2, json.dumps(row))  # in the middle of the file, not at the end
    data_file.write_text("\n".join(lines) + "\n")
    return 3


# ---- runs ----------------------------------------------------------------------------------
def cpu_overrides(tiny: Path, out: Path, data: Path, images: Path) -> list[str]:
    """What a CPU test changes in a real-scale recipe; the task, rewards and templates stay."""
    return [
        f"model.path={tiny}", "model.dtype=float32", "model.attn_implementation=null", "model.options={}",
        f"task.options.data_files=[{data}]", f"task.options.image_folders=[{images}]",
        "device.name=cpu", "grpo.num_generations=4", "grpo.max_completion_length=8",
        "train.per_device_batch_size=8", "train.gradient_accumulation_steps=1", f"train.max_steps={STEPS}",
        "train.gradient_checkpointing=false", "train.learning_rate=1e-3",
        f"logging.output_dir={out}", "logging.tensorboard=false", "logging.plot=false", "logging.progress_bar=false",
        "logging.log_completions_every=1", "checkpoint.save_every=0",
    ]


def start(config: str, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "core.train", "--config", str(ROOT / config), *overrides]
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = communicate(proc, timeout=300)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def tiny(tiny_qwen_path) -> Path:
    """The shared tiny Qwen2.5-VL (tests/conftest.py), built offline through the installed family."""
    return tiny_qwen_path


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """REC and GUI runs (each with one row whose image is missing, skipped) and a strict REC run."""
    tmp = tmp_path_factory.mktemp("e2e")
    rec_data = write_rec_data(tmp / "rec")
    gui_data = write_gui_data(tmp / "gui")
    bad_data = tmp / "rec" / "refcoco_with_bad_row.jsonl"
    bad_data.write_text(rec_data.read_text())
    bad_line = add_row_with_missing_image(bad_data)
    procs = {
        "rec": start("examples/rec/config.yaml",
                     *cpu_overrides(tiny, tmp / "out_rec", bad_data, tmp / "rec" / "coco")),
        "gui": start("examples/gui/config.yaml",
                     *cpu_overrides(tiny, tmp / "out_gui", gui_data, tmp / "gui")),
        "strict": start("examples/rec/config.yaml",
                        *cpu_overrides(tiny, tmp / "out_strict", bad_data, tmp / "rec" / "coco"),
                        "task.options.on_bad_row=error"),
    }
    return tmp, {name: finish(p) for name, p in procs.items()}, bad_data, bad_line


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def completions(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "completions.jsonl").read_text().splitlines()]


def test_rec_recipe_trains_on_original_jsonl(runs):
    tmp, res, _, _ = runs
    rc, out, err = res["rec"]
    assert rc == 0, out[-2000:] + err[-4000:]
    rows = metrics(tmp / "out_rec")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        # `accuracy` routed every row to iou and read every solution box: a finite mean, never
        # NaN (all "not applicable"); rec_format scored each completion.
        assert math.isfinite(r["rewards/accuracy"]) and 0.0 <= r["rewards/accuracy"] <= 1.0, r
        assert math.isfinite(r["rewards/rec_format"]), r
        assert r["rewards/accuracy_errors"] == 0 and r["rewards/rec_format_errors"] == 0, r
        assert r["kl"] is not None  # the recipe's beta 0.04 ran with a reference model
    comps = completions(tmp / "out_rec")
    assert len(comps) == STEPS * 8
    assert all(c["rewards"]["accuracy"] is not None for c in comps)
    assert all(len(json.loads(c["solution"])) == 4 for c in comps)  # the gpt turn's pixel box
    assert all(c["prompt"].endswith("Output the final answer in JSON format.") for c in comps)  # rec template
    assert (tmp / "out_rec" / f"checkpoint-{STEPS}" / "model.safetensors").is_file()


def test_gui_recipe_trains_on_two_image_rows(runs):
    tmp, res, _, _ = runs
    rc, out, err = res["gui"]
    assert rc == 0, out[-2000:] + err[-4000:]
    rows = metrics(tmp / "out_gui")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["rewards/accuracy"]) and math.isfinite(r["rewards/format"]) for r in rows)
    assert all(r["rewards/accuracy_errors"] == 0 for r in rows)
    comps = completions(tmp / "out_gui")
    assert all(c["rewards"]["accuracy"] in (0.0, 1.0) for c in comps)  # all_match, with or without the row's method
    assert {c["solution"] for c in comps} <= {"no defect", "text overlap", "missing content"}


def test_gui_rows_give_two_image_prompts(tiny, tmp_path):
    """The GUI recipe's task options turn each row into one prompt holding both screenshots,
    each where its ``<image>`` tag stands, and the model family encodes two images."""
    from core.config import build_config, load_raw
    from core.plugins import PluginHost
    from core.plugins.plan import make_plan

    data = write_gui_data(tmp_path)
    host = PluginHost()
    cfg = build_config(load_raw(ROOT / "examples/gui/config.yaml"),
                       cpu_overrides(tiny, tmp_path / "out", data, tmp_path))
    plan = make_plan(cfg, host.registry)
    samples = host.registry.create("tasks", cfg.task.name, plan.options["task"]).load("train")
    family = plan.model_family.cls.from_options(plan.options["model"])
    proc = family.load_processor(tiny)
    assert len(samples) == 4
    for s in samples:
        kinds = [part["type"] for part in s.messages[-1]["content"]]
        assert kinds == ["image", "text", "image", "text"], kinds
        assert [Path(os.fspath(ref)).name for ref in s.images] == [f"app{s.id[-1]}_before.png",
                                                                    f"app{s.id[-1]}_after.png"]
        text = family.render_prompt(proc, s.messages)
        assert text.count("<|vision_start|>") == 2
        assert text.index("<|vision_start|>") < text.index("before the action") < text.rindex("<|vision_start|>")
        inputs = family.process(proc, [text], [s.load_images()])
        assert inputs["image_grid_thw"].shape[0] == 2


def test_bad_row_is_skipped_and_counted(runs):
    _, res, _, _ = runs
    rc, out, err = res["rec"]
    assert rc == 0
    assert "'skipped_rows': 1" in out and "'skipped/missing_image': 1" in out, out[-2000:]


def test_bad_row_is_an_error_naming_file_and_line(runs):
    _, res, bad_data, bad_line = runs
    rc, out, err = res["strict"]
    assert rc == 2, out[-2000:] + err[-4000:]
    assert f"{bad_data}:{bad_line}" in err or f"{bad_data.name}:{bad_line}" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]  # a one-paragraph message, not a crash
    assert not (bad_data.parents[1] / "out_strict" / "metrics.jsonl").exists()  # stopped before training


def test_real_scale_examples_set_up_their_rewards():
    """--dry-run validates each reward's options; this also builds every reward of every
    real-scale example (no weights), so nested options such as the ``accuracy`` router's
    ``reward_options`` are checked too."""
    from core.config import build_config, load_raw
    from core.interfaces import RewardContext
    from core.plugins import PluginHost
    from core.plugins.plan import make_plan

    host = PluginHost()
    configs = [p for d in ("rec", "ovd", "math", "gui", "families")
               for p in sorted((ROOT / "examples" / d).glob("*.yaml"))]
    assert len(configs) >= 11
    for path in configs:
        cfg = build_config(load_raw(path), source=str(path))
        plan = make_plan(cfg, host.registry, require_available=False)
        for i, rc in enumerate(cfg.rewards):
            reward = host.registry.create("rewards", rc.name, plan.options[f"rewards.{i}"])
            reward.setup(RewardContext(registry=host.registry, config=cfg))
            closer = getattr(reward, "close", None)
            if callable(closer):
                closer()
