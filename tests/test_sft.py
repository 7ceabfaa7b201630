"""SFT baseline: targets in the family's box convention, the collator layout, and a short real run."""

from __future__ import annotations

import json

import pytest
import torch

from core.config import ConfigError
from core.interfaces import Sample
from core.plugins import PluginHost
from core.runtime.evaluator import parse_box
from core.sft import main
from core.supervised import R1_TEMPLATE, SFTCollator, answer_for, box_from_original, target_text


@pytest.fixture(scope="module")
def registry():
    reg = PluginHost(["qwen-vl", "synthetic", "text", "grounding"]).registry
    for name in ("qwen2_5_vl", "synthetic_grounding"):
        try:
            reg.resolve("models" if name.startswith("qwen") else "tasks", name)
        except LookupError as exc:
            pytest.skip(f"needs the qwen-vl and synthetic plugins: {exc}")
    return reg


@pytest.fixture(scope="module")
def tiny(registry, tmp_path_factory):
    fam_cls = registry.get("models", "qwen2_5_vl")
    path = fam_cls.build_tiny_checkpoint(tmp_path_factory.mktemp("sft") / "tiny")
    fam = fam_cls()
    return path, fam, fam.load_processor(path)


def test_box_targets_use_the_family_convention(registry, tiny):
    _, fam, proc = tiny
    task = registry.create("tasks", "synthetic_grounding", {"image_size": 112, "seed": 0})
    s = task.load("eval")[0]
    images = s.load_images()
    assert s.solution == [63, 88, 84, 109] and images[0].size == (112, 112)
    assert fam.resized_image_size(proc, images[0]) == (56, 56)  # the tiny processor's max_pixels
    # Qwen2.5-VL writes pixels of the 56x56 input: halved, rounded half up.
    assert answer_for(s, fam, proc, images) == "[32, 44, 42, 55]"
    # ... which the training reward's transform maps back to the solution box within rounding.
    back = fam.box_to_original(parse_box("[32, 44, 42, 55]"), (112, 112), (56, 56))
    assert back == [64.0, 88.0, 84.0, 110.0]
    json_sample = Sample(id="j", images=s.images, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Locate it. Output the final answer in JSON format."}]}],
        solution=s.solution, reward_method="iou")
    assert answer_for(json_sample, fam, proc, images) == '{"bbox_2d": [32, 44, 42, 55]}'


def test_box_from_original_inverts_every_convention(tiny):
    _, fam, _ = tiny
    box = [10.0, 20.0, 50.0, 70.0]
    for conv in ("absolute_resized", "normalized_1000", "absolute_original"):
        f = type("F", (type(fam),), {"box_convention": conv})()
        model_box = box_from_original(f, box, (100, 200), (56, 112))
        assert f.box_to_original(model_box, (100, 200), (56, 112)) == pytest.approx(box)
    assert box_from_original(fam, box, (100, 200), (56, 112)) == pytest.approx([5.6, 11.2, 28.0, 39.2])
    unknown = type("U", (type(fam),), {"box_convention": "unknown"})()
    with pytest.raises(ConfigError, match="box convention 'unknown'"):
        box_from_original(unknown, box, (100, 200), (56, 112))


def test_detection_and_text_targets(tiny):
    _, fam, proc = tiny
    from PIL import Image

    img = [Image.new("RGB", (112, 112))]
    det = Sample(id="d", images=img, messages=[], reward_method="map",
                 solution='[{"bbox_2d": [0, 0, 112, 56], "label": "Cat"}]')
    assert answer_for(det, fam, proc, img) == '[{"bbox_2d": [0, 0, 56, 28], "label": "cat"}]'
    assert answer_for(Sample(id="n", images=img, messages=[], reward_method="map", solution="None"),
                      fam, proc, img) == "None"
    maths = Sample(id="m", images=[], messages=[{"role": "user", "content": "Q? <answer> </answer>"}],
                   solution="<answer>\\frac{1}{2}</answer>", reward_method="math")
    ans = answer_for(maths, fam, proc, [])
    assert ans == "\\frac{1}{2}"
    assert target_text(maths, ans) == "<think></think><answer>\\frac{1}{2}</answer>"  # R1 prompt -> R1 layout
    assert target_text(maths, ans, think="half") == R1_TEMPLATE.format(think="half", answer=ans)
    plain = Sample(id="p", images=[], messages=[{"role": "user", "content": "Colour?"}], solution="red")
    assert target_text(plain, "red") == "red" and target_text(plain, "red", "Answer: {answer}") == "Answer: red"


def test_collator_masks_everything_but_the_target_and_eos(registry, tiny):
    from core.runtime.generation import make_prompt
    from core.runtime.loader import ModelBundle

    _, fam, proc = tiny
    task = registry.create("tasks", "synthetic_grounding", {"num_objects": 2, "seed": 0})
    samples = task.load("train")
    bundle = ModelBundle(fam, None, proc)
    coll = SFTCollator(bundle, samples)
    batch = coll([{"index": 0}, {"index": 1}])
    tok = proc.tokenizer
    assert batch["labels"].shape == batch["input_ids"].shape
    kept = [batch["labels"][r][batch["labels"][r] != -100].tolist() for r in range(2)]
    prompt_width = batch["input_ids"].shape[1] - max(len(k) for k in kept)
    for row in range(2):
        s = samples[row]
        target = coll.target(s, s.load_images())
        assert kept[row] == tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # The prompt part is exactly what generation sees for this sample alone (left padding aside).
        p = make_prompt(bundle, s)
        alone = fam.process(proc, [p.text], [p.images])["input_ids"][0].tolist()
        ids, mask = batch["input_ids"][row, :prompt_width], batch["attention_mask"][row, :prompt_width]
        assert ids[mask == 1].tolist() == alone
    assert "pixel_values" in batch and "image_grid_thw" in batch
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape  # per-token key extended


def test_sft_lowers_the_loss_and_saves_a_reloadable_checkpoint(tmp_path, registry):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "base"), "tiny": {"seed": 0}},
        "task": {"name": "synthetic_color", "options": {"num_train": 64, "num_eval": 8}},
        "rewards": [{"name": "all_match"}],
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        "train": {"learning_rate": 3e-3, "per_device_batch_size": 6, "max_steps": 12, "seed": 0},
        "logging": {"output_dir": str(tmp_path / "run"), "tensorboard": False, "progress_bar": False},
    }))
    out = tmp_path / "sft"
    assert main(["--config", str(cfg), "--output-dir", str(out), "--logging-steps", "3", "--plugins",
                 "qwen-vl,synthetic,text"]) == 0
    state = json.loads((out / "sft_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["steps"] == 12 and len(losses) == 4
    assert losses[-1] < losses[0] - 0.5, losses
    model = AutoModelForImageTextToText.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    assert model.config.model_type == "qwen2_5_vl" and proc.tokenizer.eos_token == "<|im_end|>"
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "base")
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)  # the weights were trained


def test_sft_rejects_a_bad_template(tmp_path, capsys):
    assert main(["--config", "nope.yaml"]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"family": "qwen2_5_vl", "path": str(tmp_path / "b"), "tiny": {}},
                               "task": {"name": "synthetic_color"}, "rewards": [{"name": "all_match"}]}))
    assert main(["--config", str(cfg), "--template", "no placeholder", "--plugins", "qwen-vl,synthetic,text"]) == 2
    assert "must contain {answer}" in capsys.readouterr().err


def test_intermediate_checkpoints_hold_no_pickle_and_evaluate_verifies_them(tmp_path, registry):
    """``--save-steps`` checkpoints are closed, hash-listed sets without TRL's pickles, and
    ``core.evaluate --checkpoint`` accepts them (it refused them as saves that never finished)."""
    from core.evaluate import main as evaluate

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "base"), "tiny": {"seed": 0}},
        "task": {"name": "synthetic_color", "options": {"num_train": 16, "num_eval": 4}},
        "rewards": [{"name": "all_match"}],
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 4, "max_steps": 2, "seed": 0},
        "logging": {"output_dir": str(tmp_path / "run"), "tensorboard": False, "progress_bar": False},
    }))
    out = tmp_path / "sft"
    plugins = ["--plugins", "qwen-vl,synthetic,text"]
    assert main(["--config", str(cfg), "--output-dir", str(out), "--save-steps", "1", *plugins]) == 0
    ckpt = out / "checkpoint-1"
    names = {p.name for p in ckpt.iterdir()}
    assert "manifest.json" in names and "model.safetensors" in names, names
    pickles = [p for p in (*ckpt.iterdir(), *out.iterdir()) if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not pickles, pickles
    assert evaluate(["--config", str(cfg), "--checkpoint", str(ckpt), "--limit", "2", "--quiet",
                     "--out", str(tmp_path / "ev"), *plugins]) == 0
    (ckpt / "planted.txt").write_text("x")  # the set is closed: an unlisted file is refused
    assert evaluate(["--config", str(cfg), "--checkpoint", str(ckpt), "--limit", "2", "--quiet",
                     "--out", str(tmp_path / "ev2"), *plugins]) == 2
