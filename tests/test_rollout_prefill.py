"""Shared prefill in the built-in rollout, on a real tiny Qwen2.5-VL loaded the training way.

Each case samples the same prompts with the same seed with ``shared_prefill`` on and off and
asserts identical completions, and that the shared path really ran (or really did not). The
logit-level equality and the prefill/vision call counts are the ``shared_prefill`` model-family
conformance check, run by every family plugin's tests.
"""

from __future__ import annotations

import pytest
import torch

import core.plugins.builtin.prefill as prefill
from core.interfaces import PromptInput, RolloutContext, SamplingParams
from core.plugins import PluginHost
from core.plugins.builtin.rollout import TransformersRollout
from core.testing.models import build_conformance_context, make_images, make_messages


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    reg = PluginHost("qwen-vl").registry
    try:
        fam_cls = reg.get("models", "qwen2_5_vl")
    except LookupError as exc:
        pytest.skip(f"needs the qwen-vl plugin: {exc}")
    ctx = build_conformance_context(fam_cls, tmp_path_factory.mktemp("prefill"), seed=0)
    return ctx.family, ctx.model, ctx.processor


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the shared path (the rollout imports it from the module at call time)."""
    calls = []
    real = prefill.shared_prefill_generate

    def wrapped(*a, **k):
        calls.append(a[3])  # n
        return real(*a, **k)

    monkeypatch.setattr(prefill, "shared_prefill_generate", wrapped)
    return calls


def _prompts(fam, proc, counts=(0, 1, 2)) -> list[PromptInput]:
    # 0, 1 and 2 images: three prompt lengths in one left-padded batch.
    return [PromptInput(make_messages(k), fam.render_prompt(proc, make_messages(k)), make_images(k), seed=10 + k)
            for k in counts]


def _sample(tiny, options, prompts, sampling, model=None) -> list[list[list[int]]]:
    fam, base, proc = tiny
    model = model if model is not None else base
    # These cases are about generate's shared prefill; compact decoding (tests/test_rollout_decode.py)
    # would replace generate where it applies.
    engine = TransformersRollout.from_options({"compact_decode": False, **options})
    engine.setup(RolloutContext(model, proc, fam, torch.device("cpu"), fam.suppressed_token_ids(proc, base)))
    torch.manual_seed(0)
    return [[c.ids for c in g] for g in engine.generate(prompts, sampling)]


CASES = {
    "batched": ({}, SamplingParams(n=4, max_new_tokens=6)),
    "seed_per_prompt": ({"seed_per_prompt": True}, SamplingParams(n=3, max_new_tokens=6)),
    "choices": ({"choices": ["red", "green", "blue", "light blue"]}, SamplingParams(n=8, max_new_tokens=10,
                                                                                    temperature=1.5)),
    "top_k_top_p_repetition": ({"prompt_batch_size": 2},
                               SamplingParams(n=3, max_new_tokens=6, top_k=50, top_p=0.9, repetition_penalty=1.3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_completions_with_shared_prefill_on_and_off(tiny, spy, case):
    options, sampling = CASES[case]
    fam, _, proc = tiny
    prompts = _prompts(fam, proc)
    shared = _sample(tiny, {**options, "shared_prefill": True}, prompts, sampling)
    assert spy and set(spy) == {sampling.n}, "the shared path did not run"
    spy.clear()
    plain = _sample(tiny, {**options, "shared_prefill": False}, prompts, sampling)
    assert not spy
    assert shared == plain
    suppressed = set(fam.suppressed_token_ids(proc, tiny[1]))
    assert all(not suppressed.intersection(ids) for g in shared for ids in g)
    if "choices" in options:
        tok = proc.tokenizer
        texts = {tok.decode(ids, skip_special_tokens=True).strip() for g in shared for ids in g}
        assert texts <= set(options["choices"]), texts


def test_shared_prefill_is_the_default(tiny, spy):
    fam, _, proc = tiny
    _sample(tiny, {}, _prompts(fam, proc, (1,)), SamplingParams(n=2, max_new_tokens=2))
    assert spy == [2]


@pytest.mark.parametrize("why", ["greedy", "n_is_1", "family_not_opted_in"])
def test_plain_path_where_nothing_is_shared(tiny, spy, monkeypatch, why):
    fam, _, proc = tiny
    sampling = SamplingParams(n=1 if why == "n_is_1" else 3, max_new_tokens=3, do_sample=why != "greedy")
    if why == "family_not_opted_in":
        monkeypatch.setattr(type(fam), "shared_prefill", False)
    groups = _sample(tiny, {}, _prompts(fam, proc), sampling)
    assert not spy
    assert all(len(g) == sampling.n for g in groups)
    if why == "greedy":  # one greedy row per prompt, repeated
        assert all(g[0] == ids for g in groups for ids in g)


def test_lora_wrapped_policy_shares_the_prefill(tiny, spy):
    # Under LoRA the policy is a PeftModel; the prefill runs on its base model, adapters active.
    from peft import LoraConfig, get_peft_model

    fam, model, proc = tiny
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))  # non-zero B: the adapter changes logits
    try:
        prompts = _prompts(fam, proc)
        sampling = SamplingParams(n=3, max_new_tokens=5)
        shared = _sample(tiny, {}, prompts, sampling, model=lora)
        assert spy == [3]
        plain = _sample(tiny, {"shared_prefill": False}, prompts, sampling, model=lora)
        with lora.disable_adapter():
            base = _sample(tiny, {"shared_prefill": False}, prompts, sampling, model=lora)
    finally:
        lora.unload()  # restore the shared module-scoped model
    assert shared == plain
    assert shared != base, "the adapter did not change sampling: the check above would not see it missing"


def test_can_share_prefill_refuses_what_it_cannot_continue(tiny):
    fam, model, proc = tiny
    inputs = fam.process(proc, [p.text for p in _prompts(fam, proc)], [p.images for p in _prompts(fam, proc)])
    assert prefill.can_share_prefill(fam, model, {}, inputs)
    assert not prefill.can_share_prefill(fam, model, {"cache_implementation": "static"}, inputs)
    assert not prefill.can_share_prefill(fam, model, {"num_beams": 2}, inputs)
    ends_in_image = dict(inputs)
    ends_in_image["mm_token_type_ids"] = inputs["mm_token_type_ids"].clone()
    ends_in_image["mm_token_type_ids"][:, -1] = 1
    assert not prefill.can_share_prefill(fam, model, {}, ends_in_image)
    with pytest.raises(ValueError, match="pass n, not num_return_sequences"):
        prefill.shared_prefill_generate(model, fam, inputs, 2, num_return_sequences=2)
