"""Shared prefix in the training passes: when each layout applies, the packed layout, and the cached prefix.

On a real tiny Qwen2.5-VL. Equality with the plain path (log-probs, gradients, one vision pass
per unique image) for both layouts is the ``shared_prefix`` model-family conformance check, run
by every family plugin's tests; here: uneven groups, LoRA, the gradient-checkpointing fallback
and a forward that drops the cache.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core.grpo import prefix
from core.interfaces import PromptInput


def test_segments_are_runs_of_one_prompt_object():
    a, b = PromptInput([], "a", []), PromptInput([], "a", [])  # equal text, different groups
    assert prefix.segments([a, a, b, b, b, a]) == [[0, 1], [2, 3, 4], [5]]


def test_layer_cost_prefers_plain_rows_for_long_completions():
    # G=8, prompt 150, completions 64, hidden 384: one packed row is cheaper than 8 plain rows
    assert prefix.layer_cost(1, 150 + 8 * 64, 384) < prefix.layer_cost(8, 150 + 64, 384)
    # completions of 2048 tokens after a 100-token prompt: the packed row's attention dominates
    assert prefix.layer_cost(1, 100 + 8 * 2048, 2048) > prefix.layer_cost(8, 100 + 2048, 2048)


@pytest.mark.parametrize("impl,family_on,want", [
    ("sdpa", True, True), ("eager", True, True), ("flash_attention_2", True, False), ("sdpa", False, False),
])
def test_can_share_prefix(impl, family_on, want):
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl))
    assert prefix.can_share_prefix(SimpleNamespace(prefix_sharing=family_on), model) is want


def test_packed_layout_mask_positions_and_read_positions(tmp_path):
    from vlmr1_qwen_vl.family import Qwen25VLFamily

    from core.testing.models import make_images, make_messages

    fam = Qwen25VLFamily.from_options({})
    path = Qwen25VLFamily.build_tiny_checkpoint(tmp_path / "tiny")
    model, proc = fam.load_model(path, dtype=torch.float32), fam.load_processor(path)
    p1 = PromptInput(make_messages(1), fam.render_prompt(proc, make_messages(1)), make_images(1))
    p0 = PromptInput(make_messages(0), fam.render_prompt(proc, make_messages(0)), [])
    comp = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]])
    pk = prefix.pack(fam, model, proc, [p1, p1, p0], comp, force=True)
    ids, mask, pos = pk.inputs["input_ids"], pk.inputs["attention_mask"], pk.inputs["position_ids"]
    assert pk.inputs["pixel_values"].shape[0] == proc(text=[p1.text], images=p1.images,
                                                      return_tensors="pt")["pixel_values"].shape[0]
    L1 = len(proc(text=[p1.text], images=p1.images)["input_ids"][0])
    assert ids.shape[0] == 2 and ids[0, L1:L1 + 6].tolist() == [11, 12, 13, 21, 22, 23]
    assert pos.shape[:2] == (3, 2)
    nxt = int(pos[:, 0, :L1].max()) + 1  # both completions restart at the prompt's next position
    assert pos[:, 0, L1:L1 + 3].tolist() == [[nxt, nxt + 1, nxt + 2]] * 3
    assert pos[:, 0, L1 + 3:L1 + 6].tolist() == [[nxt, nxt + 1, nxt + 2]] * 3
    m = mask[0, 0]
    second = L1 + 3  # first token of completion 2
    assert m[second, :L1].all() and not m[second, L1:L1 + 3].any() and m[second, second]
    assert not m[L1 - 1, L1:].any()  # prompt never sees completions
    # log-prob reads: the prompt's last position predicts both first tokens
    assert pk.positions[0, :6].tolist() == [L1 - 1, L1, L1 + 1, L1 - 1, second, second + 1]
    assert pk.targets[0, :6].tolist() == [11, 12, 13, 21, 22, 23]
    assert pk.rows.tolist() == [0, 0, 1] and pk.cols[1].tolist() == [3, 4, 5]


def test_engine_step_with_prefix_sharing_matches_the_plain_path(tmp_path, monkeypatch):
    """One engine step (beta > 0, mu = 2, two micro-batches) four ways: same loss, KL, grad norm.

    Plain rows; the cached prefix (its call cost set to 0 so the rule picks it on this tiny
    model); packed because the rule prefers it on this tiny model; packed because gradient
    checkpointing rules the cache out.
    """
    import json

    from core.config import build_config
    from core.grpo import update
    from core.grpo.trainer import run
    from core.plugins import PluginHost
    from core.plugins.plan import make_plan

    calls: dict[str, int] = {}
    for fn in ("cached_logprobs", "packed_logprobs", "completion_logprobs"):
        real = getattr(update, fn)
        monkeypatch.setattr(update, fn, lambda *a, _f=real, _n=fn, **k: (
            calls.__setitem__(_n, calls.get(_n, 0) + 1), _f(*a, **k))[1])
    results, used = {}, {}
    for shared in (False, "cached", "packed-by-cost", "packed-gc"):
        calls.clear()
        monkeypatch.setattr(prefix, "CACHED_CALL_FLOPS", 0 if shared == "cached" else 5e7)
        out = tmp_path / f"out-{shared}"
        raw = {
            "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "tiny"), "tiny": {"hidden_size": 64}},
            "task": {"name": "synthetic_color", "options": {"num_train": 8, "num_eval": 2}},
            "rewards": [{"name": "default"}],
            "grpo": {"num_generations": 4, "max_completion_length": 6, "beta": 0.04, "num_iterations": 2,
                     "prefix_sharing": bool(shared)},
            "train": {"learning_rate": 1e-3, "per_device_batch_size": 4, "gradient_accumulation_steps": 2,
                      "max_steps": 1, "seed": 5, "gradient_checkpointing": shared == "packed-gc"},
            "logging": {"output_dir": str(out), "tensorboard": False, "progress_bar": False, "plot": False,
                        "log_completions_every": 0},
            "checkpoint": {"save_final": False},
            "eval": {"enabled": False},
        }
        host = PluginHost()
        assert run(make_plan(build_config(raw), host.registry), host.registry) == 0
        results[shared] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        used[shared] = set(calls)
    # 2 micro-batches x (ref + old + 2 policy passes); the rollout's own log-probs are not these
    assert used == {False: {"completion_logprobs"}, "cached": {"cached_logprobs"},
                    "packed-by-cost": {"packed_logprobs"}, "packed-gc": {"packed_logprobs"}}
    plain = results[False]
    for shared in ("cached", "packed-by-cost", "packed-gc"):
        assert results[shared]["completion_length"] == plain["completion_length"]  # same rollout
        for key in ("loss", "kl", "grad_norm"):
            assert results[shared][key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), (shared, key)


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    """The shared tiny Qwen2.5-VL (tests/conftest.py) and prompts with 0, 1 and 2 images."""
    from core.testing.models import make_images, make_messages

    fam, model, proc = tiny_qwen
    prompts = [PromptInput(make_messages(k), fam.render_prompt(proc, make_messages(k)), make_images(k))
               for k in (0, 1, 2)]
    return fam, model, proc, prompts


def _plain_lp(fam, model, proc, rows, ids, mask):
    from core.grpo.logprobs import build_train_inputs, completion_logprobs

    rep = fam.process(proc, [r.text for r in rows], [r.images for r in rows])
    return completion_logprobs(model, build_train_inputs(rep, ids, mask, fam.per_token_keys), ids.shape[1])


def _uneven_rows(prompts):
    """Groups of 2, 1 and 3 rows (a micro-batch may cut groups), completions of 1 to 6 tokens."""
    from core.grpo.logprobs import pad_completions

    p0, p1, p2 = prompts
    rows = [p1, p1, p0, p2, p2, p2]
    ids, mask = pad_completions([[20 + r + i for i in range(1 + r)] for r in range(len(rows))], 0)
    return rows, ids, mask


def test_prefer_cached_weighs_saved_attention_against_the_extra_call():
    def batch(prompt_len, groups):  # `groups` prompts of prompt_len tokens, each with G = 8 rows
        prompts = [p for i in range(groups) for p in [PromptInput([], f"p{i}", [])] * 8]
        return {"attention_mask": torch.ones(groups, prompt_len, dtype=torch.long)}, prompts

    # the tiny quickstart model: hidden 64, 34-token prompts, 8 tokens: packing's waste is small
    assert not prefix.prefer_cached(*batch(34, 4), t=8, hidden=64)
    # the benchmark's vision model: hidden 384, 147-token prompts, 64 tokens: ~0.9 GFLOP per layer saved
    assert prefix.prefer_cached(*batch(147, 2), t=64, hidden=384)
    assert prefix.prefer_cached(*batch(34, 4), t=256, hidden=64)  # long completions: quadratic waste


def test_can_cache_prefix_needs_the_opt_in_a_cache_and_no_checkpointing(qwen):
    fam, model, _, _ = qwen
    assert prefix.can_cache_prefix(fam, model)
    assert not prefix.can_cache_prefix(SimpleNamespace(prefix_sharing=False), model)

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):  # no position_ids, no cache
            return input_ids

    assert not prefix.can_cache_prefix(fam, NoCache())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert not prefix.can_cache_prefix(fam, model)  # checkpointed layers drop the cache in training
        assert prefix.can_share_prefix(fam, model)  # the engine packs instead
    finally:
        model.gradient_checkpointing_disable()
    assert prefix.can_cache_prefix(fam, model)


def test_cached_layout_positions_and_first_token_reads(qwen):
    fam, model, proc, prompts = qwen
    rows, ids, _ = _uneven_rows(prompts)
    c = prefix.prepare_cached(fam, model, proc, rows, ids)
    assert c.prompt["input_ids"].shape[0] == 3  # one row per unique prompt (p1, p0, p2)
    assert c.select.tolist() == [0, 0, 1, 2, 2, 2]
    assert c.first_cols.tolist() == [0, 1, 0, 0, 1, 2]
    assert c.first_targets[c.select, c.first_cols].tolist() == ids[:, 0].tolist()
    width, t = c.prompt["input_ids"].shape[1], ids.shape[1]
    assert (c.first_positions == width - 1).all()  # left padding: every prompt ends at the last column
    assert c.completion["attention_mask"].shape == (6, width + t)
    pos = c.prompt["position_ids"]
    for r in range(6):  # token i of a completion sits at the prompt's next position + i, on every axis
        nxt = int(pos[:, c.select[r]].max()) + 1
        assert c.completion["position_ids"][:, r].tolist() == [list(range(nxt, nxt + t))] * 3


def test_cached_prefix_equals_the_plain_path_on_uneven_groups(qwen):
    fam, model, proc, prompts = qwen
    rows, ids, mask = _uneven_rows(prompts)
    grads = {}
    for name, fn in (("plain", lambda: _plain_lp(fam, model, proc, rows, ids, mask)),
                     ("cached", lambda: prefix.cached_logprobs(model, prefix.prepare_cached(fam, model, proc, rows,
                                                                                             ids)))):
        model.zero_grad(set_to_none=True)
        lp = fn()
        (lp * mask).sum().backward()
        grads[name] = (lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    m = mask.bool()
    assert torch.allclose(grads["plain"][0][m], grads["cached"][0][m], atol=1e-5)
    gp, gc = grads["plain"][1], grads["cached"][1]
    assert gp.keys() == gc.keys() and any("visual" in n for n in gc)  # gradients reach the vision tower
    scale = max(g.abs().max() for g in gp.values())
    assert max((gp[n] - gc[n]).abs().max() for n in gp) <= 1e-4 * scale


def test_cached_prefix_with_lora(qwen):
    from peft import LoraConfig, get_peft_model

    fam, model, proc, prompts = qwen
    base = type(model).from_pretrained(model.name_or_path, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows, ids, mask = _uneven_rows(prompts)
    assert prefix.can_cache_prefix(fam, lora)
    want = _plain_lp(fam, lora, proc, rows, ids, mask)
    got = prefix.cached_logprobs(lora, prefix.prepare_cached(fam, lora, proc, rows, ids))
    assert torch.allclose(want[mask.bool()], got[mask.bool()], atol=1e-5)
    (got * mask).sum().backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)
    with lora.disable_adapter():  # the reference pass of a LoRA run
        ref = prefix.cached_logprobs(lora, prefix.prepare_cached(fam, lora, proc, rows, ids))
    assert not torch.allclose(ref[mask.bool()], got[mask.bool()].detach(), atol=1e-4)


def test_a_forward_that_drops_the_cache_is_refused(qwen):
    fam, model, proc, prompts = qwen
    rows, ids, _ = _uneven_rows(prompts)
    c = prefix.prepare_cached(fam, model, proc, rows, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:  # what can_cache_prefix guards against: these layers run without the cache in training
        with pytest.raises(RuntimeError, match="KV cache"):
            prefix.cached_logprobs(model, c)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
