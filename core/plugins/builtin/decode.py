"""Compact decoding for the built-in rollout: a sampling loop that stops computing finished rows.

``model.generate`` keeps every row in the batch until the longest completion ends; in a GRPO
group lengths differ a lot, and the decode forward's cost scales with its rows. Here, for
B left-padded prompts and n samples each (``B*n`` rows)::

    1. prefill: :func:`core.plugins.builtin.prefill.prefill_cache` -- each unique prompt's tokens
       0 .. L-2 once, its cache rows repeated n times (with n == 1: every row's prompt); the
       cache then gets room for the new tokens, written in place (:func:`preallocate_cache`).
    2. step t = 0, 1, ...: one forward of the active rows, one token each (the last prompt
       token at t = 0, then the token sampled at t - 1), at position ``last prompt position
       + t`` on every axis (1-D or multimodal RoPE), which is what ``generate`` computes;
       the logits go through generate's own processors (suppressed ids; temperature, top-k,
       top-p warpers, in generate's order), then ``torch.multinomial`` (greedy: argmax).
    3. finished rows (EOS sampled) emit the pad id from then on, and once enough of them have
       piled up they leave the batch: their cache rows, mask and positions are dropped.

The result has ``generate``'s form (``[B*n, steps]`` new tokens, pad after EOS) plus each
token's log-probability under the distribution it was sampled from (what
:class:`~core.plugins.builtin.rollout.SampledLogprobs` records on the generate path). Greedy
decoding returns generate's tokens; sampling draws the same random numbers as generate until
the first compaction, after which the stream differs (fewer rows per draw) but every token is
still drawn from the model's own conditional distribution (the ``compact_decode``
conformance check).

Applies to families that opt in (``ModelFamily.compact_decode``) and to generate calls whose
processing the loop reproduces; :func:`can_compact_decode` decides up front, and the rollout
keeps ``generate`` elsewhere (``choices``, repetition penalty, beam search, ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from core.interfaces import ModelFamily
from core.plugins.builtin.prefill import can_continue_from_cache, can_share_prefill, hf_model, prefill_cache


def preallocate_cache(cache: Any, extra: int) -> Any:
    """Give each plain dynamic layer of ``cache`` room for ``extra`` more positions, written in place.

    transformers' ``DynamicLayer.update`` appends with ``torch.cat``, which copies the layer's
    whole cache at every decode step: O(T^2) bytes over T steps, measured at a third of the
    rollout's time on CPU (vision config, 16 rows, 64 tokens; ``benchmarks/README.md``). Its
    ``StaticLayer`` writes in place but attends over the full preallocated length and is built for
    ``torch.compile`` (which was slower on CPU, ``benchmarks/decode_ab.py``). So layers of exactly
    ``DynamicLayer``'s type are replaced by an in-place subclass of it, which keeps the dynamic
    layer's semantics (sequence length, mask sizes, attention over the filled positions only)
    and writes each step into a preallocated buffer; other layer types (sliding window, ...) are
    left as they are. Returns ``cache``.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            layers[i] = _in_place_layer_class().from_dynamic(layer, extra)
    return cache


@functools.cache
def _in_place_layer_class() -> type:
    """The in-place layer class (built on first use: core imports transformers lazily)."""
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values are views of a buffer with spare positions."""

        @classmethod
        def from_dynamic(cls, layer: Any, extra: int) -> Any:
            new = cls()
            keys, values = layer.keys, layer.values
            b, h, n = keys.shape[:3]
            new.device, new.is_initialized, new.length = layer.device, True, n
            new._k = keys.new_empty((b, h, n + extra, keys.shape[-1]))
            new._v = values.new_empty((b, h, n + extra, values.shape[-1]))
            new._k[:, :, :n] = keys
            new._v[:, :, :n] = values
            new._views()
            return new

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            end = self.length + key_states.shape[-2]
            if end > self._k.shape[-2]:
                raise RuntimeError(f"preallocated KV cache full ({self._k.shape[-2]} positions)")
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Any) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._views()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a preallocated decode cache is not cropped")

    return InPlaceLayer


#: Compact once at least this fraction of the active rows has finished since the last compaction:
#: each compaction copies the whole KV cache, so dropping one row at a time would cost more than
#: the rows it saves; a quarter bounds the finished rows still computed to 1/4 of the batch.
COMPACT_FRACTION = 0.25


@dataclass
class DecodeResult:
    """``tokens``: ``[rows, steps]`` new token ids (pad after EOS), on the model's device.

    ``logprobs``: ``[rows, steps]`` float32 on the CPU, each sampled token's log-probability
    under its (processed, warped) sampling distribution; 0 after EOS.
    """

    tokens: Any
    logprobs: Any


def _processors(model: Any, inputs: Any, gen_kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """Generate's own logits processors and config for this call, or None where the loop cannot reproduce them.

    Built by generate's own (private) helpers rather than by hand from ``gen_kwargs``, so the
    loop applies what ``generate`` would, in its order, including anything the checkpoint's
    ``generation_config`` adds; any processor other than the supported ones (repetition
    penalty, prefix constraints, min length, ...) sends the call to ``generate``.
    """
    from transformers import (
        LogitsProcessorList,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    from transformers.generation.configuration_utils import GenerationMode

    kw = dict(gen_kwargs)
    custom = kw.pop("logits_processor", None)
    prefix_fn = kw.pop("prefix_allowed_tokens_fn", None)
    if custom or prefix_fn is not None or kw.get("num_return_sequences", 1) != 1:
        return None
    cfg, model_kwargs = model._prepare_generation_config(None, **kw)
    if model_kwargs.keys() - {"use_cache"}:
        return None  # kwargs generate would pass to the forward: not this loop's business
    if cfg.get_generation_mode() not in (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH):
        return None
    if cfg.stop_strings is not None or cfg.max_time is not None or cfg.max_new_tokens is None:
        return None
    ids = inputs["input_ids"]
    model._prepare_special_tokens(cfg, True, device=ids.device)
    procs = model._get_logits_processor(cfg, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids,
                                        logits_processor=LogitsProcessorList(), device=ids.device)
    # These read only the scores, not the sequences: the loop need not keep the full input_ids.
    supported = (SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    if not all(type(p) in supported for p in procs):
        return None
    return procs, cfg


def sharded_across_ranks(model: Any) -> bool:
    """Whether every forward gathers parameters collectively (DeepSpeed ZeRO-3 / FSDP, several processes).

    Then all ranks must run the same number of forwards, which ``generate`` arranges
    (``synced_gpus``) and this loop does not: there, the rollout keeps ``generate`` (and the
    training passes keep one forward per micro-batch: :func:`core.grpo.prefix.can_cache_prefix`).
    """
    import torch.distributed as dist
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model):
        return True
    from torch.distributed.fsdp import FSDPModule  # FSDP2's fully_shard, applied to the root or to blocks

    return any(isinstance(m, FSDPModule) for m in model.modules())


def can_compact_decode(
    family: ModelFamily, model: Any, gen_kwargs: dict[str, Any], inputs: Any, n: int = 1
) -> bool:
    """Whether :func:`compact_decode` applies to this family, model, generate call and batch of ``n`` rows per prompt.

    Needs: the family opted in (``compact_decode``); the model continues from a prefilled cache
    (:func:`~core.plugins.builtin.prefill.can_continue_from_cache`), and with ``n > 1`` shares
    the prefill (:func:`~core.plugins.builtin.prefill.can_share_prefill`); greedy or plain
    sampling whose only logits processing is suppressed ids, temperature, top-k and top-p (no
    ``prefix_allowed_tokens_fn``, repetition penalty, beams, stop strings); the model itself, not
    a wrapper adding to its ``generate`` (a streamer); parameters not
    sharded across processes (ZeRO-3, FSDP), whose forwards every rank must run in step.
    """
    import torch

    if not getattr(family, "compact_decode", False):
        return False
    if not isinstance(model, torch.nn.Module):
        # A wrapper around the policy that adds to its generate calls (the server's streaming
        # policy: a streamer, a cancel criterion) must keep generate: the loop would skip them.
        return False
    model = hf_model(model)
    if sharded_across_ranks(model):
        return False
    if not can_continue_from_cache(family, model, gen_kwargs, inputs):
        return False
    if n > 1 and not can_share_prefill(family, model, gen_kwargs, inputs):
        return False
    return _processors(model, inputs, gen_kwargs) is not None


def compact_decode(model: Any, family: ModelFamily, inputs: Any, n: int, **gen_kwargs: Any) -> DecodeResult:
    """Sample ``n`` completions per prompt as ``model.generate(**gen_kwargs)`` would, dropping finished rows.

    ``inputs`` are the processed, left-padded unique prompts (``family.process``); rows are
    prompt-major (like ``num_return_sequences``). ``gen_kwargs`` are generate's (``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``suppress_tokens``, ``eos_token_id``,
    ``pad_token_id``, ...). Call under ``torch.no_grad()`` with the model in eval mode. Raises
    ``ValueError`` where the loop does not apply (check :func:`can_compact_decode` first).
    """
    import torch

    if not can_compact_decode(family, model, gen_kwargs, inputs, n):
        raise ValueError(f"compact decoding does not apply to {type(model).__name__} with family {family.name!r}, "
                         "these prompts and generate arguments (see can_compact_decode)")
    model = hf_model(model)
    procs, cfg = _processors(model, inputs, gen_kwargs)  # type: ignore[misc]
    device = inputs["input_ids"].device
    eos = cfg._eos_token_tensor
    eos = eos.flatten() if eos is not None else torch.zeros(0, dtype=torch.long, device=device)
    pad = int(cfg._pad_token_tensor) if cfg._pad_token_tensor is not None else int(eos[0]) if len(eos) else 0

    cache_key, cache, rows = prefill_cache(model, family, inputs, n)
    preallocate_cache(cache, cfg.max_new_tokens)
    total = rows["input_ids"].shape[0]
    token = rows["input_ids"][:, -1]
    mask = rows["attention_mask"]
    position = rows["position_ids"][..., -1:]  # [rows, 1] or [axes, rows, 1]
    active = torch.arange(total, device=device)  # batch row -> output row
    done = torch.zeros(total, dtype=torch.bool, device=device)
    tokens = torch.full((total, cfg.max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros((total, cfg.max_new_tokens), dtype=torch.float32, device=device)
    dropped_at = total  # active rows at the last compaction
    steps = 0
    for t in range(cfg.max_new_tokens):
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                    return_dict=True, **{cache_key: cache})
        scores = procs(token[:, None], out.logits[:, -1].float())
        del out
        if cfg.do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs, num_samples=1).squeeze(1)
            lp = probs.gather(1, token[:, None]).squeeze(1).log()
        else:
            token = scores.argmax(dim=-1)
            lp = scores.gather(1, token[:, None]).squeeze(1) - scores.logsumexp(dim=-1)
        # Rows that finished but are still in the batch emit pad, as generate's do.
        token = token.masked_fill(done, pad)
        tokens[active, t] = token
        logprobs[active, t] = lp.masked_fill(done, 0.0)
        done |= torch.isin(token, eos)
        steps = t + 1
        if bool(done.all()):
            break
        if int(done.sum()) >= COMPACT_FRACTION * dropped_at:
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            token, mask, active, done = token[keep], mask[keep], active[keep], done[keep]
            position = position.index_select(position.ndim - 2, keep)
            dropped_at = len(keep)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        position = position + 1
    return DecodeResult(tokens[:, :steps], logprobs[:, :steps].cpu())
