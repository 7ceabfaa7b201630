"""InternVL family: the shared conformance suite plus InternVL-specific checks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from vlmr1_internvl.family import InternVLFamily

from core.testing.models import CONFORMANCE_CHECKS, build_conformance_context, make_images

ONE_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return build_conformance_context(InternVLFamily, tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("check", sorted(CONFORMANCE_CHECKS))
def test_conformance(ctx, check):
    CONFORMANCE_CHECKS[check](ctx)


def _family(**options):
    return InternVLFamily.from_options(options)


def _tiles(family, ctx, image):
    """Tiles fed to the vision tower and <IMG_CONTEXT> tokens in the prompt for one image."""
    proc = family.load_processor(ctx.path)
    inputs = family.process(proc, [family.render_prompt(proc, ONE_IMAGE)], [[image]])
    n_ctx = int((inputs["input_ids"] == ctx.model.config.image_token_id).sum())
    return inputs["pixel_values"].shape[0], n_ctx, inputs


# ---- InternVL-specific -------------------------------------------------------------------
def test_tiny_architecture_and_tokens(ctx):
    cfg = ctx.model.config
    assert cfg.model_type == "internvl" and cfg.text_config.model_type == "qwen2"
    text = cfg.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 2, 4)
    assert text.rope_parameters["rope_theta"] == 3.0
    assert tuple(cfg.vision_config.image_size) == (56, 56) and tuple(cfg.vision_config.patch_size) == (14, 14)
    # (56/14)^2 patches, 2x2 pixel shuffle -> 4 tokens per tile, and the processor agrees.
    assert cfg.image_seq_length == ctx.processor.image_seq_length == 4
    tok = ctx.processor.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.image_token_id == tok.context_image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<ref>", "<box>"):
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    expected = sorted(tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"))
    assert ctx.family.suppressed_token_ids(ctx.processor, ctx.model) == expected
    # Grounding markers stay generable.
    assert tok.convert_tokens_to_ids("<box>") not in expected


def test_prompt_format(ctx):
    text = ctx.family.render_prompt(ctx.processor, ONE_IMAGE)
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n"
    inputs = ctx.family.process(ctx.processor, [text], [make_images(1)])
    tok = ctx.processor.tokenizer
    decoded = tok.decode(inputs["input_ids"][0])
    assert "<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat colour?" in decoded
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}


def test_crop_to_patches_honoured_on_every_call(ctx):
    """A wide image: one tile with the default (False); grid tiles + thumbnail with True."""
    wide = Image.new("RGB", (400, 100), "red")  # aspect 4: the 4x1 grid wins within 12 tiles
    tiles, n_ctx, _ = _tiles(_family(), ctx, wide)
    assert (tiles, n_ctx) == (1, 4)
    tiles, n_ctx, _ = _tiles(_family(crop_to_patches=True), ctx, wide)
    assert (tiles, n_ctx) == (4 + 1, 5 * 4)  # 4 tiles and the thumbnail, 4 tokens each
    tiles, n_ctx, _ = _tiles(_family(crop_to_patches=True, max_patches=2), ctx, wide)
    assert (tiles, n_ctx) == (2 + 1, 3 * 4)  # best grid within 2 tiles is 2x1
    # The explicit option wins over InternVLProcessor's own call default (crop_to_patches=True)
    # on repeated calls with one loaded processor, and whatever the image processor says.
    fam = _family()
    proc = fam.load_processor(ctx.path)
    proc.image_processor.crop_to_patches = True
    text = fam.render_prompt(proc, ONE_IMAGE)
    for _ in range(2):
        assert fam.process(proc, [text], [[wide]])["pixel_values"].shape[0] == 1
    # The family also loads the processor with the option as its default, so even a direct
    # processor call without it gives one tile.
    assert proc(text=[text], images=[wide], return_tensors="pt")["pixel_values"].shape[0] == 1
    # Negative control: the checkpoint's processor as plain AutoProcessor loads it tiles by
    # default (InternVLProcessor's call default), though its image processor says False.
    from transformers import AutoProcessor

    raw = AutoProcessor.from_pretrained(ctx.path)
    assert raw.image_processor.crop_to_patches is False
    assert raw(text=[text], images=[wide], return_tensors="pt")["pixel_values"].shape[0] == 5
    # ... and the family's per-call kwargs alone override that default, both ways.
    assert fam.process(raw, [text], [[wide]])["pixel_values"].shape[0] == 1
    assert _family(crop_to_patches=True, max_patches=2).process(raw, [text], [[wide]])["pixel_values"].shape[0] == 3


def test_crop_to_patches_generates_and_logprobs_match(ctx):
    """The tiled path also keeps training-forward log-probs equal to generation's."""
    from core.testing.models import ConformanceContext, check_generate, check_logprobs

    # Same loaded model, a family that tiles.

    fam = _family(crop_to_patches=True, max_patches=4)
    c = ConformanceContext(InternVLFamily, fam, ctx.path, ctx.model, fam.load_processor(ctx.path))
    check_generate(c)
    check_logprobs(c)


def test_resized_image_size(ctx):
    wide = Image.new("RGB", (400, 100))
    assert ctx.family.resized_image_size(ctx.processor, wide) == (56, 56)
    fam = _family(crop_to_patches=True)
    assert fam.resized_image_size(fam.load_processor(ctx.path), wide) == (4 * 56, 56)
    fam = _family(crop_to_patches=True, max_patches=2)
    assert fam.resized_image_size(fam.load_processor(ctx.path), wide) == (2 * 56, 56)


def test_box_to_original_golden(ctx):
    # normalized_1000 on a 640x480 image: x * 640 / 1000, y * 480 / 1000.
    assert ctx.family.box_to_original([100, 250, 500, 1000], (640, 480), (56, 56)) == [64.0, 120.0, 320.0, 480.0]


def test_vision_modules(ctx):
    assert ctx.family.vision_module_names(ctx.model) == ["model.vision_tower", "model.multi_modal_projector"]


def test_options_are_validated():
    with pytest.raises(ValueError, match="min_patches"):
        _family(crop_to_patches=True, min_patches=6, max_patches=2)
    with pytest.raises(ValueError, match="crop_to_patch"):
        _family(crop_to_patch=True)
    assert _family().processor_call_kwargs() == {"crop_to_patches": False}
    assert _family(crop_to_patches=True, max_patches=6).processor_call_kwargs() == {
        "crop_to_patches": True, "max_patches": 6}


def test_tiny_builder_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="hidden_sise"):
        InternVLFamily.build_tiny_checkpoint(tmp_path, hidden_sise=32)
    with pytest.raises(ValueError, match="even multiple"):
        InternVLFamily.build_tiny_checkpoint(tmp_path, image_size=42, patch_size=14)


def test_load_model_refuses_other_model_type(tmp_path):
    cfg_dir = tmp_path / "other"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="model_type is 'llava'"):
        InternVLFamily().load_model(cfg_dir, dtype=torch.float32)


def test_handles_by_model_type_only():
    assert InternVLFamily.handles("internvl")
    assert not InternVLFamily.handles("OpenGVLab/InternVL3-2B-hf")
    assert not InternVLFamily.handles("internvl_chat")  # the remote-code checkpoints


def test_plugin_registers_family():
    from vlmr1_internvl import hooks

    from core.plugins.registry import Registry

    reg = Registry()
    hooks.vlmr1_register_models(reg.registrar("vlmr1-plugin-internvl", ("models",)))
    assert [e.name for e in reg.entries("models")] == ["internvl"]
