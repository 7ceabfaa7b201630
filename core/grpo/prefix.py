"""Shared-prefix training forward: each prompt (and its images) once per group.

The G completions of a group share one prompt. The plain training forward builds one row per
completion, ``[prompt, completion_j]``, so the vision tower encodes every image G times and
the language model runs the prompt G times in the reference forward, the policy forward and
its backward. Here the prompt runs once and its completions attend to it (as in the
"Prefix Grouper" shared-prefix GRPO forward). One packed row per prompt::

    [ p_0 … p_{L-1} | c1_0 … c1_{T-1} | c2_0 … c2_{T-1} | … | ck_0 … ck_{T-1} | pad … ]

Attention is block-causal: prompt tokens attend causally within the prompt; a token of
completion j attends to the whole prompt and to the earlier tokens of completion j only
(padding attends to itself, so no row of the mask is empty). Positions: the prompt gets the
positions the model computes for the prompt alone (1-D, or multimodal RoPE through
:meth:`ModelFamily.prompt_positions`); token i of every completion gets ``n + i``, where
``n`` is the prompt's next text position (for mRoPE all three axes equal, which is what
the plain row ``[prompt, completion_j]`` gives it). So every completion token sees exactly
the keys and positions it sees in the plain row, and

    log p(c_j,i) is read at position L - 1 for i = 0 (the prompt's last position predicts
    every completion's first token) and at L + j*T + i - 1 otherwise.

Log-probabilities and gradients equal the plain path's up to float rounding (checked per
family by the ``shared_prefix`` conformance check). The vision tower sees each unique image
once, and the prompt's share of the training-pass tokens drops from ``G*L / (G*L + G*T)``
to ``L / (L + G*T)``.

Switched on by ``grpo.prefix_sharing``. Needs an attention kernel that takes an arbitrary
4-D mask (``sdpa``, ``eager``); with others (``flash_attention_2`` …), for a family that has
not opted in (``ModelFamily.prefix_sharing``), or where the dense ``(L + G*T)^2`` attention
of a packed row would cost more than it saves (long completions, see :func:`layer_cost`),
the engine keeps the plain path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.grpo.logprobs import selected_logprobs
from core.interfaces import ModelFamily, PromptInput

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


def layer_cost(rows: int, width: int, hidden: int) -> float:
    """Relative cost of a decoder layer on ``rows x width`` tokens with a dense attention mask.

    Projections and MLP take ~24 * width * hidden^2 FLOPs per row, attention scores and
    values ~4 * width^2 * hidden: the ratio is width / (6 * hidden).
    """
    return rows * width * (1 + width / (6 * hidden))


def pack(family: ModelFamily, model: Any, processor: Any, prompts: Sequence[PromptInput], comp_ids: torch.Tensor,
         device: torch.device | str = "cpu", force: bool = False) -> PackedRows | None:
    """Build the packed rows for rows ``[prompts[r], comp_ids[r]]`` (``comp_ids`` is ``[N, T]``).

    Each unique prompt is processed (tokenised, images preprocessed) once. Returns ``None``
    (use the plain path) when packing would cost more (:func:`layer_cost`): a packed row's
    attention grows with the square of ``L + k*T``, so long completions with a short prompt
    are cheaper as plain rows. ``force`` packs regardless (tests).
    """
    segs = segments(prompts)
    uniq = [prompts[s[0]] for s in segs]
    p_in = family.process(processor, [p.text for p in uniq], [p.images for p in uniq]).to(device)
    ids_p, att = p_in["input_ids"], p_in["attention_mask"].bool()
    comp_ids = comp_ids.to(device)
    t = comp_ids.shape[1]
    lens = [int(att[s].sum()) + len(seg) * t for s, seg in enumerate(segs)]
    width, n_rows = max(lens), len(segs)
    hidden = getattr(model.config.get_text_config(), "hidden_size", None) or 1024
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
