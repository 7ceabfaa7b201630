"""Shared-prefix training forward: each prompt (and its images) once per group.

The G completions of a group share one prompt. The plain training forward builds one row per
completion, ``[prompt, completion_j]``, so the vision tower encodes every image G times and
the language model runs the prompt G times in the reference forward, the policy forward and
its backward. Here the prompt runs once and its completions attend to it (as in the
"Prefix Grouper" shared-prefix GRPO forward). Two layouts:

**Cached prefix** (:func:`prepare_cached`, :func:`cached_logprobs`; the engine's choice where
:func:`can_cache_prefix` holds). A prompt pass over the B unique left-padded prompts (images
included) fills a KV cache and gives every completion's first log-prob (the prompt's last
position predicts it); the cache's rows are selected per completion (an index, so each
completion's gradient flows back into its prompt's keys and values, summed over the group, as
the plain path sums them over G copies) and the N completions run as one ``[N, T]`` batch on it
under the model's own causal mask. Attention costs ``L^2 + N*T*(L + T)`` per layer: each
completion token attends to exactly what it attends to in its plain row. Needs a forward that
takes ``position_ids`` and a cache, and no gradient checkpointing (transformers' checkpointed
layers drop the cache in training); any attention kernel.

**Packed** (:func:`pack`, :func:`packed_logprobs`; with gradient checkpointing). One packed row
per prompt::

    [ p_0 … p_{L-1} | c1_0 … c1_{T-1} | c2_0 … c2_{T-1} | … | ck_0 … ck_{T-1} | pad … ]

Attention is block-causal: prompt tokens attend causally within the prompt; a token of
completion j attends to the whole prompt and to the earlier tokens of completion j only
(padding attends to itself, so no row of the mask is empty). The dense ``(L + G*T)^2``
attention of a packed row wastes most of its work on masked blocks, so long completions turn
it off (:func:`layer_cost`). Needs an attention kernel that takes an arbitrary 4-D mask
(``sdpa``, ``eager``).

Positions, both layouts: the prompt gets the positions the model computes for the prompt alone
(1-D, or multimodal RoPE through :meth:`ModelFamily.prompt_positions`); token i of every
completion gets ``n + i``, where ``n`` is the prompt's next text position (for mRoPE all three
axes equal, which is what the plain row ``[prompt, completion_j]`` gives it). So every
completion token sees exactly the keys and positions it sees in the plain row, and
log-probabilities and gradients equal the plain path's up to float rounding (checked per
family, both layouts, by the ``shared_prefix`` conformance check). The vision tower sees each
unique image once, and the prompt's share of the training-pass tokens drops from
``G*L / (G*L + G*T)`` to ``L / (L + G*T)``.

Switched on by ``grpo.prefix_sharing`` for families that opted in
(``ModelFamily.prefix_sharing``); where neither layout applies the engine keeps the plain path.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.grpo.logprobs import selected_logprobs, unwrap_model
from core.interfaces import ModelFamily, PromptInput
from core.plugins.builtin.decode import sharded_across_ranks
from core.plugins.builtin.prefill import hf_model

#: Attention implementations that accept a custom 4-D mask as given.
MASKABLE_ATTENTION = ("sdpa", "eager")


def can_share_prefix(family: ModelFamily, model: Any) -> bool:
    """Whether the packed forward applies: the family opted in and the kernel takes 4-D masks."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    return bool(family.prefix_sharing) and impl in MASKABLE_ATTENTION


@dataclass
class PackedRows:
    """Model inputs of the packed rows and where each original row's log-probs are read.

    ``positions``/``targets``: ``[R, K]`` read positions and target ids per packed row;
    ``rows``/``cols``: for original row ``r`` and completion position ``i``, its log-prob is
    ``lp[rows[r], cols[r, i]]``.
    """

    inputs: dict[str, Any]
    positions: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def segments(prompts: Sequence[PromptInput]) -> list[list[int]]:
    """Runs of consecutive rows that share one prompt object (a group, or part of one)."""
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if out and prompts[out[-1][0]] is p:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def process_unique(family: ModelFamily, processor: Any, prompts: Sequence[PromptInput],
                   device: torch.device | str = "cpu") -> Any:
    """The processor output of each unique prompt (one per :func:`segments` run), left-padded."""
    uniq = [prompts[s[0]] for s in segments(prompts)]
    return family.process(processor, [p.text for p in uniq], [p.images for p in uniq]).to(device)


def text_hidden_size(model: Any) -> int:
    """The language model's hidden size, for the layouts' cost rules (1024 where the config has none)."""
    return getattr(model.config.get_text_config(), "hidden_size", None) or 1024


def layer_cost(rows: int, width: int, hidden: int) -> float:
    """Relative cost of a decoder layer on ``rows x width`` tokens with a dense attention mask.

    Projections and MLP take ~24 * width * hidden^2 FLOPs per row, attention scores and
    values ~4 * width^2 * hidden: the ratio is width / (6 * hidden).
    """
    return rows * width * (1 + width / (6 * hidden))


def pack(family: ModelFamily, model: Any, processor: Any, prompts: Sequence[PromptInput], comp_ids: torch.Tensor,
         device: torch.device | str = "cpu", force: bool = False, processed: Any = None) -> PackedRows | None:
    """Build the packed rows for rows ``[prompts[r], comp_ids[r]]`` (``comp_ids`` is ``[N, T]``).

    Each unique prompt is processed (tokenised, images preprocessed) once. Returns ``None``
    (use the plain path) when packing would cost more (:func:`layer_cost`): a packed row's
    attention grows with the square of ``L + k*T``, so long completions with a short prompt
    are cheaper as plain rows. ``force`` packs regardless (tests). ``processed``: the unique
    prompts already processed (:func:`process_unique`).
    """
    segs = segments(prompts)
    p_in = processed if processed is not None else process_unique(family, processor, prompts, device)
    ids_p, att = p_in["input_ids"], p_in["attention_mask"].bool()
    comp_ids = comp_ids.to(device)
    t = comp_ids.shape[1]
    lens = [int(att[s].sum()) + len(seg) * t for s, seg in enumerate(segs)]
    width, n_rows = max(lens), len(segs)
    hidden = text_hidden_size(model)
    if not force and layer_cost(n_rows, width, hidden) >= layer_cost(len(prompts), ids_p.shape[1] + t, hidden):
        return None
    pos = family.prompt_positions(model, p_in)
    tok = getattr(processor, "tokenizer", processor)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    mrope = pos is not None and pos.dim() == 3
    axes = pos.shape[0] if mrope else 1
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long, device=device)
    positions = torch.zeros((axes, n_rows, width), dtype=torch.long, device=device)
    block = torch.empty((n_rows, width), dtype=torch.long, device=device)
    per_token = {k: v for k, v in p_in.items() if k in family.per_token_keys and isinstance(v, torch.Tensor)
                 and v.shape == ids_p.shape}
    per_token_out = {k: torch.zeros((n_rows, width), dtype=v.dtype, device=device) for k, v in per_token.items()}
    k_max = max(len(s) for s in segs) * t
    read = torch.zeros((n_rows, k_max), dtype=torch.long, device=device)
    targets = torch.zeros((n_rows, k_max), dtype=torch.long, device=device)
    n = comp_ids.shape[0]
    rows = torch.empty(n, dtype=torch.long, device=device)
    cols = torch.empty((n, t), dtype=torch.long, device=device)
    ar = torch.arange(t, device=device)
    for s, seg in enumerate(segs):
        valid = att[s]
        L = int(valid.sum())
        ids[s, :L] = ids_p[s, valid]
        for k, v in per_token.items():
            per_token_out[k][s, :L] = v[s, valid]
        if pos is None:
            p_pos = torch.arange(L, device=device).unsqueeze(0)
        else:
            p_pos = (pos[:, s] if mrope else pos[s].unsqueeze(0))[:, valid]
        positions[:, s, :L] = p_pos
        nxt = int(p_pos.max()) + 1 if L else 0
        block[s, :L] = 0
        for j, r in enumerate(seg):
            a = L + j * t
            ids[s, a:a + t] = comp_ids[r]
            positions[:, s, a:a + t] = nxt + ar
            block[s, a:a + t] = j + 1
            prev = torch.cat([torch.tensor([L - 1], device=device), a + ar[:-1]])
            read[s, j * t:(j + 1) * t] = prev
            targets[s, j * t:(j + 1) * t] = comp_ids[r]
            rows[r] = s
            cols[r] = j * t + ar
        end = L + len(seg) * t
        block[s, end:] = -1 - torch.arange(width - end, device=device)  # padding: its own block
    q = torch.arange(width, device=device)
    causal = q.unsqueeze(0) <= q.unsqueeze(1)  # [query, key]
    allowed = causal & ((block.unsqueeze(2) == block.unsqueeze(1)) | (block.unsqueeze(1) == 0))
    mask = allowed.unsqueeze(1)  # [R, 1, S, S]
    if getattr(model.config, "_attn_implementation", None) == "eager":  # additive float mask
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    inputs: dict[str, Any] = {k: v for k, v in p_in.items()
                              if k not in ("input_ids", "attention_mask") and k not in per_token}
    inputs.update(per_token_out)
    inputs.update(input_ids=ids, attention_mask=mask, position_ids=positions if mrope else positions[0])
    return PackedRows(inputs, read, targets, rows, cols)


def packed_logprobs(model: Any, packed: PackedRows, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities ``[N, T]`` of the original rows from one packed forward."""
    lp = selected_logprobs(model, packed.inputs, packed.positions, packed.targets, temperature)
    return lp[packed.rows.unsqueeze(1), packed.cols]


# ---- cached prefix: the prompt's KV cache instead of a block-causal mask ---------------------


def _cache_key(model: Any) -> str | None:
    """The name the transformers model's forward takes a KV cache under, or ``None``."""
    params = set(inspect.signature(hf_model(unwrap_model(model)).forward).parameters)
    if "position_ids" not in params:
        return None
    return "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None


def can_cache_prefix(family: ModelFamily, model: Any) -> bool:
    """Whether the cached-prefix forward applies (:func:`cached_logprobs`).

    Needs: the family opted into ``prefix_sharing`` (its positions come from
    :meth:`~core.interfaces.ModelFamily.prompt_positions` and its attention is causal), a forward
    that takes ``position_ids`` and a KV cache, no gradient checkpointing (transformers'
    checkpointed layers drop the cache in training), and weights not sharded across ranks
    (ZeRO-3 / FSDP gather them collectively in every forward, so every rank must run the same
    number of forwards: this path runs one or two per micro-batch, depending on its rows). Any
    attention kernel works: the model builds its own causal mask over the cache.
    """
    if not family.prefix_sharing or _cache_key(model) is None or sharded_across_ranks(unwrap_model(model)):
        return False
    # transformers' own test (PreTrainedModel.is_activation_checkpointing), without its renamed property
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in unwrap_model(model).modules())


@dataclass
class CachedPrefix:
    """Inputs of the cached-prefix forward: the unique prompts once, then every completion on their KV cache.

    ``prompt``: model inputs of the ``B`` unique left-padded prompts (images, positions);
    ``select``: ``[N]`` the unique prompt (cache row) of each completion row;
    ``first_positions``/``first_targets``: ``[B, K]`` read positions (the prompt's last) and the
    first completion token of each of its rows; row ``r``'s first log-prob is
    ``lp[select[r], first_cols[r]]``. ``completion``: model inputs of the ``N`` completion rows
    (``input_ids [N, T]``, ``attention_mask [N, L + T]``, ``position_ids``), run on the cache.
    """

    prompt: dict[str, Any]
    first_positions: torch.Tensor
    first_targets: torch.Tensor
    first_cols: torch.Tensor
    select: torch.Tensor
    completion: dict[str, Any]


def prepare_cached(family: ModelFamily, model: Any, processor: Any, prompts: Sequence[PromptInput],
                   comp_ids: torch.Tensor, device: torch.device | str = "cpu", processed: Any = None) -> CachedPrefix:
    """Build :class:`CachedPrefix` inputs for rows ``[prompts[r], comp_ids[r]]`` (``comp_ids`` is ``[N, T]``).

    Each unique prompt is processed (tokenised, images preprocessed) once, left-padded. Its
    positions are :meth:`~core.interfaces.ModelFamily.prompt_positions` (else ``0 .. len-1``
    over its own tokens); token ``i`` of each completion gets ``n + i`` on every axis, ``n``
    the prompt's next position, as in :func:`pack`. ``processed``: the unique prompts already
    processed (:func:`process_unique`).
    """
    segs = segments(prompts)
    p_in = processed if processed is not None else process_unique(family, processor, prompts, device)
    ids_p, att = p_in["input_ids"], p_in["attention_mask"]
    comp_ids = comp_ids.to(device)
    n, t = comp_ids.shape
    b, width = ids_p.shape
    pos = family.prompt_positions(model, p_in)
    if pos is None:  # 0 .. len-1 over each prompt's own tokens (left padding gets 0)
        pos = (att.long().cumsum(-1) - 1).clamp(min=0)
    mrope = pos.dim() == 3
    nxt = (pos.amax(dim=(0, 2)) if mrope else pos.amax(dim=1)) + 1  # [B]
    select = torch.empty(n, dtype=torch.long, device=device)
    k_max = max(len(s) for s in segs)
    first_targets = torch.zeros((b, k_max), dtype=torch.long, device=device)
    first_cols = torch.empty(n, dtype=torch.long, device=device)
    for s, seg in enumerate(segs):
        for j, r in enumerate(seg):
            select[r], first_cols[r] = s, j
            first_targets[s, j] = comp_ids[r, 0]
    prompt = dict(p_in)
    prompt["position_ids"] = pos
    c_pos = nxt[select].unsqueeze(1) + torch.arange(t, device=device)  # [N, T]
    completion: dict[str, Any] = {
        "input_ids": comp_ids,
        # padding after a completion's end needs no mask: causal attention never lets an
        # earlier token see it, and its log-probs are masked out of the loss
        "attention_mask": torch.cat([att[select], torch.ones((n, t), dtype=att.dtype, device=device)], dim=1),
        "position_ids": c_pos.unsqueeze(0).expand(pos.shape[0], n, t) if mrope else c_pos,
    }
    for k in family.per_token_keys:  # completion tokens are text tokens
        v = p_in.get(k)
        if isinstance(v, torch.Tensor) and v.shape == ids_p.shape:
            completion[k] = torch.zeros((n, t), dtype=v.dtype, device=device)
    first_positions = torch.full((b, k_max), width - 1, dtype=torch.long, device=device)
    return CachedPrefix(prompt, first_positions, first_targets, first_cols, select, completion)


def cached_logprobs(model: Any, c: CachedPrefix, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities ``[N, T]`` of the original rows: one prompt pass, one completion pass.

    The prompt pass (images included) fills a KV cache and gives every completion's first
    log-prob (the prompt's last position); the cache's rows are then selected per completion
    (an index: gradients of every completion flow back into its prompt's keys and values) and
    the completions run on it as one ``[N, T]`` batch. Raises ``RuntimeError`` if the model did
    not extend the cache (a forward that ignored it would have scored completions without
    their prompt).
    """
    key = _cache_key(model)
    if key is None:
        raise ValueError(f"{type(model).__name__} takes no position_ids and KV cache (see can_cache_prefix)")
    sink: dict[str, Any] = {}
    first = selected_logprobs(model, c.prompt, c.first_positions, c.first_targets, temperature,
                              use_cache=True, outputs=sink)[c.select, c.first_cols].unsqueeze(1)
    ids = c.completion["input_ids"]
    t = ids.shape[1]
    if t == 1:
        return first
    out = sink.pop("output")
    cache = getattr(out, "cache", None) if key == "cache" else None
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    del out
    width = c.prompt["input_ids"].shape[1]
    if cache is None or cache.get_seq_length() != width:
        raise RuntimeError(f"{type(model).__name__} returned no KV cache of the prompt ({width} positions)")
    cache.batch_select_indices(c.select)
    read = torch.arange(t - 1, device=ids.device).unsqueeze(0).expand(ids.shape[0], t - 1)
    rest = selected_logprobs(model, {**c.completion, key: cache}, read, ids[:, 1:], temperature, use_cache=True)
    if cache.get_seq_length() != width + t:
        raise RuntimeError(f"{type(model).__name__} did not run the completions on the prompt's KV cache "
                           f"(cache holds {cache.get_seq_length()} positions, expected {width + t})")
    return torch.cat([first, rest], dim=1)


#: The cached layout's extra forward call per pass, as FLOPs per decoder layer: what its fixed cost
#: (kernel launches, Python, the cache's row selection) is worth in attention work. An estimate
#: (~0.2 ms per layer and call at ~250 GFLOP/s on the project's CPU): on the tiny quickstart model
#: the packed row's wasted attention is worth less than the extra call, and packing was measured
#: faster there (train_passes.py, tiny config: packed 0.41x, cached 0.49x of the plain rows).
CACHED_CALL_FLOPS = 5e7


def prefer_cached(processed: Any, prompts: Sequence[PromptInput], t: int, hidden: int) -> bool:
    """Whether the cached layout beats one packed row per prompt for these rows (both apply).

    Per decoder layer, attention scores and values cost ``4 * hidden`` FLOPs per (query, key)
    pair. A packed row of width ``W = L + k*T`` pays ``W^2`` pairs under its dense mask; the
    cached layout pays ``L^2`` for the prompt and ``k*T*(L + T)`` for its completions (what the
    mask lets through, roughly). The cached layout wins where the pairs it saves are worth more
    than its extra forward call (:data:`CACHED_CALL_FLOPS`).
    """
    lens = processed["attention_mask"].sum(dim=1).tolist()
    sizes = [len(s) for s in segments(prompts)]
    saved = sum((L + k * t) ** 2 - (L * L + k * t * (L + t)) for L, k in zip(lens, sizes, strict=True))
    return 4 * hidden * saved >= CACHED_CALL_FLOPS
