"""The Mistral 3 family: vlmr1's model-family conformance suite plus Mistral-specific facts.

Run: ``.venv/bin/python -m pytest examples/families/mistral3/tests`` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import pytest
from PIL import Image
from vlmr1_mistral3.family import Mistral3Family

from core.testing.conformance import check_plugin
from core.testing.models import CONFORMANCE_CHECKS, build_conformance_context


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    # The tiny checkpoint is built once and shared by every check.
    return build_conformance_context(Mistral3Family, tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("check", sorted(CONFORMANCE_CHECKS))
def test_conformance(ctx, check):
    CONFORMANCE_CHECKS[check](ctx)


def test_plugin_registers_the_family():
    assert check_plugin("vlmr1_mistral3.hooks", expected={"models": ["mistral3"]}) == {"models": ["mistral3"]}


def test_prompt_layout(ctx):
    """One BOS, the image expanded into rows of [IMG] ended by [IMG_BREAK], the last by [IMG_END]."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = ctx.family.render_prompt(ctx.processor, msgs)
    assert text == "<s>[INST][IMG]What colour?[/INST]"
    ids = ctx.family.process(ctx.processor, [text], [[Image.new("RGB", (40, 20))]])["input_ids"][0]
    tokens = ctx.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    # 40x20 -> 42x28 (multiples of patch 7 x merge 2) -> 3x2 merged patches.
    assert tokens[:10] == ["<s>", "[INST]", "[IMG]", "[IMG]", "[IMG]", "[IMG_BREAK]", "[IMG]", "[IMG]", "[IMG]",
                           "[IMG_END]"]
    assert ctx.family.resized_image_size(ctx.processor, Image.new("RGB", (40, 20))) == (42, 28)


def test_longest_edge_option(ctx):
    family = Mistral3Family.from_options({"longest_edge": 28})
    processor = family.load_processor(ctx.path)
    assert family.resized_image_size(processor, Image.new("RGB", (97, 53))) == (28, 28)
    with pytest.raises(ValueError, match="longest_edg"):
        Mistral3Family.from_options({"longest_edg": 28})
