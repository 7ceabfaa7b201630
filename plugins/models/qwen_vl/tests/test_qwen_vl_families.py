"""Qwen-VL families: the shared conformance suite plus Qwen-specific checks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from vlmr1_qwen_vl.family import Qwen2VLFamily, Qwen3VLFamily, Qwen25VLFamily, qwen3_vl_available

from core.interfaces import build_tiny_tokenizer
from core.testing.models import CONFORMANCE_CHECKS, build_conformance_context, make_images

FAMILIES = [Qwen2VLFamily, Qwen25VLFamily]
if qwen3_vl_available()[0]:
    FAMILIES.append(Qwen3VLFamily)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda c: c.name)
def ctx(request, tmp_path_factory):
    return build_conformance_context(request.param, tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("check", sorted(CONFORMANCE_CHECKS))
def test_conformance(ctx, check):
    CONFORMANCE_CHECKS[check](ctx)


# ---- Qwen-specific -----------------------------------------------------------------------
def test_tiny_architecture_and_tokens(ctx):
    cfg = ctx.model.config
    text = cfg.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 2, 4)
    assert text.rope_parameters["rope_theta"] == 3.0
    assert sum(text.rope_parameters["mrope_section"]) == 64 // 4 // 2
    assert cfg.vision_config.depth == 2 and cfg.vision_config.spatial_merge_size == 2
    tok = ctx.processor.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert ctx.model.generation_config.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    # Each special token is a single id.
    for t in ("<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>"):
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    expected = sorted(tok.convert_tokens_to_ids(t) for t in
                      ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"))
    assert ctx.family.suppressed_token_ids(ctx.processor, ctx.model) == expected


def test_prompt_and_processor_outputs(ctx):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = ctx.family.render_prompt(ctx.processor, msgs)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    image = Image.new("RGB", (100, 60), "red")
    inputs = ctx.family.process(ctx.processor, [text], [[image]])
    # mm_token_type_ids marks exactly the image pads; the training forward needs it.
    pad_id = ctx.model.config.image_token_id
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == pad_id)
    # resized_image_size is what the processor produced: grid (t, h, w) in patches.
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    patch = ctx.processor.image_processor.patch_size
    assert ctx.family.resized_image_size(ctx.processor, image) == (gw * patch, gh * patch)
    assert int((inputs["input_ids"] == pad_id).sum()) == gh * gw // 4


def test_training_forward_needs_mm_token_type_ids(ctx):
    """Negative control for the log-prob check: without the ids, positions go wrong.

    Qwen2-VL and Qwen3-VL refuse; Qwen2.5-VL silently falls back to 1-D positions.
    """
    text = ctx.family.render_prompt(ctx.processor, [{"role": "user", "content": [{"type": "image"}]}])
    inputs = dict(ctx.family.process(ctx.processor, [text], [make_images(1)]))
    with torch.no_grad():
        good = ctx.model(**inputs).logits
    inputs.pop("mm_token_type_ids")
    if ctx.family_cls is Qwen25VLFamily:
        with torch.no_grad():
            bad = ctx.model(**inputs).logits
        assert (bad - good).abs().max() > 1e-3
    else:
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            ctx.model(**inputs)


@pytest.mark.parametrize(
    ("family", "size", "expected"),
    [
        # smart_resize with factor 28, min 784, max 3136 (hand-computed):
        # 100x60 -> round to (112, 56) = 6272 px > 3136 -> beta = sqrt(6000/3136) = 1.383;
        # floor(60/1.383/28)*28 = 28, floor(100/1.383/28)*28 = 56.
        (Qwen25VLFamily, (100, 60), (56, 28)),
        # 20x20 -> rounds to 28x28 = 784 = min_pixels: kept.
        (Qwen25VLFamily, (20, 20), (28, 28)),
        # factor 32 (patch 16), min 1024, max 4096: 200x50 -> beta = sqrt(10000/4096) = 1.5625;
        # floor(50/1.5625/32)*32 = 32, floor(200/1.5625/32)*32 = 128.
        (Qwen3VLFamily, (200, 50), (128, 32)),
    ],
)
def test_resized_image_size_golden(tmp_path, family, size, expected):
    if family is Qwen3VLFamily and not qwen3_vl_available()[0]:
        pytest.skip("no Qwen3-VL in this transformers")
    path = family.build_tiny_checkpoint(tmp_path / "ckpt")
    fam = family()
    proc = fam.load_processor(path)
    assert fam.resized_image_size(proc, Image.new("RGB", size)) == expected


def test_min_max_pixels_options_reach_image_processor(tmp_path):
    path = Qwen25VLFamily.build_tiny_checkpoint(tmp_path / "ckpt")
    fam = Qwen25VLFamily.from_options({"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 9})
    proc = fam.load_processor(path)
    size = proc.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (3136, 7056)
    # 200x200 -> 84x84 (9 merged tokens) under max 7056, instead of 56x56 with the default.
    image = Image.new("RGB", (200, 200))
    assert fam.resized_image_size(proc, image) == (84, 84)
    inputs = fam.process(proc, [fam.render_prompt(proc, [{"role": "user", "content": [{"type": "image"}]}])], [[image]])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]


def test_options_are_validated():
    with pytest.raises(ValueError, match="min_pixels"):
        Qwen25VLFamily.from_options({"min_pixels": 5000, "max_pixels": 100})
    with pytest.raises(ValueError, match="max_pixel"):
        Qwen25VLFamily.from_options({"max_pixel": 100})


def test_tiny_builder_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="hidden_sise"):
        Qwen25VLFamily.build_tiny_checkpoint(tmp_path, hidden_sise=32)
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen25VLFamily.build_tiny_checkpoint(tmp_path, mrope_section=[4, 4, 4])


def test_tiny_builder_overrides(tmp_path):
    path = Qwen2VLFamily.build_tiny_checkpoint(tmp_path, hidden_size=32, num_layers=1, seed=3,
                                               extra_corpus=["zebra zebra zebra"])
    fam = Qwen2VLFamily()
    model = fam.load_model(path, dtype=torch.float32)
    assert model.config.text_config.hidden_size == 32 and model.config.text_config.num_hidden_layers == 1
    # hidden 32 -> 2 heads of 16 (head_dim 16 by default), kv heads 1; mRoPE splits head_dim/2 = 8.
    assert model.config.text_config.num_attention_heads == 2 and model.config.text_config.num_key_value_heads == 1
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    tok = fam.load_processor(path).tokenizer
    assert len(tok("zebra", add_special_tokens=False)["input_ids"]) == 1


def test_load_model_refuses_other_model_type(tmp_path):
    path = Qwen2VLFamily.build_tiny_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="model_type is 'qwen2_vl'"):
        Qwen25VLFamily().load_model(path, dtype=torch.float32)


def test_handles_by_model_type_only():
    assert Qwen25VLFamily.handles("qwen2_5_vl") and not Qwen25VLFamily.handles("qwen2_vl")
    assert not Qwen2VLFamily.handles("Qwen2.5-VL-3B-Instruct")


def test_plugin_registers_families():
    from vlmr1_qwen_vl import hooks

    from core.plugins.registry import Registry

    reg = Registry()
    hooks.vlmr1_register_models(reg.registrar("vlmr1-plugin-qwen-vl", ("models",)))
    names = {e.name for e in reg._entries["models"]}
    assert {"qwen2_vl", "qwen2_5_vl"} <= names
    assert ("qwen3_vl" in names) == qwen3_vl_available()[0]


# ---- the shared tokenizer helper ---------------------------------------------------------
def test_build_tiny_tokenizer_round_trip_and_specials(tmp_path):
    from transformers import AutoTokenizer

    specials = ["<|a|>", "<|img|>", "<eos>"]
    tok = build_tiny_tokenizer(specials, extra_corpus=["platypus"], vocab_size=320, eos_token="<eos>")
    assert [tok.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2]
    s = 'x<|img|><|img|>  Ünïcode 🙂\n\t{"bbox_2d": [1, 22]}<eos>'
    ids = tok(s)["input_ids"]
    assert ids.count(1) == 2 and ids[-1] == 2
    assert tok.decode(ids) == s
    assert tok.decode(ids, skip_special_tokens=True) == 'x  Ünïcode 🙂\n\t{"bbox_2d": [1, 22]}'
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(s)["input_ids"] == ids and again.eos_token == "<eos>"


def test_build_tiny_tokenizer_errors():
    with pytest.raises(ValueError, match="duplicate"):
        build_tiny_tokenizer(["<a>", "<a>"])
    with pytest.raises(ValueError, match="eos_token"):
        build_tiny_tokenizer(["<a>"], eos_token="<b>")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(["<a>"], vocab_size=100)
