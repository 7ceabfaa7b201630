"""GRPO maths: hand-computed cases, and TRL's own loss code on the same inputs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from core.grpo.loss import LossNormalizer, group_advantages, grpo_loss


def norm_for(mask: torch.Tensor, max_len: int | None = None) -> LossNormalizer:
    return LossNormalizer(num_sequences=mask.shape[0], num_tokens=int(mask.sum()),
                          max_completion_length=max_len or mask.shape[1])


# ---- advantages -------------------------------------------------------------------------
def test_group_advantages_hand_computed():
    # group 1: rewards 1, 0 -> mean 0.5, unbiased std sqrt(0.5); group 2: all equal -> zero advantage
    adv, std = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), group_size=2, eps=1e-4)
    s = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0], abs=1e-6)
    assert std.tolist() == pytest.approx([s, 0.0], abs=1e-6)


def test_group_advantages_batch_and_none_scaling():
    r = torch.tensor([3.0, 1.0, 0.0, 0.0])
    adv_none, _ = group_advantages(r, 2, scale="none")
    assert adv_none.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    adv_b, _ = group_advantages(r, 2, scale="batch", eps=0.0)
    assert adv_b.tolist() == pytest.approx((torch.tensor([1.0, -1.0, 0.0, 0.0]) / r.std()).tolist())
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_batch_baseline_scores_a_group_that_agrees():
    # Step mean = (3 + 1 + 0 + 0) / 4 = 1: the agreeing group (0, 0) gets -1 each, not 0 as with the group mean.
    r = torch.tensor([3.0, 1.0, 0.0, 0.0])
    adv, std = group_advantages(r, 2, scale="none", baseline="batch")
    assert adv.tolist() == pytest.approx([2.0, 0.0, -1.0, -1.0])
    assert std.tolist() == pytest.approx([math.sqrt(2.0), 0.0])  # group std still reported for dynamic sampling
    adv_b, _ = group_advantages(r, 2, scale="batch", eps=0.0, baseline="batch")
    assert adv_b.tolist() == pytest.approx((torch.tensor([2.0, 0.0, -1.0, -1.0]) / r.std()).tolist())
    with pytest.raises(ValueError, match="baseline must be group or batch"):
        group_advantages(r, 2, baseline="leave_one_out")


def test_failed_rows_are_left_out_of_the_advantages_hand_computed():
    """Rows whose reward failed (their 0 was filled in by on_error) get no advantage and no say in mean/std."""
    r = torch.tensor([1.0, 0.0, 3.0, 5.0,    # group 0: row 1 failed -> valid 1, 3, 5: mean 3, std 2
                      2.0, 0.0, 0.0, 0.0,    # group 1: only row 4 valid -> std 0, advantage 0
                      0.0, 0.0, 0.0, 0.0])   # group 2: every row failed
    valid = torch.tensor([True, False, True, True, True, False, False, False, False, False, False, False])
    adv, std = group_advantages(r, 4, eps=1e-6, valid=valid)
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-5)
    assert std.tolist() == pytest.approx([2.0, 0.0, 0.0])
    # Zero-filled (before): the failed row pulls the mean to 2.25 and itself gets a negative advantage.
    zero_filled, _ = group_advantages(r[:4], 4, eps=0.0)
    assert zero_filled[1] < -0.5 and zero_filled[0] != pytest.approx(-1.0)
    # Batch baseline and scale: over the valid rows 1, 3, 5, 2 only (mean 2.75, unbiased std sqrt(8.75 / 3)).
    adv_b, _ = group_advantages(r, 4, scale="batch", eps=0.0, baseline="batch", valid=valid)
    s = math.sqrt(8.75 / 3)
    assert adv_b.tolist() == pytest.approx([-1.75 / s, 0.0, 0.25 / s, 2.25 / s, -0.75 / s] + [0.0] * 7)
    # All valid: exactly the unmasked computation.
    full = torch.tensor([1.0, 0.0, 2.0, 2.0])
    assert group_advantages(full, 2, valid=torch.ones(4, dtype=torch.bool))[0].tolist() == \
        group_advantages(full, 2)[0].tolist()


def test_phase_advantages_masks_failed_rows_out_of_the_loss_and_counts_them():
    """The trainer's advantages phase: failed rows get advantage 0, keep=False, and rewards/failed_rows."""
    from core.grpo.batch import StepBatch
    from core.grpo.trainer import GRPOTrainer

    def phase(mode: str, rank: int) -> StepBatch:
        grpo = SimpleNamespace(scale_rewards="group", advantage_eps=1e-6, advantage_baseline="group",
                               zero_variance_groups=mode)
        trainer = SimpleNamespace(cfg=SimpleNamespace(grpo=grpo), G=4, rank=rank, per_rank=4)
        b = StepBatch(0, all_rewards=torch.tensor([1.0, 0.0, 3.0, 5.0, 2.0, 0.0, 0.0, 0.0]),
                      all_failed=torch.tensor([False, True, False, False, False, True, True, True]))
        GRPOTrainer.phase_advantages(trainer, b)  # type: ignore[arg-type]
        return b

    b = phase("keep", 0)
    assert b.advantages.tolist() == pytest.approx([-1.0, 0.0, 0.0, 1.0], abs=1e-5)
    assert b.keep.tolist() == [True, False, True, True]
    assert b.sampling["rewards/failed_rows"] == 4.0  # over all ranks
    b = phase("drop", 1)  # group 1 has one valid row: zero variance, dropped as a whole
    assert b.keep.tolist() == [False, False, False, False] and b.sampling["dynamic/dropped_groups"] == 1.0
    b = phase("drop", 0)
    assert b.keep.tolist() == [True, False, True, True]


def test_batch_baseline_with_group_scaling_is_refused():
    from core.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="advantage_baseline=batch needs grpo.scale_rewards=batch or none"):
        build_config({}, ["grpo.advantage_baseline=batch", "grpo.scale_rewards=group"])


# ---- loss ----------------------------------------------------------------------------------
def test_clipped_surrogate_hand_computed():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.5]])
    mask = torch.ones(1, 2)
    out = grpo_loss(logps, old, None, torch.tensor([1.0]), mask, norm_for(mask), epsilon_low=0.2, epsilon_high=0.2)
    # token 1: ratio e^0.2 = 1.2214 > 1.2 -> clipped term 1.2; token 2: ratio e^-0.5 = 0.6065 (unclipped min)
    expected = -(1.2 + math.exp(-0.5)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.clipped_tokens == 1 and out.high_clipped_tokens == 1 and out.low_clipped_tokens == 0
    out.loss.backward()
    # clipped token has zero gradient; the other has d/dlogp = -ratio * A / 2
    assert logps.grad[0].tolist() == pytest.approx([0.0, -math.exp(-0.5) / 2], abs=1e-6)


def test_epsilon_high_widens_only_the_upper_clip():
    logps = torch.tensor([[-1.0]])
    old = torch.tensor([[-1.2]])  # ratio 1.2214
    mask = torch.ones(1, 1)
    tight = grpo_loss(logps, old, None, torch.tensor([1.0]), mask, norm_for(mask), epsilon_low=0.2, epsilon_high=0.2)
    wide = grpo_loss(logps, old, None, torch.tensor([1.0]), mask, norm_for(mask), epsilon_low=0.2, epsilon_high=0.28)
    assert float(tight.loss) == pytest.approx(-1.2)
    assert float(wide.loss) == pytest.approx(-math.exp(0.2), abs=1e-6)


def test_k3_kl_hand_computed():
    logps = torch.tensor([[-1.0]])
    ref = torch.tensor([[-1.5]])
    mask = torch.ones(1, 1)
    out = grpo_loss(logps, None, ref, torch.tensor([0.0]), mask, norm_for(mask), beta=0.5)
    k3 = math.exp(-0.5) + 0.5 - 1  # exp(ref - logp) - (ref - logp) - 1
    assert out.kl_sum == pytest.approx(k3, abs=1e-6)
    assert float(out.loss) == pytest.approx(0.5 * k3, abs=1e-6)


def test_aggregations_hand_computed():
    # two sequences of lengths 1 and 3, on-policy, advantages 1 and -1, per-token loss = -A
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1.0, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    n = norm_for(mask, max_len=4)
    loss = {t: float(grpo_loss(logps, None, None, adv, mask, n, loss_type=t).loss)
            for t in ("grpo", "bnpo", "dr_grpo", "dapo")}
    assert loss["grpo"] == pytest.approx((-1 + 1) / 2)  # per-sequence means -1 and +1
    assert loss["bnpo"] == pytest.approx((-1 + 3) / 4)  # token sum 2 over 4 tokens
    assert loss["dr_grpo"] == pytest.approx(2 / (2 * 4))  # over sequences x max length
    assert loss["dapo"] == pytest.approx(2 / 4)


def test_sequence_level_ratio():
    logps = torch.tensor([[-1.0, -1.0]])
    old = torch.tensor([[-1.1, -0.9]])  # log-ratios +0.1, -0.1 -> sequence mean 0 -> ratio 1
    mask = torch.ones(1, 2)
    out = grpo_loss(logps, old, None, torch.tensor([2.0]), mask, norm_for(mask), importance_sampling_level="sequence")
    assert float(out.loss) == pytest.approx(-2.0, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_full_batch_loss(loss_type):
    g = torch.Generator().manual_seed(0)
    logps = (-torch.rand(4, 5, generator=g)).requires_grad_(True)
    old = logps.detach() + 0.1 * torch.randn(4, 5, generator=g)
    mask = torch.tensor([[1.0] * 5, [1.0] * 2 + [0.0] * 3, [1.0] * 4 + [0.0], [1.0] * 1 + [0.0] * 4])
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8])
    n = norm_for(mask, max_len=6)
    full = grpo_loss(logps, old, None, adv, mask, n, loss_type=loss_type).loss.detach()
    parts = sum(grpo_loss(logps[i:i + 2], old[i:i + 2], None, adv[i:i + 2], mask[i:i + 2], n,
                          loss_type=loss_type).loss for i in (0, 2))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


# ---- against TRL's own implementation -----------------------------------------------------
def trl_loss(logps, old, ref, adv, mask, *, beta, eps_low, eps_high, loss_type, level, max_len):
    """Run trl.GRPOTrainer._compute_loss on given log-probs (its model forward stubbed out)."""
    from accelerate import Accelerator
    from trl import GRPOTrainer

    t = GRPOTrainer.__new__(GRPOTrainer)
    t.__dict__.update(
        beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type,
        importance_sampling_level=level, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, max_completion_length=max_len,
        model=SimpleNamespace(training=True), accelerator=Accelerator(cpu=True),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _metrics={"train": defaultdict(list)},
    )
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    n, length = mask.shape
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, length, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return t._compute_loss(None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_trl(loss_type, level, beta):
    g = torch.Generator().manual_seed(1)
    n, length = 6, 7
    base = -torch.rand(n, length, generator=g) * 3
    old = base + 0.3 * torch.randn(n, length, generator=g)  # off-policy enough to clip
    ref = base + 0.2 * torch.randn(n, length, generator=g)
    mask = (torch.arange(length).unsqueeze(0) < torch.tensor([7, 3, 5, 1, 6, 4]).unsqueeze(1)).float()
    adv = torch.randn(n, generator=g)
    ours_lp = base.clone().requires_grad_(True)
    trl_lp = base.clone().requires_grad_(True)
    ours = grpo_loss(ours_lp, old, ref if beta else None, adv, mask, norm_for(mask, max_len=length), beta=beta,
                     epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, importance_sampling_level=level).loss
    theirs = trl_loss(trl_lp, old, ref, adv, mask, beta=beta, eps_low=0.2, eps_high=0.28, loss_type=loss_type,
                      level=level, max_len=length)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad, rtol=1e-5, atol=1e-7)
