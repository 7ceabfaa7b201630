"""Compact decoding in the built-in rollout (finished rows leave the batch), on a real tiny Qwen2.5-VL.

Everything goes through ``TransformersRollout.generate``: the rows each language-model call
sees shrink once completions end; greedy completions and their log-probs equal the ``generate``
path's; sampling equals it while no row can end, and once rows end each token's recorded log-prob
equals the trainer's teacher-forced one; ``choices`` and a repetition penalty keep ``generate``.
The per-family form of these checks is the ``compact_decode`` conformance check.
"""

from __future__ import annotations

import pytest
import torch

import core.plugins.builtin.decode as decode
from core.interfaces import PromptInput, RolloutContext, SamplingParams, eos_token_ids
from core.plugins.builtin.rollout import TransformersRollout, generate_kwargs
from core.testing.models import LOGPROB_ATOL, eos_bias_hook, make_images, make_messages


class _hooked:
    """Removes a hook handle on exit."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self.handle

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    """The shared tiny Qwen2.5-VL (tests/conftest.py): family, model, processor."""
    return tiny_qwen


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the loop (the rollout imports it from the module at call time)."""
    calls = []
    real = decode.compact_decode

    def wrapped(*a, **k):
        calls.append(a[3])  # n
        return real(*a, **k)

    monkeypatch.setattr(decode, "compact_decode", wrapped)
    return calls


@pytest.fixture
def rows_seen(tiny):
    """Rows of every language-model call, from a forward pre-hook on the input embeddings."""
    seen: list[int] = []
    handle = tiny[1].get_input_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    yield seen
    handle.remove()


def _prompts(fam, proc, counts=(0, 1, 2)) -> list[PromptInput]:
    # 0, 1 and 2 images: three prompt lengths in one left-padded batch.
    return [PromptInput(make_messages(k), fam.render_prompt(proc, make_messages(k)), make_images(k)) for k in counts]


def _eos(tiny) -> list[int]:
    return sorted(eos_token_ids(tiny[1], tiny[2]))


def _sample(tiny, options, prompts, sampling, suppressed=None):
    fam, model, proc = tiny
    engine = TransformersRollout.from_options(options)
    suppressed = fam.suppressed_token_ids(proc, model) if suppressed is None else suppressed
    engine.setup(RolloutContext(model, proc, fam, torch.device("cpu"), suppressed))
    torch.manual_seed(0)
    return [c for g in engine.generate(prompts, sampling) for c in g]


def test_finished_rows_leave_the_batch(tiny, spy, rows_seen):
    fam, _, proc = tiny
    sampling = SamplingParams(n=4, max_new_tokens=12)
    with _hooked(eos_bias_hook(tiny[1], _eos(tiny), 3.5)):  # rows end early, at different steps
        comps = _sample(tiny, {}, _prompts(fam, proc), sampling)
    assert spy == [4]
    total = len(comps)
    lengths = [len(c.ids) for c in comps]
    assert len(set(lengths)) > 1 and not all(c.truncated for c in comps)
    steps = rows_seen[1:]  # after the prefill of the 3 unique prompts
    assert rows_seen[0] == 3 and steps[0] == total
    assert len(steps) == max(lengths)
    for t, rows in enumerate(steps):
        running = sum(n > t for n in lengths)  # rows whose completion has not ended before step t
        assert running <= rows <= total
    assert steps == sorted(steps, reverse=True) and steps[-1] < total, (steps, lengths)


def test_greedy_equals_generate_tokens_and_logprobs(tiny, spy, rows_seen):
    fam, _, proc = tiny
    prompts = _prompts(fam, proc)
    greedy = SamplingParams(n=2, max_new_tokens=12, do_sample=False)
    plain = _sample(tiny, {"compact_decode": False}, prompts, greedy)
    # EOS after a token only some rows generate: those rows finish early and are dropped.
    trigger = next(x for c in plain for x in c.ids if any(x not in o.ids for o in plain))
    with _hooked(eos_bias_hook(tiny[1], _eos(tiny), 0.0, trigger)):
        off = _sample(tiny, {"compact_decode": False}, prompts, greedy)
        assert not spy
        rows_seen.clear()
        on = _sample(tiny, {}, prompts, greedy)
    assert spy == [1]
    assert min(rows_seen[1:]) < 3, rows_seen
    assert [c.ids for c in on] == [c.ids for c in off]
    assert len({len(c.ids) for c in on}) > 1
    diff = max(abs(a - b) for x, y in zip(on, off, strict=True) for a, b in zip(x.logprobs, y.logprobs, strict=True))
    assert diff <= 1e-5, diff


def test_sampling_equals_generate_while_no_row_ends(tiny, spy):
    fam, model, proc = tiny
    prompts = _prompts(fam, proc)
    no_eos = fam.suppressed_token_ids(proc, model) + _eos(tiny)
    sampling = SamplingParams(n=3, max_new_tokens=8, temperature=0.8, top_k=40, top_p=0.95)
    on = _sample(tiny, {}, prompts, sampling, suppressed=no_eos)
    assert spy == [3]
    off = _sample(tiny, {"compact_decode": False}, prompts, sampling, suppressed=no_eos)
    assert [c.ids for c in on] == [c.ids for c in off]
    diff = max(abs(a - b) for x, y in zip(on, off, strict=True) for a, b in zip(x.logprobs, y.logprobs, strict=True))
    assert diff <= 1e-5, diff


def test_tokens_after_dropped_rows_come_from_the_models_distribution(tiny, spy, rows_seen):
    # Temperature only, nothing suppressed: the sampler's distribution is the trainer's, so each
    # recorded log-prob must equal the teacher-forced one although compaction changed the random stream.
    from core.grpo.logprobs import build_train_inputs, completion_logprobs, pad_completions

    fam, model, proc = tiny
    prompts = _prompts(fam, proc)
    sampling = SamplingParams(n=4, max_new_tokens=12, temperature=0.7)
    with _hooked(eos_bias_hook(model, _eos(tiny), 2.5)):
        comps = _sample(tiny, {}, prompts, sampling, suppressed=[])
        assert spy == [4] and min(rows_seen[1:]) < len(comps)
        ids, mask = pad_completions([c.ids for c in comps], proc.tokenizer.pad_token_id)
        rep = [p for p in prompts for _ in range(sampling.n)]
        inputs = build_train_inputs(fam.process(proc, [p.text for p in rep], [p.images for p in rep]), ids, mask,
                                    fam.per_token_keys)
        with torch.no_grad():
            trainer = completion_logprobs(model, inputs, ids.shape[1], sampling.temperature)
    sampler = torch.zeros_like(trainer)
    for i, c in enumerate(comps):
        sampler[i, :len(c.ids)] = torch.tensor(c.logprobs)
    assert (trainer - sampler)[mask.bool()].abs().max().item() <= LOGPROB_ATOL


@pytest.mark.parametrize("why", ["choices", "repetition_penalty", "option_off", "no_shared_prefill"])
def test_fallbacks_keep_generate(tiny, spy, why):
    fam, _, proc = tiny
    options = {"choices": {"choices": ["red", "green"]}, "option_off": {"compact_decode": False},
               "no_shared_prefill": {"shared_prefill": False}}.get(why, {})
    sampling = SamplingParams(n=2, max_new_tokens=4, repetition_penalty=1.3 if why == "repetition_penalty" else 1.0)
    comps = _sample(tiny, options, _prompts(fam, proc, (1,)), sampling)
    assert not spy
    assert len(comps) == 2 and all(c.logprobs is not None and len(c.logprobs) == len(c.ids) for c in comps)


def test_can_compact_decode_refuses_what_it_cannot_reproduce(tiny, monkeypatch):
    fam, model, proc = tiny
    prompts = _prompts(fam, proc)
    inputs = fam.process(proc, [p.text for p in prompts], [p.images for p in prompts])
    kw = generate_kwargs(SamplingParams(n=2), proc.tokenizer.pad_token_id, set(_eos(tiny)), [1, 2])
    assert decode.can_compact_decode(fam, model, kw, inputs, 2)
    for extra in ({"repetition_penalty": 1.3}, {"num_beams": 2}, {"prefix_allowed_tokens_fn": lambda b, i: [0]},
                  {"logits_processor": [lambda i, s: s]}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 2},
                  {"cache_implementation": "static"}):
        assert not decode.can_compact_decode(fam, model, {**kw, **extra}, inputs, 2), extra
    with pytest.raises(ValueError, match="does not apply"):
        decode.compact_decode(model, fam, inputs, 2, **{**kw, "repetition_penalty": 1.3})
    monkeypatch.setattr(type(fam), "shared_prefill", False)  # n > 1 continues from the shared prefill
    assert not decode.can_compact_decode(fam, model, kw, inputs, 2)
    assert decode.can_compact_decode(fam, model, kw, inputs, 1)
    monkeypatch.setattr(type(fam), "compact_decode", False)
    assert not decode.can_compact_decode(fam, model, kw, inputs, 1)



def test_lora_wrapped_policy_decodes_compactly(tiny, spy):
    # Under LoRA the policy is a PeftModel; the loop runs on its base model, adapters active.
    from peft import LoraConfig, get_peft_model

    fam, model, proc = tiny
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))  # non-zero B: the adapter changes logits
    try:
        prompts = _prompts(fam, proc)
        greedy = SamplingParams(n=1, max_new_tokens=6, do_sample=False)
        on = _sample((fam, lora, proc), {}, prompts, greedy)
        assert spy == [1]
        off = _sample((fam, lora, proc), {"compact_decode": False}, prompts, greedy)
        with lora.disable_adapter():
            base = _sample((fam, lora, proc), {}, prompts, greedy)
    finally:
        lora.unload()  # restore the shared module-scoped model
    assert [c.ids for c in on] == [c.ids for c in off]
    assert [c.logprobs for c in on] != [c.logprobs for c in base], "the adapter did not change the logits"


def test_preallocated_cache_writes_in_place_and_matches_the_dynamic_cache():
    """preallocate_cache: same keys/values and mask sizes as DynamicCache's cat, one buffer written in place."""
    import torch
    from transformers import DynamicCache

    from core.plugins.builtin.decode import preallocate_cache

    torch.manual_seed(0)
    prompt_k, prompt_v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    plain, fast = DynamicCache(), DynamicCache()
    for c in (plain, fast):
        c.update(prompt_k, prompt_v, 0)
    preallocate_cache(fast, extra=4)
    buffer = fast.layers[0]._k.data_ptr()
    rows = 3
    for step in range(4):
        k, v = torch.randn(rows, 2, 1, 4), torch.randn(rows, 2, 1, 4)
        kp, vp = plain.update(k, v, 0)
        kf, vf = fast.update(k, v, 0)
        assert torch.equal(kp, kf) and torch.equal(vp, vf)
        assert fast.get_seq_length() == plain.get_seq_length() == 6 + step
        assert fast.layers[0].get_mask_sizes(1) == plain.layers[0].get_mask_sizes(1)
        if step == 1:  # dropping a row (compaction) keeps the two in step
            keep = torch.tensor([0, 2])
            plain.batch_select_indices(keep)
            fast.batch_select_indices(keep)
            buffer, rows = fast.layers[0]._k.data_ptr(), 2
        assert fast.layers[0]._k.data_ptr() == buffer  # written in place, never reallocated by update
    with pytest.raises(RuntimeError, match="preallocated KV cache full"):
        fast.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4), 0)
