"""The ``vllm`` rollout engine in colocate mode against real vLLM (vLLM's CPU build, ``vllm-cpu``).

Colocate imports vLLM in the training process, so these tests run only in a Python where vllm
imports: the vllm-cpu environment with the project installed into it
(``plugins/rollouts/vllm/scripts/cpu_env.sh test`` builds it and runs them there; ``make
vllm-cpu-test``). Elsewhere they skip, saying so. The model is the tiny Qwen2.5-VL of
``scripts/build_tiny.py`` (the quickstart's, with heads of 32: vLLM's CPU attention takes head
sizes from 32). Each test starts vLLM once (~10 s on 2 idle cores, minutes on busy ones).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parents[1]
ROOT = HERE.parents[2]
CHOICES = ["red", "green", "blue", "yellow"]


def _vllm_importable() -> bool:
    """vllm imports here (a real one: test_vllm_engine.py puts fakes in sys.modules only inside its tests)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("VLLM_CPU_TESTS") == "0", reason="VLLM_CPU_TESTS=0"),
    pytest.mark.skipif(not _vllm_importable(),
                       reason="colocate needs vllm importable in this Python: run these in the vllm-cpu env "
                              "(plugins/rollouts/vllm/scripts/cpu_env.sh test; not built in CI)"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("vllm-colocate") / "tiny"
    subprocess.run([sys.executable, str(HERE / "scripts/build_tiny.py"), str(ckpt)], check=True, capture_output=True)
    return ckpt


def _env() -> dict[str, str]:
    # vLLM's small torch.compile'd ops take minutes with inductor + g++ on busy cores.
    return {**os.environ, "TORCH_COMPILE_DISABLE": os.environ.get("TORCH_COMPILE_DISABLE", "1"),
            "HF_HUB_OFFLINE": "1"}


def test_colocate_greedy_equals_builtin_engine_before_and_after_a_weight_sync(tiny, tmp_path):
    # In a subprocess: vLLM (external launcher) sets up torch.distributed and patches torch in its process.
    script = tmp_path / "parity.py"
    script.write_text(_PARITY_SCRIPT)
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, str(script), str(tiny), str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"parity script failed (timeout 1800 s for a busy machine):\n{proc.stderr[-6000:]}"
    r = json.loads(out.read_text())
    assert r["threads_after_setup"] == r["threads_before"] and r["set_num_threads_works"]
    for when in ("before", "after"):
        assert r[f"vllm_{when}"] == r[f"builtin_{when}"], f"greedy {when} the sync: vLLM vs built-in engine"
        assert r[f"vllm_text_{when}"] == r[f"builtin_text_{when}"]
    assert r["vllm_before"] != r["vllm_after"], "the sync changed nothing (the LM head was redrawn)"
    assert r["weight_sync_s"] > 0
    assert all(len(lp) == len(ids) for lp, ids in zip(r["logprobs"], r["vllm_after"], strict=True))


_PARITY_SCRIPT = '''
import json, sys
import torch
from PIL import Image
from vlmr1_vllm import VLLMRollout
from core.interfaces import PromptInput, RolloutContext, SamplingParams
from core.plugins import PluginHost

ckpt, out = sys.argv[1], sys.argv[2]
fam = PluginHost("qwen-vl").registry.get("models", "qwen2_5_vl")()
model, proc = fam.load_model(ckpt, dtype=torch.float32), fam.load_processor(ckpt)
ctx = RolloutContext(model=model, processor=proc, family=fam, device=torch.device("cpu"),
                     suppressed_token_ids=fam.suppressed_token_ids(proc, model))
r = {"threads_before": torch.get_num_threads()}
eng = VLLMRollout.from_options({"send_seed": False, "enforce_eager": True})
eng.setup(ctx)
r["threads_after_setup"] = torch.get_num_threads()
torch.set_num_threads(1)
r["set_num_threads_works"] = torch.get_num_threads() == 1
torch.set_num_threads(r["threads_before"])
local = PluginHost("none").registry.create("rollouts", "transformers", {})
local.setup(ctx)
one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this image?"}]}]
two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which differs?"}]}]
text = [{"role": "user", "content": [{"type": "text", "text": "Say a colour."}]}]
img = lambda c: Image.new("RGB", (56, 56), c)
prompts = [PromptInput(text, fam.render_prompt(proc, text), []),
           PromptInput(one, fam.render_prompt(proc, one), [img((220, 20, 20))]),
           PromptInput(one, fam.render_prompt(proc, one), [img((20, 20, 220))]),
           PromptInput(two, fam.render_prompt(proc, two), [img((20, 200, 20)), img((230, 220, 20))])]
greedy = SamplingParams(n=2, max_new_tokens=12, do_sample=False)
for when in ("before", "after"):
    if when == "after":  # a large change, so greedy completions must change; the same images again
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g))
        eng.sync_weights(model)
    got, want = eng.generate(prompts, greedy), local.generate(prompts, greedy)
    assert all(g[0].ids == g[1].ids for g in got)
    r["vllm_" + when], r["builtin_" + when] = [g[0].ids for g in got], [w[0].ids for w in want]
    r["vllm_text_" + when], r["builtin_text_" + when] = [g[0].text for g in got], [w[0].text for w in want]
r["logprobs"] = [g[0].logprobs for g in got]
r["weight_sync_s"] = eng.metrics()["rollout/weight_sync_s"]
eng.close()
json.dump(r, open(out, "w"))
'''


def test_grpo_with_colocated_vllm_via_core_train(tiny, tmp_path):
    # `python -m core.train` as a user runs it: the quickstart task and settings on the tiny model, vLLM
    # colocated (CPU build: no per-prompt seeds), guided choices as the built-in engine's token sequences.
    raw = yaml.safe_load((ROOT / "examples/quickstart/config.yaml").read_text())
    raw["model"] = {"path": str(tiny), "family": "qwen2_5_vl"}
    raw["rollout"] = {"name": "vllm", "options": {"mode": "colocate", "send_seed": False, "enforce_eager": True,
                                                  "choices": CHOICES}}
    cfg, out = tmp_path / "config.yaml", tmp_path / "run"
    cfg.write_text(yaml.safe_dump(raw))
    steps = 4
    proc = subprocess.run(
        [sys.executable, "-m", "core.train", "--config", str(cfg), f"train.max_steps={steps}",
         f"logging.output_dir={out}", "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
         "checkpoint.save_every=0", "eval.num_samples=16", "logging.log_completions_every=1",
         "train.warmup_steps=2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"core.train failed (timeout 1800 s for a busy machine):\n{log[-6000:]}"
    assert "Traceback" not in log, log[-6000:]  # e.g. vLLM's exit-time teardown after the trainer's
    assert "set_num_threads` after the thread binding" not in log.split("eval before training")[-1]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # Weights synced into vLLM before every rollout after the first (step 1 uses the checkpoint's).
    assert all(r["rollout/weight_sync_s"] > 0 for r in rows[1:])
    for r in rows:  # the rollout/trainer mismatch, measured every step
        assert r["rollout/logprobs_frac"] == 1.0
        for k in ("rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/kl_est"):
            assert math.isfinite(r[k]), (k, r)
        assert r["truncated_frac"] == 0.0
    comps = [json.loads(ln) for ln in (out / "completions.jsonl").read_text().splitlines()]
    assert len(comps) == steps * 128 and all(c["completion"] in CHOICES for c in comps)
    # Greedy after the syncs: the trainer's eval (vLLM, synced weights) scores the 16 eval samples as the
    # built-in engine does on the final checkpoint.
    ev = json.loads((out / "eval.json").read_text())
    raw["rollout"] = {"name": "transformers", "options": {"choices": CHOICES}}
    cfg_hf = tmp_path / "config_hf.yaml"
    cfg_hf.write_text(yaml.safe_dump(raw))
    hf = subprocess.run([sys.executable, "-m", "core.evaluate", "--config", str(cfg_hf), "--checkpoint", str(out),
                         "--limit", "16", "--out", str(tmp_path / "eval_hf"), "--quiet"],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    assert hf.returncode == 0, hf.stderr[-4000:]
    summary = json.loads((tmp_path / "eval_hf/summary.json").read_text())
    assert summary["datasets"] == ev["after"]["datasets"], (summary["datasets"], ev["after"]["datasets"])
