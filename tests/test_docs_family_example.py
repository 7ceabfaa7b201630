"""The ModelFamily example in docs/plugins.md runs: a family that is only its differences."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from core.interfaces import TransformersFamily
from core.interfaces.tiny import build_tiny_tokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def family_cls() -> type[TransformersFamily]:
    section = DOC.read_text().split("### ModelFamily", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, f"{DOC}:ModelFamily", "exec"), namespace)
    return namespace["MyVLFamily"]


def test_registers_and_selects_by_model_type(family_cls, register_plugin):
    host = register_plugin(family_cls, distribution="vlmr1-plugin-myvl")
    family = host.registry.create("models", "my_vl", {"min_pixels": 784})
    assert family.handles("my_vl") and not family.handles("llava")
    with pytest.raises(Exception, match="max_pixels"):
        host.registry.create("models", "my_vl", {"min_pixels": 10, "max_pixels": 5})


def test_inherited_facts(family_cls):
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.visual = torch.nn.Module()
    model.model.visual.merger = torch.nn.Linear(1, 1)
    model.model.language_model = torch.nn.Linear(1, 1)
    family = family_cls()
    assert family.vision_module_names(model) == ["model.visual", "model.visual.merger"]

    specials = ["<|endoftext|>", "<|image|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_box|>"]
    tok = build_tiny_tokenizer(specials, eos_token="<|endoftext|>")
    processor = SimpleNamespace(tokenizer=tok, image_token="<|image|>")
    model.config = SimpleNamespace(image_token_id=tok.convert_tokens_to_ids("<|image|>"))
    got = family.suppressed_token_ids(processor, model)
    assert got == sorted(tok.convert_tokens_to_ids(t) for t in specials[1:4])  # not <|begin_of_box|>


def test_resized_image_size_uses_the_processors_own_resize(family_cls):
    from transformers import Qwen2VLImageProcessor

    ip = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=4 * 28 * 28, patch_size=14, merge_size=2)
    w, h = family_cls().resized_image_size(SimpleNamespace(image_processor=ip), Image.new("RGB", (97, 53)))
    assert (w % 28, h % 28) == (0, 0) and w > h and w * h <= 4 * 28 * 28
