"""The model-family conformance checks catch wrong families (issue 22): each new check fails a family
broken in the one way it is about, and passes the right one.

The broken families subclass the tutorial's Mistral 3 family (examples/families/mistral3) or a
shipped one and get one thing wrong, as a first attempt at a family would: the default
tokenisation (a second BOS), a resize that ignores the processor's patch merge, the default
suppression list (``[IMG_BREAK]`` stays generatable), a render that differs from the template.
They share the right family's tiny checkpoint (built once per module).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from core.interfaces import TransformersFamily
from core.testing.conformance import ConformanceError
from core.testing.models import (
    CONFORMANCE_CHECKS,
    ConformanceContext,
    build_conformance_context,
    image_structure_token_ids,
)

try:
    import vlmr1_mistral3  # noqa: F401  (pip-installed)
except ImportError:  # a plain checkout: the example's source folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "families" / "mistral3"))
from vlmr1_generic.family import GenericFamily
from vlmr1_mistral3.family import Mistral3Family
from vlmr1_qwen_vl.family import Qwen25VLFamily

NEW_CHECKS = ("special_tokens", "prompt_round_trip", "image_resize", "structure_suppressed")


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory) -> ConformanceContext:
    return build_conformance_context(Mistral3Family, tmp_path_factory.mktemp("tiny"))


def broken(ctx: ConformanceContext, cls: type) -> ConformanceContext:
    """The context of ``ctx`` with family class ``cls`` (same checkpoint, model and processor)."""
    return ConformanceContext(cls, cls.from_options({}), ctx.path, ctx.model, ctx.processor)


# ---- broken Mistral 3 families -----------------------------------------------------------------
class DefaultTokenisation(Mistral3Family):
    """Processes with the interface default: the tokenizer adds BOS to a template that wrote one."""

    process = TransformersFamily.process


class DoubledMarker(Mistral3Family):
    """Renders ``[/INST]`` twice (a template edited by hand)."""

    def render_prompt(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        return super().render_prompt(processor, messages).replace("[/INST]", "[/INST][/INST]")


class DropsSystemTurn(Mistral3Family):
    """Renders without the system turn: one BOS, no doubled token, but not the checkpoint's prompt."""

    def render_prompt(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        return super().render_prompt(processor, [m for m in messages if m["role"] != "system"])


class UnmergedResize(Mistral3Family):
    """Rounds to the image processor's patch size, ignoring the processor's 2x2 patch merge."""

    def resized_image_size(self, processor: Any, image: Any) -> tuple[int, int]:
        merge = processor.spatial_merge_size
        processor.spatial_merge_size = 1
        try:
            return super().resized_image_size(processor, image)
        finally:
            processor.spatial_merge_size = merge


class DefaultResize(Mistral3Family):
    """The interface default: the image unchanged (Pixtral's ``size`` has no height/width)."""

    resized_image_size = TransformersFamily.resized_image_size


class DefaultSuppression(Mistral3Family):
    """Only the ids transformers' attributes name: ``[IMG]``, ``[IMG_END]``, not ``[IMG_BREAK]``."""

    suppressed_tokens = ()


class Naive(Mistral3Family):
    """The issue's naive family: all three defaults at once."""

    process = TransformersFamily.process
    resized_image_size = TransformersFamily.resized_image_size
    suppressed_tokens = ()


def test_the_tutorial_family_passes_the_new_checks(mistral3):
    for name in NEW_CHECKS:
        CONFORMANCE_CHECKS[name](mistral3)
    tok = mistral3.processor.tokenizer
    # The structure tokens are found from the processor's output, not from the family.
    assert {tok.convert_ids_to_tokens(i) for i in image_structure_token_ids(mistral3)} == {
        "[IMG]", "[IMG_BREAK]", "[IMG_END]"}


@pytest.mark.parametrize(("family", "check", "message"), [
    (DefaultTokenisation, "special_tokens", "holds BOS '<s>' 2 time(s)"),
    (DoubledMarker, "special_tokens", "repeats special token(s) '[/INST]'"),
    (DefaultTokenisation, "prompt_round_trip", "tokenises differently from the processor's own chat template"),
    (DropsSystemTurn, "prompt_round_trip", "the prompt with a system turn and 1 image tokenises differently"),
    (UnmergedResize, "image_resize", "but the processor resized it to"),
    (DefaultResize, "image_resize", "says a 97x53 image becomes 97x53, but the processor resized it to 56x42"),
    (DefaultSuppression, "structure_suppressed", "'[IMG_BREAK]'"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_a_broken_family_fails_its_check(mistral3, family, check, message):
    with pytest.raises(ConformanceError) as err:
        CONFORMANCE_CHECKS[check](broken(mistral3, family))
    assert message in str(err.value), str(err.value)


def test_a_render_that_drops_the_system_turn_is_caught_only_by_the_round_trip(mistral3):
    ctx = broken(mistral3, DropsSystemTurn)
    CONFORMANCE_CHECKS["special_tokens"](ctx)  # one BOS, nothing doubled: only the round trip sees it
    with pytest.raises(ConformanceError):
        CONFORMANCE_CHECKS["prompt_round_trip"](ctx)


def test_the_naive_family_fails_the_suite(mistral3):
    ctx = broken(mistral3, Naive)
    failed = []
    for name in NEW_CHECKS:
        try:
            CONFORMANCE_CHECKS[name](ctx)
        except ConformanceError:
            failed.append(name)
    assert failed == list(NEW_CHECKS)


# ---- broken shipped families (other measurements: image_grid_thw, Gemma's BOS) ---------------
def test_a_qwen_resize_without_the_patch_merge_is_caught(tmp_path):
    class Qwen25UnmergedResize(Qwen25VLFamily):
        """smart_resize to multiples of the patch (14) instead of patch x merge (28)."""

        def resized_image_size(self, processor: Any, image: Any) -> tuple[int, int]:
            ip = processor.image_processor
            merge = ip.merge_size
            ip.merge_size = 1
            try:
                return super().resized_image_size(processor, image)
            finally:
                ip.merge_size = merge

    ctx = build_conformance_context(Qwen25VLFamily, tmp_path)
    CONFORMANCE_CHECKS["image_resize"](ctx)
    with pytest.raises(ConformanceError, match="but the processor resized it to"):
        CONFORMANCE_CHECKS["image_resize"](broken(ctx, Qwen25UnmergedResize))


def test_gemma3_with_default_tokenisation_has_two_bos(tmp_path):
    class GemmaDefaultTokenisation(GenericFamily):
        """Drops the generic family's BOS rule (Gemma's template writes ``<bos>`` itself)."""

        process = TransformersFamily.process

    ctx = build_conformance_context(GenericFamily, tmp_path, arch="gemma3")
    CONFORMANCE_CHECKS["special_tokens"](ctx)
    CONFORMANCE_CHECKS["prompt_round_trip"](ctx)
    with pytest.raises(ConformanceError, match="holds BOS '<bos>' 2 time"):
        CONFORMANCE_CHECKS["special_tokens"](broken(ctx, GemmaDefaultTokenisation))


def test_the_generic_fallback_suppresses_mistral3s_row_break(mistral3):
    """The shipped generic family (the fallback for every mistral3 checkpoint) left ``[IMG_BREAK]``
    generatable until the structure_suppressed check found it; it passes the new checks now."""
    ctx = broken(mistral3, GenericFamily)
    for name in NEW_CHECKS:
        CONFORMANCE_CHECKS[name](ctx)
    tok = mistral3.processor.tokenizer
    assert tok.convert_tokens_to_ids("[IMG_BREAK]") in ctx.family.suppressed_token_ids(ctx.processor, ctx.model)
