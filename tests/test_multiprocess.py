"""Two real CPU processes (gloo) under ``accelerate launch`` take the same update as one process.

The quickstart config shrunk to 2 steps; 3 prompts x 4 completions = 12 completions per step.
Two processes hold 6 completions each, so the middle group is split: copies 0-1 on rank 0,
copies 2-3 on rank 1. One process holds all 12. With ``rollout.options.seed_per_prompt``
sampling is seeded per group, so both runs see the same completions and the same rewards;
group statistics come from the rewards gathered over all ranks, and DDP averages the two
ranks' gradients. The weights after each step must then agree.

Launcher: ``accelerate launch --cpu --num_processes 2`` starts only one process unless an MPI
hostfile is given (accelerate's multi-CPU path is mpirun), so the test uses accelerate's
torchrun-based launcher (``--multi_gpu``) with ``device.name=cpu``: the engine then asks
accelerate for a CPU ``Accelerator`` and the process group uses gloo.

Measured on a 2-core CPU: max |w_2proc - w_1proc| = 1.9e-6 after each step, while a step
moves weights by up to 3e-3 (AdamW, lr 3e-3); the stated tolerance is 1e-5.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart" / "config.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
G = 4
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(tmp: Path, out: str, per_device: int) -> list[str]:
    return [f"model.path={tmp / 'tiny'}", "device.name=cpu", "rewards.0.name=default", "train.max_steps=2",
            f"train.per_device_batch_size={per_device}", f"grpo.num_generations={G}", "grpo.beta=0.04",
            "rollout.options.seed_per_prompt=true",
            # free-text sampling and GRPO's group baseline (the quickstart uses guided choice + a batch baseline)
            "rollout.options.choices=null", "grpo.advantage_baseline=group", "grpo.scale_rewards=group",
            "train.lr_scheduler=constant", "train.warmup_steps=0",
            "eval.enabled=false", f"logging.output_dir={tmp / out}",
            "logging.progress_bar=false", "logging.plot=false", "logging.tensorboard=false",
            "logging.log_completions_every=1", "checkpoint.save_every=1", "checkpoint.keep_last=5"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mp")
    base = [sys.executable, "-m", "core.train", "--config", str(QUICKSTART)]
    _run([*base, *_overrides(tmp, "one", 12)])  # also builds the tiny checkpoint, before two processes race
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", str(_free_port()), "-m", "core.train", "--config", str(QUICKSTART),
          *_overrides(tmp, "two", 6)])
    return tmp


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_two_processes_take_the_same_update_as_one(two_runs):
    tmp = two_runs
    base = load_file(str(tmp / "tiny" / "model.safetensors"))
    for step in (1, 2):
        one = load_file(str(tmp / "one" / f"checkpoint-{step}" / "model.safetensors"))
        two = load_file(str(tmp / "two" / f"checkpoint-{step}" / "model.safetensors"))
        assert one.keys() == two.keys()
        moved = max(float((one[k] - base[k]).abs().max()) for k in one)
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert moved > 1e-3, "the step must move the weights, or equality proves nothing"
        assert diff < TOL, f"step {step}: max abs diff {diff:.3g} (tolerance {TOL})"
    m1, m2 = _jsonl(tmp / "one" / "metrics.jsonl"), _jsonl(tmp / "two" / "metrics.jsonl")
    assert [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["reward_std"] == pytest.approx(b["reward_std"], abs=1e-6)
        # the logged loss is the step's loss (mean of the ranks' shares), not rank 0's share
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-8)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_group_split_over_two_ranks_gets_whole_group_statistics(two_runs):
    tmp = two_runs
    c1, c2 = _jsonl(tmp / "one" / "completions.jsonl"), _jsonl(tmp / "two" / "completions.jsonl")
    assert len(c1) == len(c2) == 2 * 12
    for step in (1, 2):
        one = [c for c in c1 if c["step"] == step]
        two = [c for c in c2 if c["step"] == step]  # gathered in rank order = global slot order
        # Same completions in the same slots: the split group's halves are different copies
        # (not the same seed sampled twice) and exactly the ones one process samples.
        assert [c["completion"] for c in one] == [c["completion"] for c in two]
        rewards = torch.tensor([c["reward"] for c in two]).view(-1, G)
        assert float(rewards[1].std()) > 0, "the split group (copies on both ranks) must have reward variance"
        expected = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(-1)
        logged = torch.tensor([c["advantage"] for c in two])
        half = rewards[1, :2]  # rank 0's half of the split group: its own statistics would be wrong
        if float(half.std()) > 0:
            wrong = (half - half.mean()) / (half.std() + 1e-4)
            assert not torch.allclose(wrong, expected[4:6], atol=1e-3)
        assert torch.allclose(logged, expected, atol=1e-5), (logged, expected)
        assert torch.allclose(logged, torch.tensor([c["advantage"] for c in one]), atol=1e-6)


# ---- examples/multinode: configs and launcher (parsed and dry-run only; no GPU runs here) ----
MULTINODE = ROOT / "examples" / "multinode"


@pytest.mark.parametrize(("name", "kind", "stage", "offload"), [
    ("accelerate_ddp.yaml", "MULTI_GPU", None, False),
    ("accelerate_zero2.yaml", "DEEPSPEED", 2, False),
    ("accelerate_zero3.yaml", "DEEPSPEED", 3, False),
    ("accelerate_zero3_offload.yaml", "DEEPSPEED", 3, True),
    ("accelerate_fsdp.yaml", "FSDP", None, False),
])
def test_multinode_accelerate_configs_parse(name, kind, stage, offload, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(ROOT)  # the configs name their DeepSpeed files relative to the repository root
    cfg = load_config_from_file(str(MULTINODE / name))
    assert cfg.distributed_type.value == kind and cfg.mixed_precision == "bf16"
    if stage is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed_config["deepspeed_config_file"])
        assert plugin.zero_stage == stage and plugin.hf_ds_config.is_offload() == offload
        if stage == 3:  # else accelerator.get_state_dict cannot gather full weights for save_pretrained
            assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_launch_script_maps_scheduler_variables():
    env = {k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "GPUS_"))}
    env.update(SLURM_NNODES="2", SLURM_NODEID="1", SLURM_GPUS_ON_NODE="4", MASTER_ADDR="node-a",
               LAUNCH_DRY_RUN="1")
    proc = subprocess.run(["bash", str(MULTINODE / "launch.sh"), str(MULTINODE / "accelerate_zero3.yaml"),
                           "run.yaml", "train.max_steps=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split()
    opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert opt["--num_machines"] == "2" and opt["--machine_rank"] == "1" and opt["--num_processes"] == "8"
    assert opt["--main_process_ip"] == "node-a" and opt["--main_process_port"] == "29500"
    assert args[-1] == "train.max_steps=5" and opt["--config"].endswith("run.yaml")
