"""FSDP2 on 2 CPU processes (gloo) through the shipped ``examples/multinode/accelerate_fsdp.yaml``.

accelerate 1.16 enables FSDP only on accelerator devices; ``build_accelerator`` forces its FSDP2
state on the CPU (``core/runtime/distributed.py``: ``_force_fsdp2``), so this is accelerate's
own FSDP2 path (``fully_shard`` per decoder/vision block, DTensor parameters) on gloo.

One 2-process launch (``--mixed_precision no``) and the one-process run of the same global batch
(3 prompts x 4 completions, one group split over the ranks, ``grpo.beta`` > 0, per-prompt
sampling seeds: the same completions in both), 2 steps each, with in-training evaluation of 3
samples before and after (uneven shards, 2 + 1: generation must not run collectives, or the ranks
stop matching; the process-group timeout of 120 s turns a hang into a failure). Step 1 and 2
reward, loss, KL and grad norm, and the weights saved after each step, must match within
``tests/test_multiprocess.py``'s ``ZERO_TOL`` (float32 summation order only; measured here: grad
norm rel 7e-7, weights 6.2e-6 after each step, which moves weights by ~3e-3). The grad norm
(1.8 at step 1) exceeds ``train.max_grad_norm`` = 1, so matching weights also prove clipping over
the sharded (DTensor) parameters. Then save -> ``--resume`` from ``checkpoint-1`` (each process's
optimizer shard, ``optimizer_rank<r>``) must give bit-identical step-2 weights.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart" / "config.yaml"
FSDP_YAML = ROOT / "examples" / "multinode" / "accelerate_fsdp.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
#: Same as tests/test_multiprocess.py ZERO_TOL (why: there): float32 summation order only.
TOL = {"loss": 1e-5, "kl_rel": 1e-4, "grad_norm_rel": 1e-5, "weights": 2e-5}

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(tmp: Path, out: str, per_device: int) -> list[str]:
    return [f"model.path={tmp / 'tiny'}", "device.name=cpu", "rewards.0.name=default", "train.max_steps=2",
            f"train.per_device_batch_size={per_device}", "grpo.num_generations=4", "grpo.beta=0.04",
            "rollout.options.seed_per_prompt=true", "rollout.options.choices=null",
            "grpo.advantage_baseline=group", "grpo.scale_rewards=group", "train.lr_scheduler=constant",
            "train.warmup_steps=0", "eval.enabled=true", "eval.num_samples=3", "eval.batch_size=2",
            f"logging.output_dir={tmp / out}", "logging.progress_bar=false", "logging.plot=false",
            "logging.tensorboard=false", "checkpoint.save_every=1", "checkpoint.keep_last=5",
            "train.distributed_timeout_s=120"]


def _launch(tmp: Path, out: str, *extra: str) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_YAML), "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "core.train", "--config", str(QUICKSTART), *_overrides(tmp, out, 6), *extra]
    return _run(cmd)


def _run(cmd: list[str]) -> str:
    # generous: a 2-process start takes ~25 s on 2 idle cores, much longer on a busy machine
    proc = run_command(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def _max_diff(a: Path, b: Path) -> float:
    w1, w2 = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert w1.keys() == w2.keys()
    return max(float((w1[k] - w2[k]).abs().max()) for k in w1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("fsdp2")
    _run([sys.executable, "-m", "core.train", "--config", str(QUICKSTART), *_overrides(tmp, "one", 12)])
    return tmp, _launch(tmp, "fsdp2")


def test_fsdp2_launch_on_cpu_is_fsdp2_and_takes_the_one_process_steps(runs):
    tmp, stdout = runs
    assert "backend: FSDP2 (gloo), 2 processes" in stdout.splitlines(), stdout[-2000:]
    record = json.loads((tmp / "fsdp2" / "backend.json").read_text())
    assert (record["name"], record["fsdp_version"]) == ("fsdp", 2)
    whole = json.loads((tmp / "one" / "backend.json").read_text())["memory_per_rank"][0]["params_bytes"]
    assert all(r["params_bytes"] < 0.6 * whole for r in record["memory_per_rank"]), "FSDP2 must shard the weights"
    # uneven eval shards (3 samples on 2 ranks) before and after training ran to the end
    assert sum(ln.startswith("eval ") for ln in stdout.splitlines()) == 2, stdout[-2000:]
    m1, m2 = _jsonl(tmp / "one" / "metrics.jsonl"), _jsonl(tmp / "fsdp2" / "metrics.jsonl")
    assert [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2, strict=True):
        assert a["reward"] == b["reward"]  # the same completions, scored the same
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL["loss"])
        assert a["kl"] == pytest.approx(b["kl"], rel=TOL["kl_rel"], abs=1e-8)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=TOL["grad_norm_rel"])
    assert m1[0]["grad_norm"] > 1.0, "the step must clip (train.max_grad_norm=1) for clipping to be checked"
    assert m1[1]["kl"] > 1e-4, "step 2's KL must be non-zero, or matching it proves nothing"
    start = tmp / "tiny"
    for step in (1, 2):
        a, b = tmp / "one" / f"checkpoint-{step}", tmp / "fsdp2" / f"checkpoint-{step}"
        assert _max_diff(a, start) > 1e-3, "the step must move the weights"
        diff = _max_diff(a, b)
        assert diff < TOL["weights"], f"step {step}: max abs diff {diff:.3g} (tolerance {TOL['weights']})"


def test_fsdp2_resume_restores_every_ranks_optimizer_shard(runs):
    tmp, _ = runs
    ckpt = tmp / "fsdp2" / "checkpoint-1"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    shards = sorted(n for n in manifest if n.startswith("optimizer_rank"))
    assert shards == ["optimizer_rank0.json", "optimizer_rank0.safetensors", "optimizer_rank1.json",
                      "optimizer_rank1.safetensors"], shards  # hash-verified, no pickle
    out = tmp / "fsdp2_resumed"
    out.mkdir()
    shutil.copytree(ckpt, out / "checkpoint-1")  # the run "killed" after its step-1 checkpoint
    stdout = _launch(tmp, out.name, "checkpoint.resume=true")
    assert "resumed from" in stdout
    diff = _max_diff(tmp / "fsdp2" / "checkpoint-2", out / "checkpoint-2")
    assert diff == 0.0, f"resumed step 2 differs by {diff:.3g}"
