"""Rollout/trainer mismatch: the engine's sampled-token log-probs, the metrics, and the importance-sampling correction.

The weights are checked by hand and against TRL 1.16's formula (``GRPOTrainer._generate_and_score_completions``,
``vllm_importance_sampling_*``), the weighted loss by hand and against TRL's own ``_compute_loss``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from core.grpo.loss import IS_MODES, LossNormalizer, grpo_loss, rollout_is_weights, rollout_mismatch


def norm_for(mask: torch.Tensor, max_len: int | None = None) -> LossNormalizer:
    return LossNormalizer(num_sequences=mask.shape[0], num_tokens=int(mask.sum()),
                          max_completion_length=max_len or mask.shape[1])


def close(t: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(t, torch.tensor(expected, dtype=t.dtype), rtol=0, atol=1e-6)


# ---- weights and metrics, by hand -------------------------------------------------------------
TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -9.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, float("nan")], [-0.2, -4.5, -1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1's last token is padding


def test_token_weights_hand_computed():
    # diffs (trainer - sampler): row 0: 0.5, -1.0, NaN -> 0 (ratio 1); row 1: 0, 1.5, masked -> 0.
    r = [[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, math.exp(1.5), 1.0]]
    w = rollout_is_weights(TRAINER, SAMPLER, MASK, "token_truncate", clip_min=None, clip_max=3.0)
    close(w, [[r[0][0], r[0][1], 1.0], [1.0, 3.0, 1.0]])  # e^1.5 = 4.48 -> 3
    w = rollout_is_weights(TRAINER, SAMPLER, MASK, "token_truncate", clip_min=0.5, clip_max=3.0)
    assert w[0, 1].item() == pytest.approx(0.5)  # e^-1 = 0.37 -> 0.5
    w = rollout_is_weights(TRAINER, SAMPLER, MASK, "token_mask", clip_min=0.5, clip_max=3.0)
    close(w, [[r[0][0], 0.0, 1.0], [1.0, 0.0, 1.0]])


def test_sequence_weights_hand_computed():
    # Sequence ratio: exp of the *sum* of the masked differences (TRL's), one per row: [B, 1].
    w = rollout_is_weights(TRAINER, SAMPLER, MASK, "sequence_truncate", clip_max=3.0)
    assert w.shape == (2, 1)
    assert w.flatten().tolist() == pytest.approx([math.exp(-0.5), 3.0], abs=1e-6)  # e^1.5 -> 3
    w = rollout_is_weights(TRAINER, SAMPLER, MASK)  # TRL's defaults: sequence_mask, C_max 3, no C_min
    assert w.flatten().tolist() == pytest.approx([math.exp(-0.5), 0.0], abs=1e-6)


def test_truncate_without_bounds_and_unknown_mode_are_refused():
    with pytest.raises(ValueError, match="clip_min or clip_max"):
        rollout_is_weights(TRAINER, SAMPLER, MASK, "token_truncate", clip_min=None, clip_max=None)
    with pytest.raises(ValueError, match="sequence_mask"):
        rollout_is_weights(TRAINER, SAMPLER, MASK, "tokens")


def test_mismatch_stats_hand_computed():
    # Counted tokens: row 0's first two (the NaN one is left out), row 1's first two (the third is masked).
    d = [0.5, -1.0, 0.0, 1.5]
    s = rollout_mismatch(TRAINER, SAMPLER, MASK)
    assert s.tokens == 4
    assert s.abs_diff_sum == pytest.approx(sum(abs(x) for x in d))
    assert s.abs_diff_max == pytest.approx(1.5)
    assert s.kl_sum == pytest.approx(sum(math.exp(x) - 1 - x for x in d), rel=1e-6)  # k3 of KL(q || pi)
    assert rollout_mismatch(TRAINER, torch.full_like(SAMPLER, float("nan")), MASK).tokens == 0


# ---- the weighted loss ---------------------------------------------------------------------------
def test_weighted_loss_hand_computed():
    # One completion, two tokens, on-policy for the trainer (old = logps: ratio 1, no clipping), A = 1,
    # token IS weights 2 and 0.5: grpo loss = -(2 * 1 + 0.5 * 1) / 2; gradient per token = -w * A / 2.
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    w = torch.tensor([[2.0, 0.5]])
    out = grpo_loss(logps, None, None, torch.tensor([1.0]), mask, norm_for(mask), is_weights=w)
    assert out.loss.item() == pytest.approx(-1.25)
    out.loss.backward()
    close(logps.grad, [[-1.0, -0.25]])
    # With beta > 0 the k3 KL term is added after the weighting (TRL's order): it is not weighted.
    ref = torch.tensor([[-1.5, -2.0]])
    out = grpo_loss(logps.detach(), None, ref, torch.tensor([1.0]), mask, norm_for(mask), beta=0.1, is_weights=w)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert out.loss.item() == pytest.approx((-2.0 - 0.5 + 0.1 * k3) / 2, abs=1e-6)


def test_unit_weights_change_nothing():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 4, generator=g)
    old = logps + 0.3 * torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1.0] * 4, [1.0] * 2 + [0.0] * 2, [1.0] * 3 + [0.0]])
    adv = torch.tensor([1.0, -0.5, 0.3])
    base = grpo_loss(logps, old, None, adv, mask, norm_for(mask)).loss
    ones = grpo_loss(logps, old, None, adv, mask, norm_for(mask), is_weights=torch.ones(3, 1)).loss
    assert ones.item() == base.item()


def trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16's ratio, transcribed from ``GRPOTrainer._generate_and_score_completions``."""
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    min_val = clip_min if clip_min is not None else -math.inf
    max_val = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)


def trl_loss_with_is(logps, old, adv, mask, ratio, *, loss_type, level, max_len):
    """trl.GRPOTrainer._compute_loss with vLLM's importance-sampling correction on (model forward stubbed out)."""
    from accelerate import Accelerator
    from trl import GRPOTrainer

    t = GRPOTrainer.__new__(GRPOTrainer)
    t.__dict__.update(
        beta=0.0, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
        importance_sampling_level=level, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=True, vllm_importance_sampling_correction=True, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, max_completion_length=max_len,
        model=SimpleNamespace(training=True), accelerator=Accelerator(cpu=True),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _metrics={"train": defaultdict(list)},
    )
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    n, length = mask.shape
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, length, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
              "importance_sampling_ratio": ratio}
    return t._compute_loss(None, inputs)


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("clip", [(None, 3.0), (0.5, 2.0)])
def test_matches_trl(mode, loss_type, clip):
    g = torch.Generator().manual_seed(2)
    n, length = 6, 5
    old = -torch.rand(n, length, generator=g) * 3
    logps = old + 0.2 * torch.randn(n, length, generator=g)
    # Sampler log-probs: mostly close, some far (masked/truncated), one token unreported (NaN).
    sampler = old + 0.4 * torch.randn(n, length, generator=g)
    sampler[0, 1] = float("nan")
    mask = (torch.arange(length).unsqueeze(0) < torch.tensor([5, 3, 4, 1, 5, 2]).unsqueeze(1)).float()
    adv = torch.randn(n, generator=g)
    lo, hi = clip
    ours_w = rollout_is_weights(old, sampler, mask, mode, lo, hi)
    theirs_w = trl_is_ratio(old, sampler, mask, mode, lo, hi)
    torch.testing.assert_close(ours_w, theirs_w)
    assert (ours_w != 1).any()
    ours_lp, trl_lp = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    ours = grpo_loss(ours_lp, old, None, adv, mask, norm_for(mask), epsilon_low=0.2, epsilon_high=0.28,
                     loss_type=loss_type, is_weights=ours_w).loss
    theirs = trl_loss_with_is(trl_lp, old, adv, mask, theirs_w, loss_type=loss_type, level="token", max_len=length)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad, rtol=1e-5, atol=1e-7)


# ---- the config ----------------------------------------------------------------------------------
def test_config_defaults_are_trls_and_bad_bounds_are_refused():
    from core.config import GRPOConfig

    g = GRPOConfig()
    assert (g.rollout_is_correction, g.rollout_is_mode, g.rollout_is_max, g.rollout_is_min) == \
        (None, "sequence_mask", 3.0, None)
    with pytest.raises(ValueError, match="rollout_is_min"):
        GRPOConfig(rollout_is_min=3.0, rollout_is_max=2.0)
    with pytest.raises(ValueError, match="rollout_is_max"):
        GRPOConfig(rollout_is_mode="token_truncate", rollout_is_max=None)


# ---- the built-in engine's log-probs -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from core.plugins import PluginHost
    from core.testing.models import build_conformance_context

    try:
        fam_cls = PluginHost("qwen-vl").registry.get("models", "qwen2_5_vl")
    except LookupError as exc:
        pytest.skip(f"needs the qwen-vl plugin: {exc}")
    ctx = build_conformance_context(fam_cls, tmp_path_factory.mktemp("mismatch"), seed=0)
    return ctx.family, ctx.model, ctx.processor


def _sample(tiny, sampling, suppress=True, **options):
    """Completions of two prompts (text-only, one image) from the built-in engine, and the trainer's log-probs."""
    from PIL import Image

    from core.grpo.logprobs import build_train_inputs, completion_logprobs, pad_completions
    from core.interfaces import PromptInput, RolloutContext
    from core.plugins.builtin.rollout import TransformersRollout

    fam, model, proc = tiny
    msgs = [[{"role": "user", "content": [{"type": "text", "text": "Say something."}]}],
            [{"role": "user", "content": [{"type": "text", "text": "What colour?"}, {"type": "image"}]}]]
    images = [[], [Image.new("RGB", (28, 28), (0, 0, 255))]]
    prompts = [PromptInput(m, fam.render_prompt(proc, m), im) for m, im in zip(msgs, images, strict=True)]
    engine = TransformersRollout.from_options(options)
    suppressed = fam.suppressed_token_ids(proc, model) if suppress else []
    engine.setup(RolloutContext(model, proc, fam, torch.device("cpu"), suppressed))
    torch.manual_seed(0)
    comps = [c for group in engine.generate(prompts, sampling) for c in group]
    tok = getattr(proc, "tokenizer", proc)
    ids, mask = pad_completions([c.ids for c in comps], tok.pad_token_id)
    rep = [p for p in prompts for _ in range(sampling.n)]
    inputs = build_train_inputs(fam.process(proc, [p.text for p in rep], [p.images for p in rep]), ids, mask,
                                fam.per_token_keys)
    with torch.no_grad():
        trainer = completion_logprobs(model, inputs, ids.shape[1], sampling.temperature)
    sampler = torch.full_like(trainer, float("nan"))
    for i, c in enumerate(comps):
        assert c.logprobs is not None and len(c.logprobs) == len(c.ids)
        sampler[i, :len(c.ids)] = torch.tensor(c.logprobs)
    return comps, trainer, sampler, mask


def test_builtin_logprobs_equal_the_trainers_without_cuts(tiny):
    # Temperature only (no top-k/top-p/choices, no suppressed ids): the sampler's distribution is the trainer's,
    # up to float rounding.
    from core.interfaces import SamplingParams
    from core.testing.models import LOGPROB_ATOL

    sp = SamplingParams(n=4, max_new_tokens=6, temperature=1.5)
    _, trainer, sampler, mask = _sample(tiny, sp, suppress=False)
    m = mask.bool()
    assert not torch.isnan(sampler[m]).any()
    diff = (trainer - sampler)[m].abs().max().item()
    assert diff <= LOGPROB_ATOL, diff
    assert rollout_mismatch(trainer, sampler, mask).kl_sum / m.sum().item() < 1e-6
    # The family's suppressed ids (image pads) are cut from the sampler's distribution: each sampled token
    # gains the log of the mass they held, a small positive difference the trainer does not see.
    _, trainer, sampler, mask = _sample(tiny, sp)
    d = (sampler - trainer)[mask.bool()]
    assert (d > 0).all() and d.max() < 0.1, d


def test_builtin_logprobs_are_of_the_top_p_distribution(tiny):
    # top-p renormalises over the kept tokens: each sampled token is more likely under it than under the trainer's
    # full softmax, by exactly the log of the kept mass (strictly, wherever something was cut).
    from core.interfaces import SamplingParams

    _, trainer, sampler, mask = _sample(tiny, SamplingParams(n=4, max_new_tokens=6, temperature=1.0, top_p=0.3))
    m = mask.bool()
    d = (sampler - trainer)[m]
    assert (d >= -1e-4).all(), d.min()
    assert (d > 0.05).any(), d.max()


def test_builtin_logprobs_under_guided_choice_sum_to_one(tiny):
    # With choices, the sampler's distribution is over the choices alone: their sequence probabilities sum to 1.
    from core.interfaces import SamplingParams

    choices = ["red", "green", "blue", "yellow"]
    comps, _, _, _ = _sample(tiny, SamplingParams(n=48, max_new_tokens=4, temperature=2.0), choices=choices)
    per_prompt = [comps[:48], comps[48:]]
    for group in per_prompt:
        q = {c.text.strip(): math.exp(sum(c.logprobs)) for c in group}
        assert set(q) == set(choices), f"not every choice sampled in 48 draws at temperature 2: {sorted(q)}"
        assert sum(q.values()) == pytest.approx(1.0, abs=1e-4), q


def test_builtin_logprobs_can_be_turned_off(tiny):
    from core.interfaces import PromptInput, RolloutContext, SamplingParams
    from core.plugins.builtin.rollout import TransformersRollout

    fam, model, proc = tiny
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    engine = TransformersRollout.from_options({"return_logprobs": False})
    engine.setup(RolloutContext(model, proc, fam, torch.device("cpu"), fam.suppressed_token_ids(proc, model)))
    group = engine.generate([PromptInput(msgs, fam.render_prompt(proc, msgs))], SamplingParams(n=2, max_new_tokens=3))
    assert all(c.logprobs is None for c in group[0])


# ---- end to end: python -m core.train ----------------------------------------------------------
def _train(tmp, grpo: dict, rollout_options: dict | None = None):
    import os
    import sys
    from pathlib import Path

    import yaml

    from core.testing.procs import run_command

    root = Path(__file__).resolve().parents[1]
    cfg = {
        "model": {"family": "qwen2_5_vl", "path": str(tmp / "tiny"), "tiny": {"hidden_size": 64, "num_layers": 2}},
        "task": {"name": "synthetic_color", "options": {"num_train": 32, "num_eval": 4}},
        "rewards": [{"name": "all_match"}],
        "rollout": {"options": rollout_options or {}},
        "grpo": {"num_generations": 4, "max_completion_length": 4, "beta": 0.0, **grpo},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 8, "max_steps": 2, "seed": 3},
        "logging": {"output_dir": str(tmp / "out"), "progress_bar": False},
        "eval": {"num_samples": 4, "reward": "all_match"},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return run_command([sys.executable, "-m", "core.train", "--config", str(path)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)


def test_training_logs_the_mismatch_and_applies_the_correction(tmp_path):
    import json

    proc = _train(tmp_path, {"rollout_is_correction": True, "rollout_is_mode": "token_truncate"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/logprobs_frac" in r]
    assert len(rows) == 2, rows
    for r in rows:
        assert r["rollout/logprobs_frac"] == 1.0 and r["rollout/is_correction"] == 1.0
        # Only the suppressed image-pad ids' mass (~1% of a random 512-token model) separates the two.
        assert 0 < r["rollout/logprob_diff_mean"] < 0.1 and r["rollout/logprob_diff_max"] < 0.2, r
        assert 0 <= r["rollout/kl_est"] < 0.01, r
        assert 0.8 < r["rollout/is_weight_min"] <= r["rollout/is_weight_mean"] <= r["rollout/is_weight_max"] < 1.2


def test_built_in_engine_is_measured_not_corrected_by_default(tmp_path):
    import json

    proc = _train(tmp_path, {})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/logprobs_frac" in r]
    assert rows and all(r["rollout/is_correction"] == 0.0 and "rollout/logprob_diff_mean" in r for r in rows)
    assert not any("rollout/is_weight_mean" in r for r in rows)


def test_correction_without_engine_logprobs_is_a_clear_error(tmp_path):
    proc = _train(tmp_path, {"rollout_is_correction": True}, {"return_logprobs": False})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    err = proc.stderr
    assert "error:" in err and "grpo.rollout_is_correction" in err and "Traceback" not in err, err[-3000:]


def test_guided_choices_turn_the_default_correction_off():
    """An engine with a ``choices`` option samples a constrained distribution: ``guided()`` says so (the
    trainer's ``rollout_is_correction: null`` then stays off); without choices it does not."""
    from core.plugins.builtin.rollout import TransformersRollout

    assert TransformersRollout.from_options({"choices": ["red", "blue"]}).guided()
    assert not TransformersRollout.from_options({}).guided()
