"""Training modes under DeepSpeed on 2 CPU processes (gloo): LoRA, frozen vision, ZeRO-3 with CPU offload.

Each case is a 2-process ``accelerate launch`` through a shipped ``examples/multinode`` config
with ``--mixed_precision no`` and the one-process run of the same global batch in the same
``train.mode``; both take 2 steps of the quickstart (3 prompts x 4 completions, one group split
over the ranks, ``grpo.beta`` > 0, per-prompt sampling seeds: the same completions in both runs).
Step 1 and 2 reward, loss, KL and grad norm, and the weights saved after each step (the adapter
for LoRA, the whole model otherwise), must match within ``tests/test_multiprocess.py``'s
``ZERO_TOL`` (float32 summation order only; why these numbers: there).

- LoRA (ZeRO-2, ZeRO-3): only the adapters train and the reference is the policy with its
  adapters disabled, so under ZeRO-3 the reference log-probs also run on the sharded base.
  ``train.lora.dropout=0``: dropout masks are drawn per process, so with dropout a 2-process step
  is a different (equally valid) sample of the gradient, not the one-process one.
- frozen vision (ZeRO-3): the vision tower is frozen, and must come out bit-identical.
- ZeRO-3 with parameters and optimizer state offloaded to the CPU
  (``accelerate_zero3_offload.yaml``): on DeepSpeed's CPU accelerator the "offload" device is the
  device itself, so this checks the offload code paths (a separate fp32 master partition, the
  optimizer stepping on the CPU copy with torch's AdamW: ``zero_force_ds_cpu_optimizer: false``),
  not a memory saving; on GPUs it moves state off the device.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart" / "config.yaml"
MULTINODE = ROOT / "examples" / "multinode"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "DS_ACCELERATOR": "cpu"}
#: Same as tests/test_multiprocess.py ZERO_TOL (why: there): float32 summation order only.
TOL = {"loss": 1e-5, "kl_rel": 1e-4, "grad_norm_rel": 1e-5, "weights": 2e-5}
#: LoRA adapters: every element of B moves by ~lr (3e-3) per step (AdamW's first updates are
#: lr * g/(|g| + eps), B starting at zero), and A's gradients start near zero (B = 0), so rounding
#: in g shows more: measured 8.7e-6 after step 1 and 2.2e-5 after step 2, under ZeRO-2 and -3 alike.
#: 5e-5 is 1/60 of a step's move; a wrong reduction moves adapters by ~lr.
LORA_WEIGHTS_TOL = 5e-5

pytestmark = [pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs the deepspeed extra: pip install 'vlmr1[deepspeed]'")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(tmp: Path, out: str, per_device: int, mode: str) -> list[str]:
    return [f"model.path={tmp / 'tiny'}", "device.name=cpu", "rewards.0.name=default", "train.max_steps=2",
            f"train.per_device_batch_size={per_device}", "grpo.num_generations=4", "grpo.beta=0.04",
            f"train.mode={mode}", "rollout.options.seed_per_prompt=true", "rollout.options.choices=null",
            "grpo.advantage_baseline=group", "grpo.scale_rewards=group", "train.lr_scheduler=constant",
            "train.warmup_steps=0", "eval.enabled=false", f"logging.output_dir={tmp / out}",
            "logging.progress_bar=false", "logging.plot=false", "logging.tensorboard=false",
            "checkpoint.save_every=1", "checkpoint.keep_last=5", "train.distributed_timeout_s=120",
            # LoRA dropout masks come from each process's own random stream, so with dropout the
            # gradients depend on which process holds a row (measured: grad norm 1.085 vs 1.124)
            "train.lora.dropout=0"]


def _run(cmd: list[str]) -> str:
    # generous: a 2-process DeepSpeed start takes ~30 s on 2 idle cores, much longer on a busy machine
    proc = run_command(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("modes")


def _one(tmp: Path, mode: str) -> str:
    """The 1-process run of ``mode`` (once per module; the first also builds the tiny checkpoint)."""
    out = f"one_{mode}"
    if not (tmp / out / "metrics.jsonl").exists():
        _run([sys.executable, "-m", "core.train", "--config", str(QUICKSTART), *_overrides(tmp, out, 12, mode)])
    return out


def _weights(folder: Path, mode: str) -> dict:
    return load_file(str(folder / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors")))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.mark.parametrize(("config", "mode", "backend"), [
    ("zero2", "lora", "DeepSpeed ZeRO-2"),
    ("zero3", "lora", "DeepSpeed ZeRO-3"),
    ("zero3", "frozen_vision", "DeepSpeed ZeRO-3"),
    ("zero3_offload", "full", "DeepSpeed ZeRO-3 with optimizer and params offloaded to cpu"),
])
def test_mode_under_zero_on_two_processes_takes_the_one_process_steps(base, config, mode, backend):
    tmp = base
    one = _one(tmp, mode)
    out = f"{config}_{mode}"
    stdout = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(MULTINODE / f"accelerate_{config}.yaml"), "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                   "-m", "core.train", "--config", str(QUICKSTART), *_overrides(tmp, out, 6, mode)])
    assert f"backend: {backend} (gloo), 2 processes" in stdout.splitlines(), stdout[-2000:]
    record = json.loads((tmp / out / "backend.json").read_text())
    if config == "zero3_offload":  # what DeepSpeed was configured with (its offload code paths ran)
        assert (record["offload_optimizer"], record["offload_param"]) == ("cpu", "cpu")
    assert len(record["memory_per_rank"]) == 2
    m1, m2 = _jsonl(tmp / one / "metrics.jsonl"), _jsonl(tmp / out / "metrics.jsonl")
    assert [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2, strict=True):
        assert a["reward"] == b["reward"]  # the same completions, scored the same
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL["loss"])
        assert a["kl"] == pytest.approx(b["kl"], rel=TOL["kl_rel"], abs=1e-8)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=TOL["grad_norm_rel"])
    assert m1[1]["kl"] > 1e-4, "step 2's KL must be non-zero, or matching it proves nothing"
    start = load_file(str(tmp / "tiny" / "model.safetensors"))
    for step in (1, 2):
        w1 = _weights(tmp / one / f"checkpoint-{step}", mode)
        w2 = _weights(tmp / out / f"checkpoint-{step}", mode)
        assert w1.keys() == w2.keys()
        if mode != "lora":  # (LoRA's B starts at zero: any trained adapter differs from it)
            assert max(float((w1[k] - start[k]).abs().max()) for k in w1) > 1e-3, "the step must move the weights"
        diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        tol = LORA_WEIGHTS_TOL if mode == "lora" else TOL["weights"]
        assert diff < tol, f"{out} step {step}: max abs diff {diff:.3g} (tolerance {tol})"
        if mode == "frozen_vision":
            vision = [k for k in w2 if ".visual." in f".{k}"]
            assert vision and all(bool((w2[k] == start[k]).all()) for k in vision), "vision weights changed"
    if mode == "lora":
        assert max(float(v.abs().max()) for k, v in w2.items() if "lora_B" in k) > 1e-3, "the adapters must train"
