"""Shared prefill for the built-in rollout: each unique prompt prefilled once, its KV cache repeated n times.

``model.generate(**inputs, num_return_sequences=n)`` repeats every prompt row n times *before*
the first forward, so the language model prefills each prompt (image tokens included) n
times. Here, for B unique left-padded prompts of length L and n samples per prompt::

    1. positions: computed for the B unique prompts exactly as ``generate`` computes them
       (``_prepare_position_ids_for_generation``: pad-aware 1-D positions, or multimodal
       RoPE ``[axes, B, L]``) -- the plain path computes the same B rows and repeats them.
    2. prefill: one forward over tokens 0 .. L-2 of the B prompts with their images,
       filling a KV cache of B rows (the last prompt token is left out on purpose:
       ``generate`` must run at least one uncached token to produce the first logits).
    3. expand: cache rows repeated n times (``Cache.batch_repeat_interleave``), and
       ``input_ids`` / ``attention_mask`` / per-token keys / positions repeated n times.
    4. decode: ``generate`` continues from the cache on the B*n rows: its first step runs
       only the last prompt token, then decodes as usual. Images are not passed again.

Token positions through the language model per call: ``B*(L-1) + B*n`` for the prompt instead
of ``B*n*L``; decoding is unchanged. The sequences, and the per-step logits up to float
rounding, equal the plain path's, and sampling consumes the same random numbers, so the
same seed samples the same tokens (checked per family by the ``shared_prefill`` conformance
check). The returned sequences start with the full prompt, as ``generate``'s do, so logits
processors that read the prompt (``prefix_allowed_tokens_fn`` offsets, repetition penalty)
see the same ``input_ids`` as on the plain path.

Applies to families that opt in (``ModelFamily.shared_prefill``) and models whose generate
supports continuing from a dynamic cache; :func:`can_share_prefill` says where it does not
(the rollout then keeps the plain path).
"""

from __future__ import annotations

import inspect
from typing import Any

from core.interfaces import ModelFamily

#: Keys aligned with ``input_ids`` that are always repeated (with the family's per-token keys).
_TOKEN_KEYS = ("input_ids", "attention_mask")


def _forward_params(model: Any) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def hf_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper, else ``model`` itself.

    LoRA layers are injected into the base model in place, so its own ``forward`` and
    ``generate`` run with the adapters active.
    """
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def can_share_prefill(
    family: ModelFamily, model: Any, gen_kwargs: dict[str, Any] | None = None, inputs: Any = None
) -> bool:
    """Whether :func:`shared_prefill_generate` applies to this family, model, generate call and batch.

    Needs: the family opted in, and :func:`can_continue_from_cache`.
    """
    return bool(getattr(family, "shared_prefill", False)) and can_continue_from_cache(family, model, gen_kwargs, inputs)


def can_continue_from_cache(
    family: ModelFamily, model: Any, gen_kwargs: dict[str, Any] | None = None, inputs: Any = None
) -> bool:
    """Whether decoding may continue from :func:`prefill_cache`'s cache, whatever the family opted into.

    Needs: the model computes generation positions the standard way
    (``_prepare_position_ids_for_generation``) and takes ``position_ids`` and a cache; no
    static/quantised cache implementation requested (generate refuses a given cache together
    with ``cache_implementation``); no beam search. With ``inputs``: prompts of at least 2
    tokens whose last token is text (a non-zero per-token type marks an image/video token,
    which could not be left out of the prefill).
    """
    model = hf_model(model)
    if inputs is not None:
        if inputs["input_ids"].shape[1] < 2:
            return False
        for key in family.per_token_keys:
            types = inputs.get(key)
            if types is not None and bool(types[:, -1].any()):
                return False
    if not callable(getattr(model, "_prepare_position_ids_for_generation", None)):
        return False
    params = _forward_params(model)
    if "position_ids" not in params or not ({"cache", "past_key_values"} & params):
        return False
    kw = gen_kwargs or {}
    gen_cfg = getattr(model, "generation_config", None)
    impl = kw.get("cache_implementation", getattr(gen_cfg, "cache_implementation", None))
    beams = kw.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1
    return impl in (None, "dynamic") and beams == 1 and kw.get("use_cache", True) is not False


def shared_prefill_generate(model: Any, family: ModelFamily, inputs: Any, n: int, **gen_kwargs: Any) -> Any:
    """``model.generate(**inputs, num_return_sequences=n, **gen_kwargs)``, each prompt prefilled once.

    ``inputs`` are the processed, left-padded unique prompts (``family.process``); the result
    has ``B*n`` rows in the same order (prompt-major) and the same form as ``generate``'s
    (a tensor, or a ``GenerateOutput`` with ``return_dict_in_generate``). Call under
    ``torch.no_grad()`` with the model in eval mode. Raises ``ValueError`` where the shared
    path cannot apply (check :func:`can_share_prefill` first).
    """
    if gen_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("shared_prefill_generate: pass n, not num_return_sequences")
    if not can_share_prefill(family, model, gen_kwargs, inputs):
        raise ValueError(f"shared prefill does not apply to {type(model).__name__} with family {family.name!r} "
                         "and these prompts (see can_share_prefill)")
    model = hf_model(model)
    cache_key, cache, rep = prefill_cache(model, family, inputs, n)
    # 4. Continue: generate sees the full prompt ids (so logits processors read the same
    #    input_ids as on the plain path) and runs only the uncached last prompt token.
    return model.generate(**rep, **{cache_key: cache}, **gen_kwargs)


def prefill_cache(model: Any, family: ModelFamily, inputs: Any, n: int) -> tuple[str, Any, dict[str, Any]]:
    """Steps 1-3 above: ``(cache_key, cache, rows)`` for ``B*n`` rows continuing ``inputs``.

    ``cache`` holds tokens ``0 .. L-2`` of every row (each unique prompt prefilled once, its
    rows repeated ``n`` times, prompt-major); ``rows`` holds the per-token inputs of all ``B*n``
    rows (``input_ids``, ``attention_mask``, the family's per-token keys) and ``position_ids``
    over the whole prompt, as ``generate`` computes them; ``cache_key`` is the name the model's
    forward/generate takes the cache under. ``model`` is the transformers model (not a PEFT
    wrapper); call under ``torch.no_grad()`` after :func:`can_continue_from_cache`.
    """
    ids = inputs["input_ids"]
    token_keys = (*_TOKEN_KEYS, *family.per_token_keys)
    extra = {k: v for k, v in inputs.items() if k != "input_ids" and v is not None}

    # 1. Positions of the unique prompts, from the same function generate uses (it may also
    #    record per-prompt state such as Qwen-VL's rope deltas, exactly as the plain path does).
    positions = model._prepare_position_ids_for_generation(ids, dict(extra))
    batch_dim = positions.ndim - 2  # [B, L] or [axes, B, L]

    # 2. Prefill tokens 0 .. L-2 of each unique prompt, images included, into a fresh cache.
    params = _forward_params(model)
    cache_key = "cache" if "cache" in params else "past_key_values"
    prefill = {k: (v[:, :-1] if k in token_keys else v) for k, v in extra.items()}
    prefill["position_ids"] = positions[..., :-1]
    if "logits_to_keep" in params:
        prefill["logits_to_keep"] = 1  # the prefill's logits are not used: skip the LM head
    out = model(input_ids=ids[:, :-1], use_cache=True, return_dict=True, **prefill)
    cache = getattr(out, "cache", None) if cache_key == "cache" else None
    if cache is None:
        cache = out.past_key_values
    del out

    # 3. Expand the cache and the per-token inputs to n rows per prompt (prompt-major, like
    #    num_return_sequences); image inputs are dropped: their tokens are in the cache.
    if n > 1:
        cache.batch_repeat_interleave(n)
    rep = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items() if k in token_keys and v is not None}
    rep["position_ids"] = positions.repeat_interleave(n, dim=batch_dim)
    return cache_key, cache, rep
