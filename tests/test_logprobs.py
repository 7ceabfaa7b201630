"""Chunked log-probabilities: equal to a plain ``log_softmax`` and bounded in logits memory."""

from __future__ import annotations

import contextlib

import pytest
import torch

from core.grpo import logprobs
from core.grpo.logprobs import completion_logprobs, head_logprobs


@contextlib.contextmanager
def vocab_sized_saves(vocab: int):
    """Record the bytes of every tensor autograd saves whose last dimension is ``vocab``."""
    seen: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[-1] == vocab:
            seen.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def reference(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    return (head(hidden) / temp).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_head_logprobs_chunks_equal_plain_log_softmax_values_and_grads(temp):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    budget = 4 * 1000 * 5  # five rows per chunk: 8 chunks, the last one partial
    with vocab_sized_saves(1000) as saves:
        got = head_logprobs(head, hidden, targets, temp, budget)
    want = reference(head, hidden, targets, temp)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert max(saves, default=0) <= budget  # chunks are recomputed in backward, not kept
    g_got = torch.autograd.grad(got.sum(), [hidden, head.weight, head.bias])
    g_want = torch.autograd.grad(want.sum(), [hidden, head.weight, head.bias])
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_150k_vocabulary_logits_stay_within_the_budget(tmp_path, monkeypatch):
    """A tiny Qwen2.5-VL with a 150k vocabulary: full logits would be 16x the budget."""
    from vlmr1_qwen_vl.family import Qwen25VLFamily

    fam = Qwen25VLFamily.from_options({})
    path = Qwen25VLFamily.build_tiny_checkpoint(tmp_path / "tiny", hidden_size=32, num_heads=2, num_kv_heads=1,
                                                intermediate_size=64, vision_hidden_size=16, vision_depth=1)
    model = fam.load_model(path, dtype=torch.float32)
    vocab = 150_000
    model.resize_token_embeddings(vocab)
    torch.manual_seed(0)
    rows, t = 4, 24
    ids = torch.randint(0, 300, (rows, 8 + t))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    full_bytes = rows * (t + 1) * vocab * 4
    budget = full_bytes // 16
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET_BYTES", budget)
    with vocab_sized_saves(vocab) as unchunked:  # the hook sees the logits autograd keeps
        completion_logprobs(model, inputs, t, budget_bytes=full_bytes)
    assert sum(unchunked) >= full_bytes
    with vocab_sized_saves(vocab) as saves:
        got = completion_logprobs(model, inputs, t)
    assert sum(saves) <= budget, "logits of several chunks were kept for backward"
    got.sum().backward()
    g_got = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(**inputs, logits_to_keep=t + 1).logits[:, :-1]
    want = logits.log_softmax(-1).gather(-1, ids[:, -t:].unsqueeze(-1)).squeeze(-1)
    # float32 sums over 150k terms in a different order: ~1e-5 relative on log-probs near -12
    torch.testing.assert_close(got, want, atol=0, rtol=5e-5)
    want.sum().backward()
    torch.testing.assert_close(g_got, model.lm_head.weight.grad, atol=1e-6, rtol=1e-4)
