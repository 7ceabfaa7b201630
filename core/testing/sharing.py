"""Model-family checks that sharing work across a group changes nothing but the cost.

Two engine paths run a group's prompt and images once instead of G times, and a family opts
in to each only once its check here passes on its tiny build (both are registered in
:data:`core.testing.models.CONFORMANCE_CHECKS`):

* ``shared_prefix`` (:func:`check_shared_prefix`): the packed training forward of
  :mod:`core.grpo.prefix` against plain ``[prompt, completion]`` rows;
* ``shared_prefill`` (:func:`check_shared_prefill`): generation with each prompt prefilled
  once (:mod:`core.plugins.builtin.prefill`) against ``num_return_sequences``.
"""

from __future__ import annotations

from typing import Any

from core.interfaces import RolloutContext, SamplingParams
from core.testing.conformance import ConformanceError

# ---- the shared-prefix training forward ------------------------------------------------------
#: Tolerances of :func:`check_shared_prefix` (float32 on CPU; observed ~1e-6 on every family).
SHARED_LOGPROB_ATOL = 1e-5
SHARED_GRAD_RTOL = 1e-4


def check_shared_prefix(ctx: Any, group_size: int = 3) -> None:
    """The packed shared-prefix forward equals the plain one, with images encoded once.

    For a family with ``prefix_sharing`` on, three prompts (0, 1 and 2 images) with
    ``group_size`` completions each (different lengths, so padding is exercised) go through
    the plain path (``[prompt, completion]`` rows, prompts processed per completion) and the
    packed path (:mod:`core.grpo.prefix`). Asserts: per-token log-probs equal within
    ``SHARED_LOGPROB_ATOL``; every parameter gradient of the summed log-probs within
    ``SHARED_GRAD_RTOL`` of the largest gradient; the vision tower receives exactly one
    group's worth of pixels (``1 / group_size`` of the plain path's: each unique image
    once). A family that has not opted in must fall back (``can_share_prefix`` is false).
    """
    import torch

    from core.grpo.logprobs import build_train_inputs, completion_logprobs, pad_completions
    from core.grpo.prefix import can_share_prefix, pack, packed_logprobs
    from core.testing.models import _prompts

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
        lp_shared, g_shared, px_shared = run(lambda: packed_logprobs(model, packed))
    finally:
        handle.remove()
    m = mask.bool()
    diff = (lp_plain - lp_shared)[m].abs().max().item()
    if diff > SHARED_LOGPROB_ATOL:
        raise ConformanceError(f"{name}: shared-prefix log-probs differ from the plain path by {diff:.3g} "
                               f"(> {SHARED_LOGPROB_ATOL}); are prompt_positions() right for this model?")
    if g_plain.keys() != g_shared.keys():
        raise ConformanceError(f"{name}: the shared-prefix path reaches other parameters: "
                               f"{sorted(g_plain.keys() ^ g_shared.keys())[:5]}")
    scale = max(g.abs().max().item() for g in g_plain.values())
    worst = max(g_plain, key=lambda n: (g_plain[n] - g_shared[n]).abs().max().item())
    gdiff = (g_plain[worst] - g_shared[worst]).abs().max().item()
    if gdiff > SHARED_GRAD_RTOL * scale:
        raise ConformanceError(f"{name}: shared-prefix gradient of {worst} differs by {gdiff:.3g} "
                               f"(largest gradient {scale:.3g})")
    if px_plain == 0 or px_shared * group_size != px_plain:
        raise ConformanceError(f"{name}: the vision tower got {px_shared} pixel values in the shared path and "
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

    from core.plugins.builtin.prefill import can_share_prefill, shared_prefill_generate
    from core.plugins.builtin.rollout import TransformersRollout, eos_token_ids
    from core.testing.models import _prompts

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
