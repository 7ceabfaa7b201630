"""Conformance suite every :class:`~core.interfaces.ModelFamily` runs identically.

A family builds its tiny offline checkpoint once; the checks then exercise the same code
paths training uses, on CPU in float32:

``reload``            the checkpoint reloads through ``AutoModelForImageTextToText`` /
                      ``AutoProcessor`` and the family's ``load_model`` / ``load_processor``;
                      the family claims the checkpoint's ``config.model_type``; rebuilding
                      with the same seed gives the same weights.
``generate``          prompts with 0, 1 and 2 images render, process and sample (8 new
                      tokens, ``TransformersRollout``); no suppressed token is generated.
``suppression``       adversarial: with the suppressed ids' logits boosted so that greedy
                      decoding picks one of them, the rollout still never emits one.
``logprobs``          per-token log-probabilities of sampled completions from the training
                      forward (``build_train_inputs`` + ``completion_logprobs``, prompts
                      re-processed and repeated per completion, as the engine does) equal
                      the generation-time ones (raw logits of ``generate``) within
                      ``LOGPROB_ATOL``. This is the check that multimodal position inputs
                      (``mm_token_type_ids`` & co.) reach the training forward.
``vision_modules``    every name from ``vision_module_names`` exists, holds parameters, and
                      excludes the token embeddings and the LM head.
``box_round_trip``    a known box written in the family's convention maps back to
                      original-image pixels.
``special_tokens``    a rendered, processed prompt holds exactly one BOS, first (where the
                      processor's own chat-template output has one, else none) and no
                      special token twice in a row (image pads excepted).
``prompt_round_trip`` ``render_prompt`` + ``process`` give the same ``input_ids`` (and other
                      outputs) as the processor's own ``apply_chat_template(tokenize=True)``.
``image_resize``      ``resized_image_size`` equals the resize measured from the processor's
                      output (``image_grid_thw`` or one image's ``pixel_values``) on odd sizes.
``structure_suppressed`` every special token the processor writes for an image (found from its
                      output, not from the family) is in ``suppressed_token_ids``.
``shared_prefix``     the shared-prefix training forwards (:mod:`core.grpo.prefix`: one
                      packed row per prompt under a block-causal mask, and one prompt pass
                      whose KV cache the completions run on) give the plain path's
                      log-probs and gradients and encode each unique image once
                      (:func:`check_shared_prefix`).
``shared_prefill``    generation with each unique prompt prefilled once and its KV cache
                      repeated per sample samples the same tokens with the same logits as
                      ``num_return_sequences`` (:func:`check_shared_prefill`).
``compact_decode``    the rollout's decode loop that drops finished rows returns generate's
                      greedy tokens, generate's sampled tokens while no row has finished, and
                      after rows are dropped tokens whose log-probs equal a teacher-forced
                      forward's (:func:`check_compact_decode`).
``grpo_step``         one real GRPO step through ``core.grpo.trainer.run`` (beta 0, a
                      reward that varies between completions) changes language and vision
                      weights; the saved checkpoint reloads with plain
                      ``AutoModelForImageTextToText.from_pretrained``.

Use from a plugin's tests::

    import pytest
    from core.testing.models import CONFORMANCE_CHECKS, build_conformance_context

    @pytest.fixture(scope="module")
    def ctx(tmp_path_factory):
        return build_conformance_context(MyFamily, tmp_path_factory.mktemp("tiny"))

    @pytest.mark.parametrize("check", sorted(CONFORMANCE_CHECKS))
    def test_conformance(ctx, check):
        CONFORMANCE_CHECKS[check](ctx)

or in one call: ``run_model_family_conformance(MyFamily, tmp_path)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.interfaces import RolloutContext, SamplingParams
from core.testing.conformance import ConformanceError

if TYPE_CHECKING:
    from PIL import Image

    from core.interfaces import ModelFamily

#: Tolerance of the training-vs-generation log-probability check (float32 on CPU). Observed
#: differences are ~1e-6; dropping the multimodal position inputs moves them by >1e-3.
LOGPROB_ATOL = 1e-4
#: Completions per prompt in the generation checks.
GROUP_SIZE = 2
#: New tokens sampled per completion.
MAX_NEW_TOKENS = 8


@dataclass
class ConformanceContext:
    """A family instance with its tiny checkpoint loaded, shared by the checks."""

    family_cls: type[ModelFamily]
    family: ModelFamily
    path: Path
    model: Any
    processor: Any
    tiny_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def build_conformance_context(
    family_cls: type[ModelFamily],
    tmp_path: str | Path,
    *,
    family_options: Mapping[str, Any] | None = None,
    **tiny_options: Any,
) -> ConformanceContext:
    """Build ``family_cls``'s tiny checkpoint under ``tmp_path`` and load it the training way.

    ``family_options`` validate against ``family_cls.Options``; ``tiny_options`` go to
    ``build_tiny_checkpoint``. Sets ``HF_HUB_OFFLINE=1``: nothing may be downloaded.
    """
    import torch

    os.environ["HF_HUB_OFFLINE"] = "1"
    path = Path(family_cls.build_tiny_checkpoint(Path(tmp_path) / family_cls.name, **tiny_options))
    family = family_cls.from_options(dict(family_options or {}))
    model = family.load_model(path, dtype=torch.float32).eval()
    processor = family.load_processor(path)
    return ConformanceContext(family_cls, family, path, model, processor, dict(tiny_options))


# ---- inputs ------------------------------------------------------------------------------
_IMAGE_SPECS = (((70, 70), (220, 30, 30)), ((40, 90), (30, 200, 40)), ((120, 50), (40, 60, 230)))


def make_images(k: int) -> list[Image.Image]:
    """``k`` deterministic solid-colour RGB images of different sizes and aspect ratios."""
    from PIL import Image

    return [Image.new("RGB", size, colour) for size, colour in _IMAGE_SPECS[:k]]


def make_messages(num_images: int, question: str = "What colour is this image? Answer red, green or blue.") -> list[
    dict[str, Any]
]:
    """One user turn with ``num_images`` ``{"type": "image"}`` placeholders and a question."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def _prompts(ctx: ConformanceContext, counts: tuple[int, ...] = (0, 1, 2)) -> list[Any]:
    from core.interfaces import PromptInput

    out = []
    for k in counts:
        msgs = make_messages(k)
        text = ctx.family.render_prompt(ctx.processor, msgs)
        out.append(PromptInput(messages=msgs, text=text, images=make_images(k)))
    return out


def _image_token_id(model: Any) -> int | None:
    cfg = model.config
    for attr in ("image_token_id", "image_token_index"):
        val = getattr(cfg, attr, None)
        if isinstance(val, int):
            return val
    return None


def _rollout(ctx: ConformanceContext, suppressed: list[int]) -> Any:
    import torch

    from core.interfaces import RolloutContext
    from core.plugins.builtin.rollout import TransformersRollout

    engine = TransformersRollout.from_options({})
    engine.setup(RolloutContext(model=ctx.model, processor=ctx.processor, family=ctx.family,
                                device=torch.device("cpu"), suppressed_token_ids=suppressed))
    return engine


# ---- checks ------------------------------------------------------------------------------
def check_reload(ctx: ConformanceContext) -> None:
    """Saved checkpoint reloads through the Auto classes; the family claims it; seeds repeat."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    cfg = AutoConfig.from_pretrained(ctx.path)
    assert ctx.family_cls.handles(cfg.model_type), (
        f"{ctx.family_cls.name} does not handle its own tiny checkpoint's model_type {cfg.model_type!r}"
    )
    auto_model = AutoModelForImageTextToText.from_pretrained(ctx.path, dtype=torch.float32)
    assert type(auto_model) is type(ctx.model)
    auto_proc = AutoProcessor.from_pretrained(ctx.path)
    assert type(auto_proc) is type(ctx.processor)
    tok = getattr(ctx.processor, "tokenizer", ctx.processor)
    assert tok.padding_side == "left", "load_processor must left-pad for generation"
    assert tok.pad_token_id is not None and tok.eos_token_id is not None

    loaded = ctx.model.state_dict()
    assert loaded.keys() == auto_model.state_dict().keys()
    # Same seed -> same weights (a quickstart run is reproducible from its config alone).
    again = ctx.family_cls.build_tiny_checkpoint(ctx.path.parent / f"{ctx.path.name}-again", **ctx.tiny_options)
    rebuilt = AutoModelForImageTextToText.from_pretrained(again, dtype=torch.float32).state_dict()
    for name, tensor in auto_model.state_dict().items():
        assert torch.equal(tensor, loaded[name]), f"{name}: family.load_model differs from the Auto class"
        assert torch.equal(tensor, rebuilt[name]), f"{name}: tiny build is not deterministic for a fixed seed"


def check_generate(ctx: ConformanceContext) -> None:
    """0/1/2-image prompts render, process and sample; no suppressed token appears."""
    import torch

    from core.interfaces import SamplingParams

    prompts = _prompts(ctx)
    texts = [p.text for p in prompts]
    assert len(set(texts)) == 3 and all(texts), "prompts with 0, 1 and 2 images must render differently"
    image_id = _image_token_id(ctx.model)
    if image_id is not None:
        counts = []
        for p in prompts:
            ids = ctx.family.process(ctx.processor, [p.text], [p.images])["input_ids"]
            counts.append(int((ids == image_id).sum()))
        assert counts[0] == 0 < counts[1] < counts[2], f"image tokens per 0/1/2-image prompt: {counts}"

    suppressed = ctx.family.suppressed_token_ids(ctx.processor, ctx.model)
    assert image_id is None or image_id in suppressed, "the image placeholder id must be suppressed"
    torch.manual_seed(ctx.seed)
    groups = _rollout(ctx, suppressed).generate(
        prompts, SamplingParams(n=GROUP_SIZE, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0)
    )
    assert len(groups) == len(prompts) and all(len(g) == GROUP_SIZE for g in groups)
    bad = set(suppressed)
    for group in groups:
        for c in group:
            assert 0 < len(c.ids) <= MAX_NEW_TOKENS
            assert not bad.intersection(c.ids), f"suppressed token generated: {c.ids}"
            assert isinstance(c.text, str)


def check_suppression(ctx: ConformanceContext) -> None:
    """With suppressed ids boosted to be the argmax, the rollout still never emits one."""
    import torch

    from core.interfaces import SamplingParams

    suppressed = ctx.family.suppressed_token_ids(ctx.processor, ctx.model)
    assert suppressed, f"{ctx.family_cls.name}: suppressed_token_ids is empty"
    head = ctx.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[suppressed] = 50.0

    def boost(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output + bias.to(output.dtype)

    handle = head.register_forward_hook(boost)
    try:
        prompt = _prompts(ctx, (1,))[0]
        inputs = ctx.family.process(ctx.processor, [prompt.text], [prompt.images])
        with torch.no_grad():  # control: without suppression the boosted ids do win
            first = ctx.model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1].item()
        assert first in suppressed, "control failed: the boost did not make a suppressed id the argmax"
        torch.manual_seed(ctx.seed)
        groups = _rollout(ctx, suppressed).generate([prompt], SamplingParams(n=GROUP_SIZE, max_new_tokens=4))
    finally:
        handle.remove()
    for c in groups[0]:
        assert not set(suppressed).intersection(c.ids), f"suppressed token generated: {c.ids}"


def check_logprobs(ctx: ConformanceContext, atol: float = LOGPROB_ATOL) -> None:
    """Training-forward log-probabilities of sampled completions equal generation's."""
    import torch

    from core.grpo.logprobs import build_train_inputs, completion_logprobs, pad_completions
    from core.interfaces import eos_token_ids, split_completions

    model, proc, family = ctx.model, ctx.processor, ctx.family
    tok = getattr(proc, "tokenizer", proc)
    prompts = _prompts(ctx)
    inputs = family.process(proc, [p.text for p in prompts], [p.images for p in prompts])
    eos = eos_token_ids(model, proc)
    torch.manual_seed(ctx.seed)
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=GROUP_SIZE,
            max_new_tokens=MAX_NEW_TOKENS, suppress_tokens=family.suppressed_token_ids(proc, model),
            eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id,
            output_logits=True, return_dict_in_generate=True,
        )
    gen = out.sequences[:, inputs["input_ids"].shape[1]:]
    # Generation-time log-probabilities from the raw (unprocessed) logits of each step.
    raw = torch.stack(out.logits, dim=1).float().log_softmax(-1)
    rows = split_completions(gen, eos, tok.pad_token_id)
    ids, mask = pad_completions([r[0] for r in rows], tok.pad_token_id)
    gen_lp = raw[:, : ids.shape[1]].gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    # Training forward as the engine builds it: each prompt re-processed, once per completion.
    rep = family.process(proc, [p.text for p in prompts for _ in range(GROUP_SIZE)],
                         [p.images for p in prompts for _ in range(GROUP_SIZE)])
    train_inputs = build_train_inputs(rep, ids, mask, family.per_token_keys)
    with torch.no_grad():
        train_lp = completion_logprobs(model, train_inputs, ids.shape[1])
    m = mask.bool()
    assert m.sum() >= len(prompts) * GROUP_SIZE
    diff = (train_lp - gen_lp)[m].abs().max().item()
    assert diff <= atol, (
        f"{ctx.family_cls.name}: training-forward log-probs differ from generation's by {diff:.3g} "
        f"(> {atol}); are all multimodal position inputs in per_token_keys / the processor output?"
    )


def check_vision_modules(ctx: ConformanceContext) -> None:
    """Every vision module name exists and holds parameters; embeddings and LM head are not in it."""
    names = ctx.family.vision_module_names(ctx.model)
    assert names, f"{ctx.family_cls.name}: vision_module_names is empty"
    vision_params: set[int] = set()
    for name in names:
        module = ctx.model.get_submodule(name)  # raises AttributeError naming a missing module
        params = list(module.parameters())
        assert params, f"vision module {name!r} has no parameters"
        vision_params.update(id(p) for p in params)
    for lm in (ctx.model.get_input_embeddings(), ctx.model.get_output_embeddings()):
        assert not vision_params.intersection(id(p) for p in lm.parameters()), "vision modules include LM embeddings"
    total = sum(1 for _ in ctx.model.parameters())
    assert len(vision_params) < total, "vision modules cover the whole model"


def check_box_round_trip(ctx: ConformanceContext) -> None:
    """A box in original pixels, written in the family's convention, maps back exactly."""
    image = make_images(3)[2]  # 120 x 50: resized differently along each axis
    ow, oh = image.size
    rw, rh = ctx.family.resized_image_size(ctx.processor, image)
    assert rw > 0 and rh > 0
    box = [12.0, 5.0, 96.0, 40.0]
    conv = ctx.family.box_convention
    if conv == "normalized_1000":
        written = [box[0] / ow * 1000, box[1] / oh * 1000, box[2] / ow * 1000, box[3] / oh * 1000]
    elif conv == "absolute_resized":
        written = [box[0] * rw / ow, box[1] * rh / oh, box[2] * rw / ow, box[3] * rh / oh]
    else:  # absolute_original, unknown: identity
        written = list(box)
    back = ctx.family.box_to_original(written, (ow, oh), (rw, rh))
    assert all(abs(a - b) < 1e-6 for a, b in zip(back, box, strict=True)), (conv, written, back, box)


# ---- the prompt as the processor itself builds it --------------------------------------------
#: Image sizes of :func:`check_image_resize`: odd, prime, thin, and larger than any tiny bound.
RESIZE_PROBE_SIZES: tuple[tuple[int, int], ...] = ((97, 53), (53, 97), (13, 57), (61, 61), (333, 129), (31, 200))


def _round_trip_cases() -> list[tuple[str, list[dict[str, Any]], list[Image.Image]]]:
    """(label, messages, images): 0/1/2 images, and one image after a system turn."""
    cases = [(f"{k} image(s)", make_messages(k), make_images(k)) for k in (0, 1, 2)]
    system = [{"role": "system", "content": "You are a helpful assistant."}, *make_messages(1)]
    cases.append(("a system turn and 1 image", system, make_images(1)))
    return cases


def _family_inputs(ctx: ConformanceContext, messages: list[dict[str, Any]], images: list[Image.Image]) -> Any:
    """One prompt the engine's way: ``render_prompt`` then ``process`` (no padding: one row)."""
    return ctx.family.process(ctx.processor, [ctx.family.render_prompt(ctx.processor, messages)], [images])


def _reference_inputs(ctx: ConformanceContext, messages: list[dict[str, Any]], images: list[Image.Image]) -> Any:
    """The same prompt built by the processor's own ``apply_chat_template(tokenize=True)``.

    The images go into the image parts (``{"type": "image", "image": ...}``), the family's
    ``processor_call_kwargs`` to the processor call, as a user of transformers would write it.
    """
    it = iter(images)
    msgs = [{**m, "content": [{**p, "image": next(it)} if p.get("type") == "image" else p for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]
    try:
        return ctx.processor.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs=dict(ctx.family.processor_call_kwargs()))
    except Exception as exc:
        raise ConformanceError(f"{ctx.family_cls.name}: the processor's own apply_chat_template(tokenize=True) "
                               f"failed on the tiny checkpoint: {type(exc).__name__}: {exc}") from exc


def _tokenizer(ctx: ConformanceContext) -> Any:
    return getattr(ctx.processor, "tokenizer", ctx.processor)


def _special_ids(tok: Any) -> set[int]:
    """Ids of the tokenizer's special and added tokens (chat markers, image tokens ...)."""
    return set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})


def _row(inputs: Any) -> list[int]:
    ids = inputs["input_ids"]
    assert len(ids) == 1, "one prompt, one row"
    return [int(i) for i in ids[0]]


def image_structure_token_ids(ctx: ConformanceContext) -> set[int]:
    """Special tokens the *processor* writes for images: image pads, breaks, starts, ends.

    Found without asking the family: the special/added token ids of the processor's own 1- and
    2-image prompts that its 0-image prompt lacks.
    """
    special = _special_ids(_tokenizer(ctx))
    rows = {k: set(_row(_reference_inputs(ctx, make_messages(k), make_images(k)))) for k in (0, 1, 2)}
    return ((rows[1] | rows[2]) - rows[0]) & special


def _describe(tok: Any, ids: Any) -> str:
    return ", ".join(f"{tok.convert_ids_to_tokens(int(i))!r} ({int(i)})" for i in sorted(ids))


def check_special_tokens(ctx: ConformanceContext) -> None:
    """Exactly one BOS (where the checkpoint uses one) and no doubled special token in a prompt.

    Each 0/1/2-image prompt, rendered and processed by the family, must start with one BOS
    and hold no other if the processor's own chat-template output holds one, else hold none;
    and no special token may follow itself, except the processor's image structure tokens
    (``<|image_pad|>`` x N ...). A template that writes ``<s>`` which the tokenizer then adds
    again, or a marker written twice, silently shifts every prompt the model was trained on.
    """
    tok = _tokenizer(ctx)
    bos = tok.bos_token_id
    special = _special_ids(tok) - image_structure_token_ids(ctx)
    name = ctx.family_cls.name
    for label, messages, images in _round_trip_cases():
        row = _row(_family_inputs(ctx, messages, images))
        if bos is not None:
            want = min(1, _row(_reference_inputs(ctx, messages, images)).count(bos))
            got = row.count(bos)
            if got != want or (want and row[0] != bos):
                raise ConformanceError(
                    f"{name}: the prompt with {label} holds BOS {tok.bos_token!r} {got} time(s) "
                    f"(first token {tok.convert_ids_to_tokens(row[0])!r}); expected exactly {want}, first. "
                    "A chat template that writes BOS must be tokenised without add_special_tokens "
                    "(override process())")
        doubled = {a for a, b in zip(row, row[1:], strict=False) if a == b and a in special}
        if doubled:
            raise ConformanceError(f"{name}: the prompt with {label} repeats special token(s) "
                                   f"{_describe(tok, doubled)} back to back: "
                                   f"{tok.convert_ids_to_tokens(row)}")


def check_prompt_round_trip(ctx: ConformanceContext) -> None:
    """``render_prompt`` + ``process`` equal the processor's own ``apply_chat_template(tokenize=True)``.

    For 0/1/2-image prompts and one with a system turn: the same ``input_ids`` token for
    token, and every other output both produce (``pixel_values``, ``image_grid_thw``,
    ``mm_token_type_ids`` ...) equal. The engine trains on exactly the prompt the checkpoint's
    own template defines (the one a served model or a peer framework would build).
    """
    import torch

    tok = _tokenizer(ctx)
    name = ctx.family_cls.name
    for label, messages, images in _round_trip_cases():
        ours, ref = _family_inputs(ctx, messages, images), _reference_inputs(ctx, messages, images)
        a, b = _row(ours), _row(ref)
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            raise ConformanceError(
                f"{name}: the prompt with {label} tokenises differently from the processor's own chat template "
                f"({len(a)} vs {len(b)} tokens, first difference at token {at}):\n"
                f"  family:    {tok.convert_ids_to_tokens(a[max(0, at - 3): at + 5])}\n"
                f"  processor: {tok.convert_ids_to_tokens(b[max(0, at - 3): at + 5])}")
        for key in sorted(set(ours.keys()) & set(ref.keys()) - {"input_ids"}):
            x, y = ours[key], ref[key]
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and not (
                    x.shape == y.shape and torch.equal(x, y)):
                raise ConformanceError(f"{name}: for the prompt with {label}, processor output {key!r} differs from "
                                       "the processor's own chat-template call (other processor_call_kwargs?)")


def measured_resize(ctx: ConformanceContext, image: Image.Image) -> tuple[int, int] | None:
    """``(width, height)`` the processor really resized ``image`` to, read from its own output.

    ``image_grid_thw`` (patch grid) times the image processor's ``patch_size``, else the
    ``pixel_values`` of a single untiled image (``[1, C, H, W]``); ``None`` when neither tells
    (tiles, crops into several views).
    """
    inputs = _family_inputs(ctx, make_messages(1), [image])
    grid = inputs.get("image_grid_thw")
    patch = getattr(getattr(ctx.processor, "image_processor", None), "patch_size", None)
    if grid is not None and len(grid) == 1 and isinstance(patch, int):
        _, gh, gw = (int(v) for v in grid[0])
        return gw * patch, gh * patch
    pixels = inputs.get("pixel_values")
    if grid is None and pixels is not None and pixels.dim() == 4 and pixels.shape[0] == 1:
        return int(pixels.shape[-1]), int(pixels.shape[-2])
    return None


def check_image_resize(ctx: ConformanceContext) -> None:
    """``resized_image_size`` equals the processor's actual resize on odd image sizes.

    The actual size is measured from the processor's output (:func:`measured_resize`), never
    taken from the family. ``absolute_resized`` families (boxes in pixels of the resized image:
    every box is scaled by this size) must be measurable and exact; other conventions are
    compared where measurable; ``unknown`` is skipped (no box is mapped with it).
    """
    from PIL import Image

    name, conv = ctx.family_cls.name, ctx.family.box_convention
    if conv == "unknown":
        return
    for size in RESIZE_PROBE_SIZES:
        image = Image.new("RGB", size, (200, 40, 90))
        actual = measured_resize(ctx, image)
        if actual is None:
            if conv == "absolute_resized":
                raise ConformanceError(
                    f"{name}: box convention absolute_resized, but the processor's output for a {size} image "
                    "tells no resized size (no image_grid_thw, no single [1, C, H, W] pixel_values) to check "
                    "resized_image_size against")
            return
        claimed = tuple(ctx.family.resized_image_size(ctx.processor, image))
        if claimed != actual:
            raise ConformanceError(
                f"{name}: resized_image_size says a {size[0]}x{size[1]} image becomes {claimed[0]}x{claimed[1]}, "
                f"but the processor resized it to {actual[0]}x{actual[1]}; boxes in the {conv} convention would "
                "be mapped with the wrong scale")


def check_structure_suppressed(ctx: ConformanceContext) -> None:
    """Every image structure token the processor writes is in ``suppressed_token_ids``.

    The structure tokens are found from the processor's own output
    (:func:`image_structure_token_ids`): pads, and row breaks, image starts and ends too. A
    sampled one breaks the next forward (image features and tokens no longer match) or
    corrupts positions.
    """
    structure = image_structure_token_ids(ctx)
    if not structure:
        raise ConformanceError(f"{ctx.family_cls.name}: the processor writes no special token for an image; "
                               "cannot check suppression")
    missing = structure - set(ctx.family.suppressed_token_ids(ctx.processor, ctx.model))
    if missing:
        raise ConformanceError(
            f"{ctx.family_cls.name}: image structure token(s) {_describe(_tokenizer(ctx), missing)} are written by "
            "the processor but not in suppressed_token_ids(); add them to the family's suppressed_tokens")


def check_grpo_step_changes_weights(ctx: ConformanceContext) -> None:
    """One real GRPO step (``core.grpo.trainer.run``) changes the weights; the result reloads.

    The run goes through the whole engine as ``python -m core.train`` does (plan, rollout,
    rewards, advantages, loss, optimizer step, checkpoint), in this process, on a throw-away
    plugin host holding only core's built-ins, the family under test and two components
    defined here: a one-image colour task and a reward that varies with the completion text
    (a random policy rarely emits EOS within a few tokens, so a length reward would be
    constant and give zero advantages). ``beta`` is 0, so no reference model is loaded.

    Asserts: the step's rewards had non-zero spread; the final checkpoint reloads with plain
    ``transformers.AutoModelForImageTextToText.from_pretrained`` into the same class with the
    same parameter names; some language-model weight *and* some vision-tower weight differ
    from the initial checkpoint (the image reached the training forward); every tensor is finite.
    """
    import json
    import tempfile

    import torch
    from transformers import AutoModelForImageTextToText

    from core.config import build_config
    from core.grpo.trainer import run
    from core.interfaces import Reward, RewardBatch, Sample, TaskFormat
    from core.plugins import PluginHost
    from core.plugins.plan import make_plan
    from core.testing import ComponentsPlugin

    class _ConformanceColorTask(TaskFormat):
        """Four one-image prompts asking for the colour of a solid image."""

        name = "conformance_color"

        def load(self, split: str = "train") -> list[Sample]:
            names = ("red", "green", "blue")
            return [Sample(id=f"c{i}", images=[make_images(3)[i % 3]], messages=make_messages(1),
                           solution=names[i % 3]) for i in range(4)]

        def splits(self) -> tuple[str, ...]:
            return ("train",)

    class _ConformanceTextReward(Reward):
        """A deterministic score in [0, 1) that differs between different completions."""

        name = "conformance_text"

        def score(self, batch: RewardBatch) -> list[float | None]:
            return [(sum(map(ord, it.completion)) + 7 * it.completion_length) % 101 / 101 for it in batch]

    host = PluginHost(autoload=False, strict=True)
    host.register(ComponentsPlugin(ctx.family_cls, _ConformanceColorTask, _ConformanceTextReward),
                  "vlmr1-conformance")
    with tempfile.TemporaryDirectory(prefix="vlmr1-grpo-step-") as tmp:
        out = Path(tmp) / "out"
        raw = {
            "model": {"path": str(ctx.path), "family": ctx.family_cls.name, "dtype": "float32",
                      "options": ctx.family.options.model_dump(mode="json")},
            "task": {"name": "conformance_color"},
            "rewards": [{"name": "conformance_text"}],
            "grpo": {"num_generations": 4, "max_completion_length": MAX_NEW_TOKENS, "beta": 0.0},
            "train": {"learning_rate": 1e-3, "per_device_batch_size": 8, "max_steps": 1, "seed": ctx.seed},
            "device": {"name": "cpu"},
            "logging": {"output_dir": str(out), "tensorboard": False, "progress_bar": False, "plot": False,
                        "log_completions_every": 0},
            "eval": {"enabled": False},
        }
        plan = make_plan(build_config(raw, source="conformance"), host.registry)
        assert run(plan, host.registry) == 0, "core.grpo.trainer.run returned non-zero"
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1], rows
        assert rows[0]["reward_std"] > 0, f"the rewards of the step had no spread: {rows[0]}"
        ckpt = out / "checkpoint-1"
        trained = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
        assert type(trained) is type(ctx.model), f"reloaded as {type(trained).__name__}"
        before, after = ctx.model.state_dict(), trained.state_dict()
        assert before.keys() == after.keys(), "the trained checkpoint's parameter names differ"
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        bad = [k for k, t in after.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, f"non-finite weights after one GRPO step: {bad[:5]}"
    vision = ctx.family.vision_module_names(ctx.model)

    def in_vision(key: str) -> bool:
        return any(key == v or key.startswith(v + ".") for v in vision)

    assert any(not in_vision(k) for k in changed), f"{ctx.family_cls.name}: no language-model weight changed"
    assert any(in_vision(k) for k in changed), (
        f"{ctx.family_cls.name}: no vision weight changed in one GRPO step on image prompts; "
        "do pixel values reach the training forward?")


#: name -> check. Plugin tests parametrise over this.
# ---- the shared-prefix training forward ------------------------------------------------------
#: Tolerances of :func:`check_shared_prefix` (float32 on CPU; observed ~1e-6 on every family).
SHARED_LOGPROB_ATOL = 1e-5
SHARED_GRAD_RTOL = 1e-4


def check_shared_prefix(ctx: Any, group_size: int = 3) -> None:
    """The shared-prefix forwards equal the plain one, with images encoded once.

    For a family with ``prefix_sharing`` on, three prompts (0, 1 and 2 images) with
    ``group_size`` completions each (different lengths, so padding is exercised) go through
    the plain path (``[prompt, completion]`` rows, prompts processed per completion), the
    packed path and, where :func:`~core.grpo.prefix.can_cache_prefix` holds, the cached-prefix
    path (:mod:`core.grpo.prefix`). Asserts, for each: per-token log-probs equal within
    ``SHARED_LOGPROB_ATOL``; every parameter gradient of the summed log-probs within
    ``SHARED_GRAD_RTOL`` of the largest gradient; the vision tower receives exactly one
    group's worth of pixels (``1 / group_size`` of the plain path's: each unique image
    once). A family that has not opted in must fall back (``can_share_prefix`` is false).
    """
    import torch

    from core.grpo.logprobs import build_train_inputs, completion_logprobs, pad_completions
    from core.grpo.prefix import (
        cached_logprobs,
        can_cache_prefix,
        can_share_prefix,
        pack,
        packed_logprobs,
        prepare_cached,
    )

    model, proc, family = ctx.model, ctx.processor, ctx.family
    name = ctx.family_cls.name
    if not family.prefix_sharing:
        if can_share_prefix(family, model):
            raise ConformanceError(f"{name}: prefix_sharing is off but can_share_prefix() is true")
        return
    if not can_share_prefix(family, model):
        raise ConformanceError(f"{name}: prefix_sharing is on but the tiny model's attention "
                               f"({model.config._attn_implementation!r}) cannot take a block-causal mask")
    tok = getattr(proc, "tokenizer", proc)
    words = tok.encode(" red green blue yellow the answer is", add_special_tokens=False)
    prompts = _prompts(ctx)
    rows = [p for p in prompts for _ in range(group_size)]
    comps = [[words[(r + i) % len(words)] for i in range(3 + 2 * (r % group_size))] for r in range(len(rows))]
    ids, mask = pad_completions(comps, tok.pad_token_id)
    tower = model.get_submodule(family.vision_module_names(model)[0])
    pixels = [0]

    def count(_m: Any, args: Any, kwargs: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        pixels[0] += x.numel() if isinstance(x, torch.Tensor) else 0

    def run(fn: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        pixels[0] = 0
        model.zero_grad(set_to_none=True)
        lp = fn()
        (lp * mask).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return lp.detach(), grads, pixels[0]

    def plain() -> torch.Tensor:
        rep = family.process(proc, [p.text for p in rows], [p.images for p in rows])
        return completion_logprobs(model, build_train_inputs(rep, ids, mask, family.per_token_keys), ids.shape[1])

    handle = tower.register_forward_pre_hook(count, with_kwargs=True)
    try:
        lp_plain, g_plain, px_plain = run(plain)
        packed = pack(family, model, proc, rows, ids, force=True)
        results = {"packed": run(lambda: packed_logprobs(model, packed))}
        if can_cache_prefix(family, model):
            cached = prepare_cached(family, model, proc, rows, ids)
            results["cached"] = run(lambda: cached_logprobs(model, cached))
    finally:
        handle.remove()
    m = mask.bool()
    for how, (lp_shared, g_shared, px_shared) in results.items():
        diff = (lp_plain - lp_shared)[m].abs().max().item()
        if diff > SHARED_LOGPROB_ATOL:
            raise ConformanceError(f"{name}: {how} shared-prefix log-probs differ from the plain path by {diff:.3g} "
                                   f"(> {SHARED_LOGPROB_ATOL}); are prompt_positions() right for this model?")
        if g_plain.keys() != g_shared.keys():
            raise ConformanceError(f"{name}: the {how} shared-prefix path reaches other parameters: "
                                   f"{sorted(g_plain.keys() ^ g_shared.keys())[:5]}")
        scale = max(g.abs().max().item() for g in g_plain.values())
        worst = max(g_plain, key=lambda n: (g_plain[n] - g_shared[n]).abs().max().item())  # noqa: B023
        gdiff = (g_plain[worst] - g_shared[worst]).abs().max().item()
        if gdiff > SHARED_GRAD_RTOL * scale:
            raise ConformanceError(f"{name}: {how} shared-prefix gradient of {worst} differs by {gdiff:.3g} "
                                   f"(largest gradient {scale:.3g})")
        if px_plain == 0 or px_shared * group_size != px_plain:
            raise ConformanceError(f"{name}: the vision tower got {px_shared} pixel values in the {how} path and "
                                   f"{px_plain} in the plain one; expected each unique image once (1/{group_size})")


# ---- shared prefill in generation ----------------------------------------------------------
#: Tolerance of :func:`check_shared_prefill` on per-step logits (float32 on CPU; observed 0 to ~2e-7).
SHARED_PREFILL_LOGIT_ATOL = 1e-5


def check_shared_prefill(ctx: Any, group_size: int = 3, max_new_tokens: int = 8) -> None:
    """Generation with each prompt prefilled once equals the plain ``num_return_sequences`` path.

    For a family with ``shared_prefill`` on, three left-padded prompts (0, 1 and 2 images, so
    of different lengths) sample ``group_size`` completions each with the same seed, once with
    ``model.generate(num_return_sequences=...)`` and once with
    :func:`core.plugins.builtin.prefill.shared_prefill_generate` (image tokens suppressed, as the rollout
    does). Asserts: the same sequences (same sampled tokens); every step's raw logits within
    ``SHARED_PREFILL_LOGIT_ATOL``; the language model's first call takes the unique prompts
    minus their last token (``[3, L-1]``: each prompt prefilled once) and every later call one
    token per row (``[3*group_size, 1]``); the vision tower gets exactly the pixels of one
    forward of the unique prompts (each unique image once). Then the built-in rollout with
    ``shared_prefill`` on and off returns the same completions for the same seed. A family that
    has not opted in must fall back (``can_share_prefill`` is false).
    """
    import torch

    from core.interfaces import eos_token_ids
    from core.plugins.builtin.prefill import can_share_prefill, shared_prefill_generate
    from core.plugins.builtin.rollout import TransformersRollout

    model, proc, family = ctx.model, ctx.processor, ctx.family
    name = ctx.family_cls.name
    prompts = _prompts(ctx)
    inputs = family.process(proc, [p.text for p in prompts], [p.images for p in prompts])
    tok = getattr(proc, "tokenizer", proc)
    suppressed = family.suppressed_token_ids(proc, model)
    kw: dict[str, Any] = dict(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        suppress_tokens=suppressed, eos_token_id=sorted(eos_token_ids(model, proc)),
        pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True,
    )
    if not family.shared_prefill:
        if can_share_prefill(family, model, kw, inputs):
            raise ConformanceError(f"{name}: shared_prefill is off but can_share_prefill() is true")
        return
    if not can_share_prefill(family, model, kw, inputs):
        raise ConformanceError(f"{name}: shared_prefill is on but can_share_prefill() is false for the tiny model "
                               f"{type(model).__name__} and 0/1/2-image prompts")
    pad = inputs["attention_mask"].sum(1)
    if len(set(pad.tolist())) < 2:
        raise ConformanceError(f"{name}: the 0/1/2-image prompts have equal lengths; left padding is not exercised")

    tower = model.get_submodule(family.vision_module_names(model)[0])
    pixels = [0]
    lm_calls: list[tuple[int, ...]] = []

    def count_pixels(_m: Any, args: Any, kwargs: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        pixels[0] += x.numel() if isinstance(x, torch.Tensor) else 0

    def count_tokens(_m: Any, args: Any, _out: Any) -> None:
        lm_calls.append(tuple(args[0].shape))

    def run(fn: Any) -> tuple[Any, int, list[tuple[int, ...]]]:
        pixels[0] = 0
        lm_calls.clear()
        torch.manual_seed(ctx.seed)
        with torch.no_grad():
            out = fn()
        return out, pixels[0], list(lm_calls)

    was_training = model.training
    model.eval()
    hooks = [tower.register_forward_pre_hook(count_pixels, with_kwargs=True),
             model.get_input_embeddings().register_forward_hook(count_tokens)]
    try:
        _, px_once, _ = run(lambda: model(**inputs))
        plain, _, _ = run(lambda: model.generate(**inputs, num_return_sequences=group_size, **kw))
        shared, px_shared, calls = run(lambda: shared_prefill_generate(model, family, inputs, group_size, **kw))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not torch.equal(plain.sequences, shared.sequences):
        raise ConformanceError(f"{name}: shared-prefill generation sampled other tokens than the plain path:\n"
                               f"{plain.sequences.tolist()}\nvs\n{shared.sequences.tolist()}")
    diff = max((a - b).abs().max().item() for a, b in zip(plain.logits, shared.logits, strict=True))
    if diff > SHARED_PREFILL_LOGIT_ATOL:
        raise ConformanceError(f"{name}: shared-prefill logits differ from the plain path by {diff:.3g} "
                               f"(> {SHARED_PREFILL_LOGIT_ATOL}); are the continued positions right?")
    B, L = inputs["input_ids"].shape
    rows = B * group_size
    if not calls or calls[0] != (B, L - 1) or any(c != (rows, 1) for c in calls[1:]):
        raise ConformanceError(f"{name}: language-model calls {calls[:3]}…; expected one prefill of the unique "
                               f"prompts {(B, L - 1)} then one token per row {(rows, 1)}")
    if px_once == 0 or px_shared != px_once:
        raise ConformanceError(f"{name}: the vision tower got {px_shared} pixel values in shared-prefill generation, "
                               f"{px_once} in one forward of the unique prompts; expected each unique image once")

    # The engine: same seed, same completions with the option on and off (suppression on).
    def rollout(on: bool) -> list[list[list[int]]]:
        engine = TransformersRollout.from_options({"shared_prefill": on})
        engine.setup(RolloutContext(model=model, processor=proc, family=family, device=torch.device("cpu"),
                                    suppressed_token_ids=suppressed))
        torch.manual_seed(ctx.seed)
        groups = engine.generate(prompts, SamplingParams(n=group_size, max_new_tokens=max_new_tokens))
        return [[c.ids for c in g] for g in groups]

    if rollout(True) != rollout(False):
        raise ConformanceError(f"{name}: TransformersRollout samples differently with shared_prefill on and off")


# ---- compact decoding in generation --------------------------------------------------------
#: Tolerance of :func:`check_compact_decode` on log-probabilities (float32 on CPU; the teacher-forced
#: forward recomputes the whole sequence, as :data:`LOGPROB_ATOL`).
COMPACT_LOGPROB_ATOL = 1e-4


def eos_bias_hook(model: Any, eos: list[int], const: float, trigger: int | None = None, big: float = 100.0) -> Any:
    """Hook adding ``const`` to the EOS logits, and ``big`` where the input token is ``trigger``.

    Depends only on the tokens, never on a row's place in the batch, so the distribution is the
    same in ``generate``, the compacting loop and a teacher-forced forward: it only makes rows
    finish early, at different steps. Returns the hook handle.
    """
    import torch

    def hook(_m: Any, args: Any, kwargs: Any, out: Any) -> None:
        logits = out.logits
        add = torch.full(logits.shape[:2], const, dtype=logits.dtype, device=logits.device)
        if trigger is not None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            add += big * (ids[:, -logits.shape[1]:] == trigger).to(logits.dtype)
        logits[..., eos] += add[..., None]

    return model.register_forward_hook(hook, with_kwargs=True)


def check_compact_decode(ctx: Any, group_size: int = 3, max_new_tokens: int = 12) -> None:
    """The decode loop that drops finished rows samples as ``generate`` does.

    For a family with ``compact_decode`` on, on three left-padded prompts (0, 1 and 2 images),
    :func:`core.plugins.builtin.decode.compact_decode` against ``model.generate`` continuing from the
    same shared prefill (so only the decode steps differ; image tokens suppressed, as the rollout does):

    (a) greedy, with the EOS logit boosted after a token some rows generate and others do not
        (so rows finish at different steps and are dropped): exactly generate's tokens, and
        the recorded log-probs equal generate's (:class:`SampledLogprobs`);
    (b) sampling (temperature, top-k, top-p) with EOS suppressed, so no row finishes and none is
        dropped: the same tokens as generate for the same seed, and the same log-probs;
    (c) sampling with the EOS logit boosted so rows finish early: rows really leave the batch
        (the language model sees fewer rows), and every sampled token's recorded log-prob equals
        the one a teacher-forced forward of prompt + completion gives it after the same
        processors and warpers, within ``COMPACT_LOGPROB_ATOL``. Compaction changes how many
        random numbers each step draws, so the tokens cannot equal generate's; this is what
        sampling from the same distribution means: each token drawn from the model's own
        conditional distribution given its prefix;
    (d) the built-in rollout returns the same greedy completions and log-probs with
        ``compact_decode`` on and off.

    A family that has not opted in must fall back (``can_compact_decode`` is false); one that
    has must pass with ``n > 1`` rows per prompt (which needs ``shared_prefill`` too).
    """
    import torch
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    from core.grpo.logprobs import build_train_inputs, pad_completions
    from core.interfaces import eos_token_ids, split_completions
    from core.plugins.builtin.decode import can_compact_decode, compact_decode
    from core.plugins.builtin.prefill import shared_prefill_generate
    from core.plugins.builtin.rollout import SampledLogprobs, TransformersRollout, generate_kwargs

    model, proc, family = ctx.model, ctx.processor, ctx.family
    name = ctx.family_cls.name
    prompts = _prompts(ctx)
    inputs = family.process(proc, [p.text for p in prompts], [p.images for p in prompts])
    tok = getattr(proc, "tokenizer", proc)
    suppressed = family.suppressed_token_ids(proc, model)
    eos_set = eos_token_ids(model, proc)
    eos = sorted(eos_set)
    greedy = SamplingParams(n=1, max_new_tokens=max_new_tokens, do_sample=False)
    sampling = SamplingParams(n=group_size, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, top_p=0.95)
    kw_greedy = generate_kwargs(greedy, tok.pad_token_id, eos_set, suppressed)
    kw_sample = generate_kwargs(sampling, tok.pad_token_id, eos_set, suppressed)
    if not family.compact_decode:
        if can_compact_decode(family, model, kw_sample, inputs, group_size):
            raise ConformanceError(f"{name}: compact_decode is off but can_compact_decode() is true")
        return
    for kw, n in ((kw_greedy, 1), (kw_sample, group_size)):
        if not can_compact_decode(family, model, kw, inputs, n):
            raise ConformanceError(f"{name}: compact_decode is on but can_compact_decode() is false for the tiny "
                                   f"model {type(model).__name__}, 0/1/2-image prompts and n={n} (with n > 1 the "
                                   "loop continues from the shared prefill: is shared_prefill on?)")
    if len(set(inputs["attention_mask"].sum(1).tolist())) < 2:
        raise ConformanceError(f"{name}: the 0/1/2-image prompts have equal lengths; left padding is not exercised")

    rows_seen: list[int] = []

    def count_rows(_m: Any, args: Any, _out: Any) -> None:
        rows_seen.append(args[0].shape[0])

    def run(fn: Any) -> Any:
        rows_seen.clear()
        torch.manual_seed(ctx.seed)
        with torch.no_grad():
            return fn()

    def by_generate(kw: dict[str, Any], s: SamplingParams, n: int) -> tuple[Any, Any]:
        # generate continuing from the same shared prefill as the loop (the shared_prefill check
        # compares that with plain generate): only the decode steps differ, so the comparison is
        # exact. Against plain generate the prefill's batch differs (B*n rows, not B), its float
        # rounding too, and a mixture-of-experts router can flip on such a near-tie (observed:
        # GLM-4V-MoE, one position off by 0.02 at 2 threads).
        rec = SampledLogprobs.for_sampling(s)
        out = shared_prefill_generate(model, family, inputs, n, logits_processor=LogitsProcessorList([rec]), **kw)
        gen = out[:, inputs["input_ids"].shape[1]:]
        return gen, rec.result(gen)

    def close(a: Any, b: Any, gen: Any) -> float:
        # Positions up to each row's EOS (generate records the pad tokens after it too).
        m = torch.zeros_like(gen, dtype=torch.bool)
        for r, (ids, _) in enumerate(split_completions(gen, eos_set, tok.pad_token_id)):
            m[r, :len(ids)] = True
        return (a - b)[m].abs().max().item()

    was_training = model.training
    model.eval()
    embed_hook = model.get_input_embeddings().register_forward_hook(count_rows)
    try:
        # (a) greedy; the trigger token is one that appears in some rows' greedy completions only.
        plain = run(lambda: model.generate(**inputs, **kw_greedy))[:, inputs["input_ids"].shape[1]:].tolist()
        trigger = next((x for row in plain for x in row if any(x not in other for other in plain)), None)
        handle = eos_bias_hook(model, eos, 0.0, trigger)
        try:
            gen, gen_lp = run(lambda: by_generate(kw_greedy, greedy, 1))
            loop = run(lambda: compact_decode(model, family, inputs, 1, **kw_greedy))
        finally:
            handle.remove()
        if not torch.equal(gen, loop.tokens):
            raise ConformanceError(f"{name}: greedy compact decoding returned other tokens than generate:\n"
                                   f"{gen.tolist()}\nvs\n{loop.tokens.tolist()}")
        if (diff := close(gen_lp, loop.logprobs, gen)) > COMPACT_LOGPROB_ATOL:
            raise ConformanceError(f"{name}: greedy compact-decoding log-probs differ from generate's by {diff:.3g}")

        # (b) sampling, no row can finish: the same random stream, so the same tokens.
        kw_no_eos = {**kw_sample, "suppress_tokens": [*suppressed, *eos]}
        gen, gen_lp = run(lambda: by_generate(kw_no_eos, sampling, group_size))
        loop = run(lambda: compact_decode(model, family, inputs, group_size, **kw_no_eos))
        if not torch.equal(gen, loop.tokens):
            raise ConformanceError(f"{name}: compact decoding sampled other tokens than generate with no row "
                                   f"finished:\n{gen.tolist()}\nvs\n{loop.tokens.tolist()}")
        if (diff := close(gen_lp, loop.logprobs, gen)) > COMPACT_LOGPROB_ATOL:
            raise ConformanceError(f"{name}: compact-decoding log-probs differ from generate's by {diff:.3g}")

        # (c) sampling with rows finishing early: each token from the model's own distribution.
        handle = eos_bias_hook(model, eos, 1.5)
        try:
            loop = run(lambda: compact_decode(model, family, inputs, group_size, **kw_sample))
            seen = list(rows_seen)
            rows = split_completions(loop.tokens, eos_set, tok.pad_token_id)
            ids, mask = pad_completions([r[0] for r in rows], tok.pad_token_id)
            rep = family.process(proc, [p.text for p in prompts for _ in range(group_size)],
                                 [p.images for p in prompts for _ in range(group_size)])
            train = build_train_inputs(rep, ids, mask, family.per_token_keys)
            t = ids.shape[1]
            with torch.no_grad():
                logits = model(**train, logits_to_keep=t + 1, use_cache=False).logits[:, :-1].float()
        finally:
            handle.remove()
    finally:
        embed_hook.remove()
        model.train(was_training)
    total = len(prompts) * group_size
    if not any(0 < c < total for c in seen[1:]):
        raise ConformanceError(f"{name}: no row left the batch in compact decoding (rows per call: {seen})")
    if len({len(r[0]) for r in rows}) < 2:
        raise ConformanceError(f"{name}: every row finished at the same step; compaction is not exercised")
    procs = [SuppressTokensLogitsProcessor(suppressed), *SampledLogprobs.for_sampling(sampling).warpers]
    forced = torch.empty(ids.shape)
    for step in range(t):
        scores = logits[:, step]
        for p in procs:
            scores = p(ids[:, :step], scores)
        forced[:, step] = scores.log_softmax(-1).gather(1, ids[:, step:step + 1]).squeeze(1)
    m = mask.bool()
    diff = (forced - loop.logprobs[:, :t])[m].abs().max().item()
    if diff > COMPACT_LOGPROB_ATOL:
        raise ConformanceError(f"{name}: compact decoding recorded log-probs {diff:.3g} away from a teacher-forced "
                               f"forward's (> {COMPACT_LOGPROB_ATOL}): were tokens sampled from another distribution "
                               "(positions, cache rows or mask of the kept rows)?")

    # (d) The engine: greedy completions and log-probs with the option on and off.
    def rollout(on: bool) -> list[Any]:
        engine = TransformersRollout.from_options({"compact_decode": on})
        engine.setup(RolloutContext(model=model, processor=proc, family=family, device=torch.device("cpu"),
                                    suppressed_token_ids=suppressed))
        return [c for g in engine.generate(prompts, SamplingParams(n=2, max_new_tokens=max_new_tokens,
                                                                   do_sample=False)) for c in g]

    on, off = rollout(True), rollout(False)
    if [c.ids for c in on] != [c.ids for c in off]:
        raise ConformanceError(f"{name}: TransformersRollout decodes greedily differently with compact_decode on/off")
    lp_diff = max(abs(a - b) for x, y in zip(on, off, strict=True) for a, b in zip(x.logprobs, y.logprobs, strict=True))
    if lp_diff > COMPACT_LOGPROB_ATOL:
        raise ConformanceError(f"{name}: greedy Completion.logprobs differ by {lp_diff:.3g} with compact_decode on/off")


CONFORMANCE_CHECKS: dict[str, Callable[[ConformanceContext], None]] = {
    "reload": check_reload,
    "generate": check_generate,
    "suppression": check_suppression,
    "logprobs": check_logprobs,
    "vision_modules": check_vision_modules,
    "box_round_trip": check_box_round_trip,
    "special_tokens": check_special_tokens,
    "prompt_round_trip": check_prompt_round_trip,
    "image_resize": check_image_resize,
    "structure_suppressed": check_structure_suppressed,
    "grpo_step": check_grpo_step_changes_weights,
    "shared_prefix": check_shared_prefix,
    "shared_prefill": check_shared_prefill,
    "compact_decode": check_compact_decode,
}


def run_model_family_conformance(
    family_cls: type[ModelFamily],
    tmp_path: str | Path,
    *,
    family_options: Mapping[str, Any] | None = None,
    checks: list[str] | None = None,
    **tiny_options: Any,
) -> ConformanceContext:
    """Build the tiny checkpoint and run ``checks`` (default: all); returns the context."""
    ctx = build_conformance_context(family_cls, tmp_path, family_options=family_options, **tiny_options)
    for name in checks or list(CONFORMANCE_CHECKS):
        CONFORMANCE_CHECKS[name](ctx)
    return ctx
