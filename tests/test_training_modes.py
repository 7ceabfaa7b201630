"""Training modes on the quickstart config with a real tiny Qwen2.5-VL: full, LoRA, frozen vision,
gradient checkpointing, and merging a LoRA checkpoint into a plain transformers checkpoint.

Runs go through ``core.train.main`` in this process (the same code path as ``python -m
core.train``, without paying the interpreter and import start-up per run). The quickstart
config is shrunk to 1-2 steps of 2 prompts x 4 completions; the reward is ``default`` (a
fuzzy-match score) so that groups have non-zero variance and every step moves the weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart" / "config.yaml"
# Qwen2.5-VL's vision tower (incl. its merger) as saved (checkpoint key format) or as named in memory.
VISION_PREFIXES = ("visual.", "model.visual.")


def train_run(tmp: Path, name: str, *overrides: str) -> Path:
    """Run the shrunk quickstart in-process; returns its output folder."""
    from core.train import main

    out = tmp / name
    args = ["--config", str(QUICKSTART), f"model.path={tmp / 'tiny'}", "rewards.0.name=default",
            "grpo.num_generations=4", "train.per_device_batch_size=8", "grpo.beta=0.04",
            # free-text sampling and GRPO's group baseline (the quickstart uses guided choice + a batch baseline)
            "rollout.options.choices=null", "grpo.advantage_baseline=group", "grpo.scale_rewards=group",
            "train.lr_scheduler=constant", "train.warmup_steps=0",
            # one training-pass layout in every run: with gradient checkpointing the engine packs the
            # shared prefix instead of caching it (other rounding, and LoRA dropout draws its masks in
            # another order), so gc on/off could not be compared step for step; the layouts are
            # compared with each other in tests/test_prefix.py
            "grpo.prefix_sharing=false",
            "eval.enabled=false",
            f"logging.output_dir={out}", "logging.progress_bar=false", "logging.plot=false",
            "logging.tensorboard=false", "logging.log_completions_every=0", "checkpoint.save_every=1",
            "checkpoint.keep_last=5", *overrides]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assert main(args) == 0
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("modes")
    found = {"tmp": tmp}
    found["full"] = train_run(tmp, "full", "train.max_steps=2")  # also builds the tiny checkpoint
    found["full_gc"] = train_run(tmp, "full_gc", "train.max_steps=1", "train.gradient_checkpointing=true")
    found["frozen"] = train_run(tmp, "frozen", "train.max_steps=2", "train.mode=frozen_vision")
    lora = ("train.mode=lora", "train.lora.r=8", "train.lora.alpha=16", "train.learning_rate=1e-2")
    found["lora"] = train_run(tmp, "lora", "train.max_steps=2", *lora)
    found["lora_gc"] = train_run(tmp, "lora_gc", "train.max_steps=1", "train.gradient_checkpointing=true", *lora)
    return found


def _split(w: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    vision = {k: v for k, v in w.items() if k.startswith(VISION_PREFIXES)}
    return vision, {k: v for k, v in w.items() if k not in vision}


def test_full_mode_trains_language_model_and_vision_tower(runs):
    base = load_file(str(runs["tmp"] / "tiny" / "model.safetensors"))
    after = load_file(str(runs["full"] / "checkpoint-2" / "model.safetensors"))
    vb, lb = _split(base)
    va, la = _split(after)
    assert vb and lb
    assert any(not torch.equal(va[k], vb[k]) for k in vb), "full fine-tuning must move the vision tower too"
    assert any(not torch.equal(la[k], lb[k]) for k in lb)
    m = metrics(runs["full"])
    # The reference is the frozen base: identical to the policy at step 1, not after an update.
    assert m[0]["kl"] == 0.0 and m[1]["kl"] > 0.0


def test_frozen_vision_keeps_every_vision_weight_bit_identical(runs):
    base = load_file(str(runs["tmp"] / "tiny" / "model.safetensors"))
    after = load_file(str(runs["frozen"] / "checkpoint-2" / "model.safetensors"))
    vb, lb = _split(base)
    va, la = _split(after)
    assert va.keys() == vb.keys() and len(vb) > 10
    for k in vb:
        assert torch.equal(va[k], vb[k]), k
    changed = [k for k in lb if not torch.equal(la[k], lb[k])]
    assert len(changed) > len(lb) // 2, "the language model must train"


def test_lora_saves_an_adapter_that_never_touches_the_vision_tower(runs):
    ckpt = runs["lora"] / "checkpoint-2"
    assert not (ckpt / "model.safetensors").exists(), "a LoRA run saves the adapter, not the full model"
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert Path(cfg["base_model_name_or_path"]) == runs["tmp"] / "tiny"
    targets = cfg["target_modules"]
    targets = targets if isinstance(targets, list) else [targets]
    assert targets and not any("visual" in t or "lm_head" in t for t in targets)
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter), sorted(adapter)[:5]
    assert not any("visual" in k for k in adapter)
    # lora_B starts at zero: after training it is not, i.e. the adapter really learned.
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if ".lora_B." in k)
    m = metrics(runs["lora"])
    # KL to the adapter-disabled policy: 0 while lora_B is still 0 (step 1), > 0 once it moved.
    assert m[0]["kl"] == 0.0 and m[1]["kl"] > 0.0


def test_lora_reference_is_the_adapter_disabled_policy_not_a_copy(runs):
    """With beta > 0, the loader builds no second model under LoRA; only adapters train."""
    from accelerate import Accelerator

    from core.config import build_config, load_raw
    from core.plugins import PluginHost
    from core.plugins.plan import make_plan
    from core.runtime.loader import load_policy

    tmp = runs["tmp"]
    cfg = build_config(load_raw(QUICKSTART), [f"model.path={tmp / 'tiny'}", "grpo.beta=0.04", "train.mode=lora",
                                              "train.per_device_batch_size=8", "grpo.num_generations=4"])
    host = PluginHost(None)
    plan = make_plan(cfg, host.registry, 1)
    bundle = load_policy(plan, host.registry, phase="train", reference=True, accelerator=Accelerator(cpu=True))
    assert bundle.lora and bundle.ref_model is None
    names = [n for n, p in bundle.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("visual" in n for n in names)
    vision = bundle.family.vision_module_names(bundle.model)
    assert vision
    for v in vision:
        assert not any(p.requires_grad for p in bundle.model.get_submodule(v).parameters())
    # the same switch the trainer uses for reference log-probs exists and turns adapters off
    with bundle.model.disable_adapter():
        pass
    # and with gradient checkpointing the flag really reaches the model
    cfg_gc = build_config(load_raw(QUICKSTART), [f"model.path={tmp / 'tiny'}", "train.gradient_checkpointing=true"])
    plan_gc = make_plan(cfg_gc, host.registry, 1)
    full = load_policy(plan_gc, host.registry, phase="train", reference=plan_gc.config.grpo.beta > 0,
                       accelerator=Accelerator(cpu=True))
    assert full.model.is_gradient_checkpointing and full.ref_model is None  # quickstart beta is 0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_step(runs, mode):
    """One step with and without gradient checkpointing: same loss, grad norm and weights."""
    plain, gc = runs[mode], runs[f"{mode}_gc"]
    a, b = metrics(plain)[0], metrics(gc)[0]
    assert a["reward"] == b["reward"]  # same rollout (same seeds, same weights before the step)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["grad_norm"] > 0 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    fname = "model.safetensors" if mode == "full" else "adapter_model.safetensors"
    wa = load_file(str(plain / "checkpoint-1" / fname))
    wb = load_file(str(gc / "checkpoint-1" / fname))
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff < 1e-6, diff


def test_merge_lora_gives_a_plain_checkpoint_with_the_adapter_model_outputs(runs, tmp_path):
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = runs["lora"] / "checkpoint-2"
    out = tmp_path / "merged"
    proc = run_command([sys.executable, "-m", "core.merge_lora", str(ckpt), "--out", str(out)], cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("model.safetensors", "config.json", "generation_config.json", "processor_config.json",
              "tokenizer.json"):
        assert (out / f).is_file(), f
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    processor = AutoProcessor.from_pretrained(out)
    base = AutoModelForImageTextToText.from_pretrained(runs["tmp"] / "tiny")
    adapted = PeftModel.from_pretrained(base, str(ckpt)).eval()

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 56), (200, 30, 30))], return_tensors="pt")
    with torch.no_grad():
        la = adapted(**inputs).logits
        lm = merged(**inputs).logits
        with adapted.disable_adapter():
            l0 = adapted(**inputs).logits
        ga = adapted.generate(**inputs, max_new_tokens=8, do_sample=False)
        gm = merged.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert (la - l0).abs().max() > 1e-3, "the adapter must change the outputs, or the comparison proves nothing"
    assert (la - lm).abs().max() < 1e-4, float((la - lm).abs().max())
    assert torch.equal(ga, gm)


def test_merge_lora_rejects_a_full_checkpoint(runs, tmp_path):
    from core.merge_lora import main

    assert main([str(runs["full"] / "checkpoint-2"), "--out", str(tmp_path / "x")]) == 2
