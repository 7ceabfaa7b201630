"""Generic family: the shared conformance suite on a tiny LLaVA plus fallback-specific checks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from vlmr1_generic.family import GenericFamily

from core.interfaces import fix_multi_image_expansion, multi_image_expansion_ok
from core.testing.models import CONFORMANCE_CHECKS, build_conformance_context, make_images, make_messages

ONE_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_conformance_context(GenericFamily, tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return build_conformance_context(GenericFamily, tmp_path_factory.mktemp("gemma3"), arch="gemma3")


@pytest.fixture(params=["llava", "gemma3"])
def any_arch(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def ctx(llava):
    return llava


@pytest.mark.parametrize("check", sorted(CONFORMANCE_CHECKS))
def test_conformance(any_arch, check):
    CONFORMANCE_CHECKS[check](any_arch)


def test_prompts_get_exactly_one_bos(any_arch):
    """Llama/Gemma tokenizers prepend BOS; Gemma's template already has one: never two."""
    fam, proc = any_arch.family, any_arch.processor
    bos = proc.tokenizer.bos_token_id
    texts = [fam.render_prompt(proc, make_messages(k)) for k in (0, 1, 2)]
    ids = fam.process(proc, texts, [make_images(k) for k in (0, 1, 2)])
    for row, mask in zip(ids["input_ids"], ids["attention_mask"], strict=True):
        real = row[mask.bool()].tolist()
        assert real[0] == bos and real.count(bos) == 1


def test_gemma3_token_type_ids_mark_image_tokens(gemma3):
    """Gemma 3 attends bidirectionally over image tokens via token_type_ids (a per-token key)."""
    fam, proc, model = gemma3.family, gemma3.processor, gemma3.model
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert "token_type_ids" in fam.per_token_keys
    text = fam.render_prompt(proc, make_messages(2))
    inputs = fam.process(proc, [text], [make_images(2)])
    soft = inputs["input_ids"] == model.config.image_token_id
    assert int(soft.sum()) == 2 * 4 and torch.equal(inputs["token_type_ids"].bool(), soft)
    tok = proc.tokenizer
    markers = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
    expected = sorted(tok.convert_tokens_to_ids(t) for t in markers)
    assert fam.suppressed_token_ids(proc, model) == expected
    # Negative control: token_type_ids change the forward (image tokens see each other), so the
    # training forward must get them to reproduce generation's log-probabilities.
    with torch.no_grad():
        with_ids = model(**inputs).logits
        without = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
    assert (with_ids - without).abs().max() > 1e-3


# ---- generic-specific --------------------------------------------------------------------
def test_tiny_llava_architecture_and_tokens(ctx):
    cfg = ctx.model.config
    assert cfg.model_type == "llava" and type(ctx.model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.vision_config.model_type == "clip_vision_model" and cfg.text_config.model_type == "llama"
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == (64, 2)
    tok = ctx.processor.tokenizer
    assert (tok.eos_token, tok.pad_token) == ("</s>", "<pad>")
    assert ctx.family.suppressed_token_ids(ctx.processor, ctx.model) == [tok.convert_tokens_to_ids("<image>")]


def test_prompt_format_and_image_tokens(ctx):
    text = ctx.family.render_prompt(ctx.processor, ONE_IMAGE)
    assert text == "USER: <image>\nWhat colour?\nASSISTANT:"
    system = [{"role": "system", "content": "Be brief."}, *ONE_IMAGE]
    assert ctx.family.render_prompt(ctx.processor, system) == "Be brief.\n" + text
    inputs = ctx.family.process(ctx.processor, [text], [[Image.new("RGB", (90, 40))]])
    # 28x28 crop / patch 14 = 4 patches (+ CLS, dropped by the "default" strategy).
    assert int((inputs["input_ids"] == ctx.model.config.image_token_id).sum()) == 4
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 28, 28)


def test_vision_modules_detected_and_overridable(ctx):
    assert ctx.family.vision_module_names(ctx.model) == ["model.vision_tower", "model.multi_modal_projector"]
    fam = GenericFamily.from_options({"vision_modules": ["model.vision_tower"]})
    assert fam.vision_module_names(ctx.model) == ["model.vision_tower"]
    with pytest.raises(ValueError, match="vision_modules.*model.nope"):
        GenericFamily.from_options({"vision_modules": ["model.nope"]}).vision_module_names(ctx.model)


def test_vision_modules_error_names_the_option():
    class TextOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="model.options.vision_modules"):
        GenericFamily().vision_module_names(TextOnly())


def test_suppress_tokens_option(ctx):
    tok = ctx.processor.tokenizer
    fam = GenericFamily.from_options({"suppress_tokens": ["<pad>"]})
    assert fam.suppressed_token_ids(ctx.processor, ctx.model) == sorted(
        [tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")])
    with pytest.raises(ValueError, match="suppress_tokens.*not single tokens"):
        fam = GenericFamily.from_options({"suppress_tokens": ["<not a token>"]})
        fam.suppressed_token_ids(ctx.processor, ctx.model)


def test_call_kwargs_reach_every_processor_call(ctx):
    fam = GenericFamily.from_options({"call_kwargs": {"do_normalize": False}})
    text = fam.render_prompt(ctx.processor, ONE_IMAGE)
    white = [[Image.new("RGB", (28, 28), "white")]]
    raw = fam.process(ctx.processor, [text], white)["pixel_values"]
    assert torch.allclose(raw, torch.ones_like(raw))  # rescaled to 1.0, not normalised
    assert not torch.allclose(ctx.family.process(ctx.processor, [text], white)["pixel_values"], raw)
    with pytest.raises(ValueError, match="call_kwargs may not set"):
        GenericFamily.from_options({"call_kwargs": {"images": None}})


def test_box_convention_option():
    assert GenericFamily().box_convention == "unknown"
    fam = GenericFamily.from_options({"box_convention": "normalized_1000"})
    assert fam.box_convention == "normalized_1000"
    assert fam.box_to_original([100, 250, 500, 1000], (640, 480), (28, 28)) == [64.0, 120.0, 320.0, 480.0]
    assert GenericFamily().box_to_original([1, 2, 3, 4], (640, 480), (28, 28)) == [1.0, 2.0, 3.0, 4.0]
    assert GenericFamily.box_convention == "unknown"  # the class default is untouched
    with pytest.raises(ValueError, match="box_convention"):
        GenericFamily.from_options({"box_convention": "absolute_resized"})


def test_resized_image_size(ctx):
    # CLIP resizes the shortest edge then centre-crops: not modelled, reported unchanged.
    assert ctx.family.resized_image_size(ctx.processor, Image.new("RGB", (90, 40))) == (90, 40)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(ctx.path)
    proc.image_processor.size = {"height": 32, "width": 48}
    assert ctx.family.resized_image_size(proc, Image.new("RGB", (90, 40))) == (48, 32)


def test_handles_any_image_text_to_text_model_type_and_is_fallback():
    for mt in ("llava", "smolvlm", "idefics3", "gemma3", "mistral3", "qwen2_5_vl", "internvl", "glm4v"):
        assert GenericFamily.handles(mt), mt
    for mt in ("llama", "qwen2", "clip", "Qwen/Qwen2.5-VL-3B-Instruct"):
        assert not GenericFamily.handles(mt), mt
    assert GenericFamily.fallback is True


def test_load_model_refuses_unknown_and_encoder_decoder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not an AutoModelForImageTextToText"):
        GenericFamily().load_model(tmp_path, dtype=torch.float32)
    from transformers import Pix2StructConfig

    Pix2StructConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder-decoder"):
        GenericFamily().load_model(tmp_path, dtype=torch.float32)


def test_multi_image_expansion_probe(ctx):
    assert multi_image_expansion_ok(ctx.model) is True  # transformers' generic helper is correct
    assert fix_multi_image_expansion(ctx.model) is False  # nothing to repair

    class Interleaving:
        """A model whose helper repeats per image, like transformers 5.23's GLM-4V override."""

        config = ctx.model.config

        def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
            out = mm_encoder_output["image"]
            out.pooler_output = [p for p in out.pooler_output for _ in range(expand_size)]
            return mm_encoder_output

        def get_input_embeddings(self):
            return ctx.model.get_input_embeddings()

    bad = Interleaving()
    assert multi_image_expansion_ok(bad) is False
    assert fix_multi_image_expansion(bad) is True and multi_image_expansion_ok(bad) is True


def test_options_are_validated():
    with pytest.raises(ValueError, match="box_conventio"):
        GenericFamily.from_options({"box_conventio": "unknown"})


def test_tiny_builder_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="hidden_sise"):
        GenericFamily.build_tiny_checkpoint(tmp_path, hidden_sise=32)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        GenericFamily.build_tiny_checkpoint(tmp_path, image_size=30)
    with pytest.raises(ValueError, match="must be even"):
        GenericFamily.build_tiny_checkpoint(tmp_path, arch="gemma3", image_size=21)
    with pytest.raises(ValueError, match="arch"):
        GenericFamily.build_tiny_checkpoint(tmp_path, arch="idefics3")


def test_plugin_registers_family():
    from vlmr1_generic import hooks

    from core.plugins.registry import Registry

    reg = Registry()
    hooks.vlmr1_register_models(reg.registrar("vlmr1-plugin-generic", ("models",)))
    assert [e.name for e in reg.entries("models")] == ["generic"]
