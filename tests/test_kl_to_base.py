"""``eval.kl_base``: KL(policy || a fixed base) on the eval prompts, checked against a direct computation.

The direct computation here runs each sampled completion alone (no padding, no batching), through
the model's ordinary forward with the full logits, and takes log-softmax itself; it shares no code
with :func:`core.grpo.base_kl.kl_to_base` beyond the model family's prompt rendering.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core.config import build_config
from core.evaluate import main
from core.grpo.base_kl import kl_to_base
from core.plugins import PluginHost
from core.plugins.plan import plan_without_groups
from core.runtime.evaluator import load_kl_base
from core.runtime.loader import load_policy

PLUGINS = "qwen-vl,synthetic,text"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Qwen2.5-VL, and a copy with noise added to its output head and last layer."""
    import torch

    reg = PluginHost(PLUGINS).registry
    try:
        fam_cls = reg.get("models", "qwen2_5_vl")
        reg.get("tasks", "synthetic_color")
    except LookupError as exc:
        pytest.skip(f"needs the qwen-vl, synthetic and text plugins: {exc}")
    root = tmp_path_factory.mktemp("kl")
    base = fam_cls.build_tiny_checkpoint(root / "base", seed=0)
    fam = fam_cls()
    model = fam.load_model(str(base), dtype=torch.float32, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lm_head" in name or "layers.1." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    perturbed = root / "perturbed"
    model.save_pretrained(perturbed, safe_serialization=True)
    fam.load_processor(str(base)).save_pretrained(perturbed)
    return Path(base), perturbed


def _config(policy: Path, **eval_opts) -> dict:
    return {
        "model": {"path": str(policy), "attn_implementation": "eager"},
        "task": {"name": "synthetic_color", "options": {"num_eval": 8, "seed": 0, "noise": 20}},
        "rewards": [{"name": "accuracy"}],
        "grpo": {"num_generations": 2, "max_completion_length": 6},
        "train": {"per_device_batch_size": 2},
        "eval": {"batch_size": 4, **eval_opts},
    }


def _setup(policy: Path):
    host = PluginHost(PLUGINS)
    plan = plan_without_groups(build_config(_config(policy)), host.registry)
    bundle = load_policy(plan, host.registry, phase="infer", device="cpu")
    engine = host.registry.create("rollouts", "transformers", plan.options["rollout"])
    from core.interfaces import RolloutContext

    engine.setup(RolloutContext(bundle.model, bundle.processor, bundle.family, "cpu", bundle.suppressed))
    samples = list(host.registry.create("tasks", "synthetic_color", plan.options["task"]).load("eval"))
    return plan, bundle, engine, samples


def _direct(bundle, base_model, sample, ids: list[int]) -> tuple[list[float], list[float]]:
    """Per token: log p - log q of the sampled token, and the exact KL(p || q) of that position."""
    import torch

    from core.runtime.generation import make_prompt

    p = make_prompt(bundle, sample)
    inputs = dict(bundle.family.process(bundle.processor, [p.text], [p.images]))
    n_prompt = inputs["input_ids"].shape[1]
    comp = torch.tensor([ids])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], comp], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    for key in bundle.family.per_token_keys:  # completion tokens are text tokens
        if isinstance(inputs.get(key), torch.Tensor) and inputs[key].shape[1] == n_prompt:
            inputs[key] = torch.cat([inputs[key], torch.zeros_like(comp, dtype=inputs[key].dtype)], 1)
    with torch.no_grad():
        lp = bundle.model(**inputs).logits[0, n_prompt - 1:-1].double().log_softmax(-1)
        lq = base_model(**inputs).logits[0, n_prompt - 1:-1].double().log_softmax(-1)
    picked = (lp.gather(1, comp.T) - lq.gather(1, comp.T))[:, 0].tolist()
    exact = (lp.exp() * (lp - lq)).sum(-1).tolist()
    return picked, exact


def test_kl_of_a_model_to_itself_is_zero(models):
    base, _ = models
    plan, bundle, engine, samples = _setup(base)
    ref = load_kl_base(plan, bundle, str(base))
    res = kl_to_base(bundle, engine, ref, samples, max_new_tokens=6, batch_size=4, samples_per_prompt=2)
    assert res["completions"] == 16 and res["tokens"] > 16, res
    assert abs(res["per_token"]) < 1e-6 and abs(res["per_sequence"]) < 1e-6, res


def test_kl_to_a_perturbed_copy_matches_a_direct_computation(models):
    base, perturbed = models
    plan, bundle, engine, samples = _setup(perturbed)
    ref = load_kl_base(plan, bundle, str(base))
    res = kl_to_base(bundle, engine, ref, samples, max_new_tokens=6, batch_size=3, samples_per_prompt=4,
                     keep_rows=True)
    picked_all, exact_all = [], []
    for sample, ids, summed in res["rows"]:
        picked, exact = _direct(bundle, ref, sample, ids)
        assert summed == pytest.approx(sum(picked), abs=1e-4), (sample.id, ids)
        picked_all += picked
        exact_all += exact
    n = len(picked_all)
    assert res["tokens"] == n and res["completions"] == 32
    est = sum(picked_all) / n
    assert res["per_token"] == pytest.approx(est, abs=1e-5)
    assert res["per_sequence"] == pytest.approx(sum(picked_all) / 32, abs=1e-4)
    # The estimate is unbiased for the exact per-position KL on the same sampled prefixes: within
    # 5 standard errors of it (a loose bound: this fails on a systematic error, not on noise).
    exact = sum(exact_all) / n
    sd = math.sqrt(sum((x - est) ** 2 for x in picked_all) / (n - 1))
    assert exact > 1e-3, "the perturbation should move the distribution measurably"
    assert abs(est - exact) < 5 * sd / math.sqrt(n) + 1e-6, (est, exact, sd, n)


def test_core_evaluate_reports_kl_and_refuses_a_missing_base(models, tmp_path, capsys):
    base, perturbed = models
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_config(perturbed, kl_samples_per_prompt=2)))
    out = tmp_path / "out"
    rc = main(["--config", str(cfg), "--out", str(out), "--plugins", PLUGINS, "--quiet", f"eval.kl_base={base}"])
    assert rc == 0
    kl = json.loads((out / "summary.json").read_text())["kl_to_base"]
    assert kl["base"] == str(base) and kl["completions"] == 16 and kl["per_token"] > 0
    assert "KL(policy ||" in capsys.readouterr().out
    out2 = tmp_path / "out2"
    assert main(["--config", str(cfg), "--out", str(out2), "--plugins", PLUGINS, "--quiet",
                 f"eval.kl_base={base}"]) == 0
    assert json.loads((out2 / "summary.json").read_text())["kl_to_base"] == kl, "seeded: the same estimate"
    rc = main(["--config", str(cfg), "--out", str(tmp_path / "o3"), "--plugins", PLUGINS, "--quiet",
               f"eval.kl_base={tmp_path / 'nope'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "eval.kl_base" in err and "does not exist" in err and "Traceback" not in err
