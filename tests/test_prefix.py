"""Shared-prefix packing: when it applies, and the packed layout on a real tiny Qwen2.5-VL.

Equality with the plain path (log-probs, gradients, one vision pass per unique image) is the
``shared_prefix`` model-family conformance check, run by every family plugin's tests.
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


def test_engine_step_with_prefix_sharing_matches_the_plain_path(tmp_path):
    """One engine step (beta > 0, mu = 2, two micro-batches) both ways: same loss, KL, grad norm."""
    import json

    from core.config import build_config
    from core.grpo.trainer import run
    from core.plugins import PluginHost
    from core.plugins.plan import make_plan

    results = {}
    for shared in (False, True):
        out = tmp_path / f"out-{shared}"
        raw = {
            "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "tiny"), "tiny": {"hidden_size": 64}},
            "task": {"name": "synthetic_color", "options": {"num_train": 8, "num_eval": 2}},
            "rewards": [{"name": "default"}],
            "grpo": {"num_generations": 4, "max_completion_length": 6, "beta": 0.04, "num_iterations": 2,
                     "prefix_sharing": shared},
            "train": {"learning_rate": 1e-3, "per_device_batch_size": 4, "gradient_accumulation_steps": 2,
                      "max_steps": 1, "seed": 5},
            "logging": {"output_dir": str(out), "tensorboard": False, "progress_bar": False, "plot": False,
                        "log_completions_every": 0},
            "checkpoint": {"save_final": False},
            "eval": {"enabled": False},
        }
        host = PluginHost()
        assert run(make_plan(build_config(raw), host.registry), host.registry) == 0
        results[shared] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    plain, packed = results[False], results[True]
    assert plain["completion_length"] == packed["completion_length"]  # same rollout
    for key in ("loss", "kl", "grad_norm"):
        assert packed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
