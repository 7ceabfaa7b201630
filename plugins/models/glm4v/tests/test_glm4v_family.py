"""GLM-4V family: the shared conformance suite (all three architectures) plus GLM-specific checks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from vlmr1_glm4v.family import GLM4VFamily, glm4v_available

from core.testing.models import CONFORMANCE_CHECKS, build_conformance_context, make_images

VARIANTS = ["glm4v", "glm4v_moe", "glm46v"]
CLASSES = {
    "glm4v": ("Glm4vForConditionalGeneration", "Glm4vProcessor"),
    "glm4v_moe": ("Glm4vMoeForConditionalGeneration", "Glm4vProcessor"),
    "glm46v": ("Glm46VForConditionalGeneration", "Glm46VProcessor"),
}
# transformers' GLM processors call np.array on tensors (numpy 2 warns, harmlessly).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
ONE_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]


@pytest.fixture(scope="module", params=VARIANTS)
def ctx(request, tmp_path_factory):
    return build_conformance_context(GLM4VFamily, tmp_path_factory.mktemp(request.param), variant=request.param)


@pytest.mark.parametrize("check", sorted(CONFORMANCE_CHECKS))
def test_conformance(ctx, check):
    CONFORMANCE_CHECKS[check](ctx)


# ---- GLM-specific ------------------------------------------------------------------------
def test_tiny_architecture_and_tokens(ctx):
    variant = ctx.tiny_options["variant"]
    cfg = ctx.model.config
    assert cfg.model_type == variant
    assert (type(ctx.model).__name__, type(ctx.processor).__name__) == CLASSES[variant]
    text = cfg.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 2, 4)
    rope = text.rope_parameters
    assert rope["rope_theta"] == 3.0 and rope["partial_rotary_factor"] == 0.5
    # head_dim 16, half rotary -> 4 frequencies split T/H/W like the real [8, 12, 12] of 32.
    assert rope["mrope_section"] == [1, 1, 2]
    if variant == "glm4v_moe":
        assert (text.n_routed_experts, text.num_experts_per_tok, text.first_k_dense_replace) == (4, 2, 1)
        assert any("experts" in n for n, _ in ctx.model.named_modules())
    tok = ctx.processor.tokenizer
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    eos = ctx.model.generation_config.eos_token_id
    assert eos == [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert cfg.image_token_id == ctx.processor.image_token_id == tok.convert_tokens_to_ids("<|image|>")
    for t in ("[gMASK]", "<sop>", "<|user|>", "<|image|>", "<|begin_of_box|>"):
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    expected = sorted(tok.convert_tokens_to_ids(t) for t in (
        "<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"))
    assert ctx.family.suppressed_token_ids(ctx.processor, ctx.model) == expected
    assert tok.convert_tokens_to_ids("<|begin_of_box|>") not in expected  # GLM writes boxes with it


def test_prompt_and_processor_outputs(ctx):
    text = ctx.family.render_prompt(ctx.processor, ONE_IMAGE)
    assert text == "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>What colour?<|assistant|>\n"
    system = [{"role": "system", "content": "Be brief."}, *ONE_IMAGE]
    assert ctx.family.render_prompt(ctx.processor, system).startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\n")
    image = Image.new("RGB", (100, 60), "red")
    inputs = ctx.family.process(ctx.processor, [text], [[image]])
    # mm_token_type_ids marks exactly the image placeholders; the training forward needs it.
    pad_id = ctx.model.config.image_token_id
    assert torch.equal(inputs["mm_token_type_ids"] == 1, inputs["input_ids"] == pad_id)
    assert "mm_token_type_ids" in ctx.family.per_token_keys
    # resized_image_size is what the processor produced: grid (t, h, w) in patches.
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    patch = ctx.processor.image_processor.patch_size
    assert ctx.family.resized_image_size(ctx.processor, image) == (gw * patch, gh * patch)
    assert int((inputs["input_ids"] == pad_id).sum()) == gh * gw // 4


def test_training_forward_needs_mm_token_type_ids(ctx):
    """Negative control for the log-prob check: without the ids transformers refuses."""
    text = ctx.family.render_prompt(ctx.processor, ONE_IMAGE)
    inputs = dict(ctx.family.process(ctx.processor, [text], [make_images(1)]))
    inputs.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        ctx.model(**inputs)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # GLM smart_resize, factor 28, an image counted as 2 frames, bounds 1568..6272 (x2 frames):
        # 100x60 -> round to (56, 112): 2*56*112 = 12544 > 6272 -> beta = sqrt(2*60*100/6272) = 1.383;
        # floor(60/1.383/28)*28 = 28, floor(100/1.383/28)*28 = 56.
        ((100, 60), (56, 28)),
        # 20x20: below the factor -> scaled to 28x28; 2*28*28 = 1568 = min: kept.
        ((20, 20), (28, 28)),
        # 56x56: 2*56*56 = 6272 = max: kept (4 merged tokens).
        ((56, 56), (56, 56)),
    ],
)
def test_resized_image_size_golden(ctx, size, expected):
    assert ctx.family.resized_image_size(ctx.processor, Image.new("RGB", size)) == expected


def test_min_max_pixels_options_reach_image_processor(ctx):
    fam = GLM4VFamily.from_options({"max_pixels": 2 * 84 * 84})
    proc = fam.load_processor(ctx.path)
    image = Image.new("RGB", (200, 200))
    assert fam.resized_image_size(proc, image) == (84, 84)
    inputs = fam.process(proc, [fam.render_prompt(proc, ONE_IMAGE)], [[image]])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]
    # The default tiny bound gives 56x56 for the same image.
    assert ctx.family.resized_image_size(ctx.processor, image) == (56, 56)


def test_box_to_original_golden(ctx):
    # normalized_1000 on a 640x480 image.
    assert ctx.family.box_to_original([100, 250, 500, 1000], (640, 480), (56, 56)) == [64.0, 120.0, 320.0, 480.0]


def test_vision_modules(ctx):
    assert ctx.family.vision_module_names(ctx.model) == ["model.visual", "model.visual.merger"]


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="min_pixels"):
        GLM4VFamily.from_options({"min_pixels": 5000, "max_pixels": 100})
    with pytest.raises(ValueError, match="max_pixel"):
        GLM4VFamily.from_options({"max_pixel": 100})
    with pytest.raises(ValueError, match="variant"):
        GLM4VFamily.build_tiny_checkpoint(tmp_path, variant="glm5")
    with pytest.raises(ValueError, match="mrope_section"):
        GLM4VFamily.build_tiny_checkpoint(tmp_path, mrope_section=[4, 4, 4])


def test_load_model_refuses_other_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(ValueError, match="model_type is 'qwen2_vl'"):
        GLM4VFamily().load_model(tmp_path, dtype=torch.float32)


def test_handles_by_model_type_only():
    assert all(GLM4VFamily.handles(mt) for mt in VARIANTS)
    assert not GLM4VFamily.handles("glm4")  # the text-only GLM-4
    assert not GLM4VFamily.handles("zai-org/GLM-4.1V-9B-Thinking")


def test_plugin_registers_family():
    from vlmr1_glm4v import hooks

    from core.plugins.registry import Registry

    reg = Registry()
    hooks.vlmr1_register_models(reg.registrar("vlmr1-plugin-glm4v", ("models",)))
    assert [e.name for e in reg.entries("models")] == ["glm4v"]
    assert glm4v_available() == (True, "")


def test_multi_image_generation_expansion_is_repaired(ctx):
    """Every returned sequence of a 2-image prompt sees both images in order (see the family docs)."""
    from transformers import AutoModelForImageTextToText

    from core.interfaces import multi_image_expansion_ok

    assert multi_image_expansion_ok(ctx.model)
    raw = AutoModelForImageTextToText.from_pretrained(ctx.path, dtype=torch.float32)
    if multi_image_expansion_ok(raw):
        pytest.skip("this transformers expands multi-image prompts correctly; the repair is a no-op")
    # Negative control: unrepaired, sampled log-probs of a 2-image prompt do not match the training forward.
    from core.testing.models import ConformanceContext, check_logprobs

    with pytest.raises(AssertionError, match="log-probs differ"):
        check_logprobs(ConformanceContext(GLM4VFamily, ctx.family, ctx.path, raw.eval(), ctx.processor))
