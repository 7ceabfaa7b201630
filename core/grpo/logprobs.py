"""Training-time forward: per-token log-probabilities of completion tokens.

The training forward must see exactly the multimodal inputs generation saw (pixel values,
image grids, per-token type ids ...), or models such as Qwen2.5-VL silently fall back to
1-D positions and the log-probabilities no longer describe the sampled policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

#: Float32 logits allowed to exist at once when computing log-probs (64 MiB: ~110 tokens of
#: Qwen's 152k vocabulary, every token of a 512-token tiny vocabulary at once).
LOGITS_BUDGET_BYTES = 64 * 2**20


def pad_completions(
    ids: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad completion id lists into ``(ids [N, T], mask [N, T])``."""
    t = max((len(x) for x in ids), default=0) or 1
    out = torch.full((len(ids), t), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(ids), t), dtype=torch.long, device=device)
    for i, row in enumerate(ids):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
            mask[i, : len(row)] = 1
    return out, mask


def build_train_inputs(
    prompt_inputs: Mapping[str, Any],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    per_token_keys: tuple[str, ...] = ("token_type_ids", "mm_token_type_ids"),
) -> dict[str, Any]:
    """Append completions to left-padded prompt inputs (one row per completion).

    ``prompt_inputs`` is the processor output for the same rows (prompt repeated per
    completion). Keys aligned with ``input_ids`` (``per_token_keys``) are extended with zeros:
    completion tokens are text tokens.
    """
    prompt_ids = prompt_inputs["input_ids"]
    out = dict(prompt_inputs)
    out["input_ids"] = torch.cat([prompt_ids, completion_ids], dim=1)
    out["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], completion_mask.to(prompt_ids.device)], dim=1)
    for key in per_token_keys:
        val = prompt_inputs.get(key)
        if isinstance(val, torch.Tensor) and val.shape == prompt_ids.shape:
            out[key] = torch.cat([val, torch.zeros_like(completion_ids, dtype=val.dtype)], dim=1)
    return out


def unwrap_model(model: Any) -> Any:
    """The module under DDP / accelerate wrappers (PEFT models forward attribute look-ups)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _chunk_rows(vocab: int, budget_bytes: int) -> int:
    """Rows of ``[rows, vocab]`` float32 logits that fit in ``budget_bytes`` (at least 1)."""
    return max(1, budget_bytes // (4 * max(vocab, 1)))


def head_logprobs(
    head: Any, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    budget_bytes: int | None = None, vocab: int | None = None,
) -> torch.Tensor:
    """``log softmax(head(hidden) / temperature)[target]`` per row, in chunks of rows.

    ``head`` is the output layer (a module or its forward; pass ``vocab`` for the latter),
    ``hidden`` is ``[N, H]``, ``targets`` ``[N]``; returns float32 ``[N]``. At most
    ``budget_bytes`` (default :data:`LOGITS_BUDGET_BYTES`) of float32 logits exist at a
    time: each chunk's logits are reduced to ``logit[target] - logsumexp(logits)`` at once,
    and when gradients are needed and there is more than one chunk, each chunk is
    checkpointed (its logits are recomputed in backward instead of being kept for it). A
    single chunk (small vocabularies) is never recomputed.
    """
    n = hidden.shape[0]
    vocab = vocab or getattr(head, "out_features", None) or head.weight.shape[0]
    rows = _chunk_rows(vocab, LOGITS_BUDGET_BYTES if budget_bytes is None else budget_bytes)

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if temperature != 1.0:
            logits = logits / temperature
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    if n <= rows:
        return piece(hidden, targets)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    out = []
    for s in range(0, n, rows):
        h, t = hidden[s:s + rows], targets[s:s + rows]
        out.append(checkpoint(piece, h, t, use_reentrant=False) if recompute else piece(h, t))
    return torch.cat(out)


def selected_logprobs(
    model: Any, inputs: Mapping[str, Any], positions: torch.Tensor, targets: torch.Tensor,
    temperature: float = 1.0, logits_to_keep: int = 0, budget_bytes: int | None = None,
    use_cache: bool = False, outputs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Log-probabilities ``[B, K]`` of ``targets`` predicted at ``positions`` of each row.

    Runs ``model(**inputs, logits_to_keep=logits_to_keep)`` with the output head's forward
    replaced for that call: the head receives the final hidden states ``[B, S', H]`` (``S'``
    = the last ``logits_to_keep`` positions, or all for 0), picks ``positions`` (indices into
    those ``S'``) and returns log-probs through :func:`head_logprobs`, so the full
    ``[B, S', vocab]`` logits never exist. The head is called inside the model's forward (as
    ZeRO-3 parameter gathering and DDP expect), and its output — what the model returns as
    ``logits`` — is those log-probs ``[B, K, 1]``: DeepSpeed ZeRO-3 re-gathers the head's
    sharded weight for backward from a hook on that output, so the gradient must flow through
    it (a model that changes its logits after the head, e.g. soft-capping, gets the log-probs
    from the head directly instead). If the model does not route its logits through
    ``get_output_embeddings()``, the ordinary logits are used instead. ``use_cache`` is passed
    to the model (a cache given in ``inputs`` is read either way); with ``outputs`` (a dict),
    ``outputs["output"]`` receives the model's output (e.g. the KV cache it filled).
    """
    head = unwrap_model(model).get_output_embeddings()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    got: dict[str, torch.Tensor] = {}

    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1).expand_as(positions)
        h = hidden[rows, positions.to(hidden.device)]
        lp = head_logprobs(orig, h.reshape(-1, h.shape[-1]), targets.reshape(-1).to(hidden.device), temperature,
                           budget_bytes, vocab)
        got["lp"] = lp.view(positions.shape)
        return got["lp"].unsqueeze(-1)  # what the model returns as logits: the log-probs, one per position

    orig = head.forward
    own = head.__dict__.get("forward")  # an instance-level forward (hooks of other libraries) to restore
    head.forward = forward
    try:
        out = model(**inputs, logits_to_keep=logits_to_keep, use_cache=use_cache)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    if outputs is not None:
        outputs["output"] = out
    if "lp" in got:
        carried = getattr(out, "logits", None)
        if isinstance(carried, torch.Tensor) and carried.shape == (*positions.shape, 1) \
                and torch.equal(carried[..., 0].detach(), got["lp"].detach()):
            return carried[..., 0]  # through the model's output (and any hook on the head's output)
        return got["lp"]
    logits = out.logits  # the head was bypassed: fall back to the materialised logits
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1).expand_as(positions)
    lg = logits[rows, positions].float()
    if temperature != 1.0:
        lg = lg / temperature
    return lg.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def completion_logprobs(
    model: Any, train_inputs: Mapping[str, Any], num_completion_tokens: int, temperature: float = 1.0,
    budget_bytes: int | None = None,
) -> torch.Tensor:
    """Log-probabilities ``[N, T]`` of the last ``T`` tokens of ``train_inputs["input_ids"]``.

    Logits are divided by the sampling ``temperature`` (the policy that generated the tokens
    is the tempered one, as in TRL). Only the last ``T + 1`` positions reach the output head
    (``logits_to_keep``), so the vocabulary projection is not paid for prompts. When their
    float32 logits would exceed ``budget_bytes`` (default :data:`LOGITS_BUDGET_BYTES`; Qwen's
    152k vocabulary), the head runs in bounded chunks (:func:`selected_logprobs`); below it
    the logits are materialised once, which keeps small-vocabulary runs bit-identical to
    earlier releases.
    """
    t = num_completion_tokens
    ids = train_inputs["input_ids"]
    budget = LOGITS_BUDGET_BYTES if budget_bytes is None else budget_bytes
    head = unwrap_model(model).get_output_embeddings()
    vocab = getattr(head, "out_features", None) or getattr(head, "weight", torch.empty(0, 0)).shape[0]
    if ids.shape[0] * (t + 1) * vocab * 4 > budget:
        positions = torch.arange(t, device=ids.device).unsqueeze(0).expand(ids.shape[0], t)
        return selected_logprobs(model, train_inputs, positions, ids[:, -t:], temperature, logits_to_keep=t + 1,
                                 budget_bytes=budget)
    out = model(**train_inputs, logits_to_keep=t + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = ids[:, -t:]
    # log_softmax + gather row by row: at most one row's [T, V] float copy at a time.
    rows = []
    for lg, tg in zip(logits, targets, strict=True):
        rows.append(torch.log_softmax(lg, dim=-1).gather(-1, tg.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)
