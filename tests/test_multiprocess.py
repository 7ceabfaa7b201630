"""Two real CPU processes (gloo) under ``accelerate launch`` take the same update as one process: DDP and ZeRO-2.

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

DeepSpeed ZeRO-2 and ZeRO-3 (``slow``; need ``vlmr1[deepspeed]``): the same 2-process run through
the shipped ``examples/multinode/accelerate_zero{2,3}.yaml`` with ``--mixed_precision no`` must
print its backend, take the same steps as the one process (see ``ZERO_TOL`` for the tolerances
and why) and resume from its per-rank optimizer shards to the same weights as the uninterrupted
run. The ZeRO-3 run (beta > 0: a whole reference copy; prefix sharing on) also evaluates 3
samples on 2 ranks before and after training: uneven shards, which deadlock without gathering
the weights once per rollout (every uneven case, forced: tests/test_distributed_uneven.py).

Memory: every run records in ``backend.json`` the bytes each process holds of parameters, gradients
and optimizer state after its first update (``memory_per_rank``); DDP's are the whole model's on every
rank, and per rank params + optimizer state order ZeRO-3 < ZeRO-2 < DDP (read off the runs above).

Two machines on one host (``distributed``): two ``accelerate launch --num_machines 2 --machine_rank
0|1`` commands (DDP), and ``examples/multinode/launch.sh`` twice with only ``SLURM_NODEID`` changed
(ZeRO-3), one process each, take the one-process steps. The DeepSpeed and two-machine tests are
marked ``distributed``: ``make test-distributed`` runs them, ``make test`` leaves them out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.testing.procs import run_command

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


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = run_command(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _launch(*launcher: str) -> list[str]:
    """``accelerate launch LAUNCHER... --num_processes 2 ... -m core.train --config QUICKSTART``."""
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "core.train", "--config", str(QUICKSTART)]


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    """The 1-process run of the global batch (12 completions per step); also builds the tiny checkpoint."""
    tmp = tmp_path_factory.mktemp("mp")
    _run([sys.executable, "-m", "core.train", "--config", str(QUICKSTART), *_overrides(tmp, "one", 12)])
    return tmp


@pytest.fixture(scope="module")
def two_runs(one_run) -> Path:
    proc = _run([*_launch("--multi_gpu"), *_overrides(one_run, "two", 6)])
    assert "backend: DDP (gloo), 2 processes" in proc.stdout
    return one_run


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


# ---- DeepSpeed ZeRO-2 through the shipped launch file ------------------------------------------
MULTINODE = ROOT / "examples" / "multinode"
#: ZeRO-2/3 vs one process. Why these: both runs see the same completions and rewards, so only
#: the float32 summation order differs (ZeRO reduce-scatters bucketed, flattened gradients; its
#: AdamW runs on a flat fp32 partition). Loss and KL: 1e-5 absolute / 1e-4 relative, as for DDP.
#: Grad norm: 1e-5 relative (a sum of ~1e5 squared fp32 terms; measured 6e-7 to 1.7e-6). Weights:
#: 2e-5 absolute, 1/150 of what a step moves (3e-3): the first AdamW update is lr * g/(|g| + eps),
#: so an element whose gradient is near Adam's eps (1e-8) turns rounding in g into up to lr x a
#: few 1e-3 (measured 6.2e-6 after each of 2 steps for ZeRO-2 and ZeRO-3; DDP 1.9e-6). A wrong
#: reduction (a rank's share dropped or doubled, an unsharded optimizer stepping twice) moves the
#: weights by ~lr = 3e-3.
ZERO_TOL = {"loss": 1e-5, "kl_rel": 1e-4, "grad_norm_rel": 1e-5, "weights": 2e-5}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs the deepspeed extra: pip install 'vlmr1[deepspeed]'")
# DeepSpeed's CPU accelerator (gloo when oneCCL is absent); a short process-group timeout makes a hang
# (ranks disagreeing on a collective) fail within a minute instead of after accelerate's 30.
ZERO_ENV = {**ENV, "DS_ACCELERATOR": "cpu"}
ZERO_OVERRIDES = ["train.distributed_timeout_s=60"]


def _zero_run(tmp: Path, stage: int, *extra: str) -> str:
    proc = _run([*_launch("--config_file", str(MULTINODE / f"accelerate_zero{stage}.yaml")),
                 *_overrides(tmp, f"zero{stage}", 6), *ZERO_OVERRIDES, *extra], env=ZERO_ENV)
    return proc.stdout


@pytest.fixture(scope="module")
def zero2_run(one_run) -> tuple[Path, str]:
    return one_run, _zero_run(one_run, 2)


@pytest.fixture(scope="module")
def zero3_run(one_run) -> tuple[Path, str]:
    # eval: 3 samples on 2 ranks (2 + 1 generate calls), greedy, before and after training
    return one_run, _zero_run(one_run, 3, "eval.enabled=true", "eval.num_samples=3", "eval.batch_size=1")


def _assert_zero_run(tmp: Path, stdout: str, stage: int) -> None:
    """``zero<stage>`` printed and recorded its backend and took the one-process run's steps (``ZERO_TOL``)."""
    line = f"DeepSpeed ZeRO-{stage} (gloo), 2 processes"
    assert f"backend: {line}" in stdout.splitlines()
    out = tmp / f"zero{stage}"
    record = json.loads((out / "backend.json").read_text())
    assert (record["name"], record["zero_stage"], record["num_processes"], record["comm"]) == \
        ("deepspeed", stage, 2, "gloo")
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["backend"]["description"] == line and state["optimizer_per_rank"]
    m1, m2 = _jsonl(tmp / "one" / "metrics.jsonl"), _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2, strict=True):  # step 1 (KL 0: policy = reference) and step 2 (KL > 0)
        assert a["reward"] == b["reward"]  # the same completions, scored the same
        assert a["loss"] == pytest.approx(b["loss"], abs=ZERO_TOL["loss"])
        assert a["kl"] == pytest.approx(b["kl"], rel=ZERO_TOL["kl_rel"], abs=1e-8)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=ZERO_TOL["grad_norm_rel"])
    assert m1[1]["kl"] > 1e-3
    base = load_file(str(tmp / "tiny" / "model.safetensors"))
    for step in (1, 2):
        one = load_file(str(tmp / "one" / f"checkpoint-{step}" / "model.safetensors"))
        two = load_file(str(out / f"checkpoint-{step}" / "model.safetensors"))
        assert one.keys() == two.keys()  # ZeRO-3: consolidated full weights, under the same key names
        assert max(float((one[k] - base[k]).abs().max()) for k in one) > 1e-3
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert diff < ZERO_TOL["weights"], f"step {step}: max abs diff {diff:.3g} (tolerance {ZERO_TOL['weights']})"


@pytest.mark.slow
@pytest.mark.distributed
@needs_deepspeed
def test_zero2_launch_is_zero2_and_takes_the_same_steps_as_one_process(zero2_run):
    _assert_zero_run(*zero2_run, stage=2)


@pytest.mark.slow
@pytest.mark.distributed
@needs_deepspeed
def test_zero3_launch_is_zero3_and_takes_the_same_steps_as_one_process(zero3_run):
    tmp, stdout = zero3_run
    _assert_zero_run(tmp, stdout, stage=3)
    assert "eval before training" in stdout and "eval after training" in stdout  # uneven shards: no deadlock
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tmp / "zero3" / "checkpoint-2")  # a plain checkpoint


@pytest.mark.slow
@pytest.mark.distributed
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_restores_every_ranks_optimizer_shard(stage, request):
    tmp, _ = request.getfixturevalue(f"zero{stage}_run")
    ckpt = tmp / f"zero{stage}" / "checkpoint-1"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    shards = sorted(n for n in manifest if n.startswith("optimizer_rank"))
    assert shards == ["optimizer_rank0.json", "optimizer_rank0.safetensors", "optimizer_rank1.json",
                      "optimizer_rank1.safetensors"], shards  # hash-verified like every other file
    for rank in (0, 1):  # JSON + safetensors: nothing to unpickle
        shard = json.loads((ckpt / f"optimizer_rank{rank}.json").read_text())
        assert shard["rank"] == rank and "loss_scaler_state" in json.dumps(shard)
    out = tmp / f"zero{stage}_resumed"
    out.mkdir()
    shutil.copytree(ckpt, out / "checkpoint-1")  # the run "killed" after its step-1 checkpoint
    proc = _run([*_launch("--config_file", str(MULTINODE / f"accelerate_zero{stage}.yaml")),
                 *_overrides(tmp, out.name, 6), *ZERO_OVERRIDES, "checkpoint.resume=true"], env=ZERO_ENV)
    assert "resumed from" in proc.stdout
    # Same ranks, same reductions: the resumed step 2 is the uninterrupted one. Fresh Adam moments
    # (a shard not restored) move the weights by 5e-3 differently (measured with the restore off).
    a = load_file(str(tmp / f"zero{stage}" / "checkpoint-2" / "model.safetensors"))
    b = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff == 0.0, f"resumed step 2 differs by {diff:.3g}"


def _memory(out: Path) -> list[dict[str, int]]:
    """``backend.json``'s per-process accounting (bytes), one entry per rank."""
    return json.loads((out / "backend.json").read_text())["memory_per_rank"]


def test_ddp_records_whole_model_and_adam_state_on_every_rank(two_runs):
    tmp = two_runs
    weights = load_file(str(tmp / "tiny" / "model.safetensors"))
    whole = sum(t.numel() * t.element_size() for t in weights.values())  # the tiny model: all fp32, all trained
    ranks = _memory(tmp / "two")
    assert len(ranks) == 2
    for r in ranks:  # DDP: every process holds the whole model, its whole gradient and both Adam moments
        assert r["params_bytes"] == whole and r["grads_bytes"] == whole
        assert 2 * whole <= r["optimizer_state_bytes"] <= 2 * whole + 8 * len(weights)  # + one step count each
    assert _memory(tmp / "one") == ranks[:1]


@pytest.mark.slow
@pytest.mark.distributed
@needs_deepspeed
def test_zero_stages_hold_less_model_and_optimizer_state_per_rank(two_runs, zero2_run, zero3_run):
    """Per-rank params + optimizer state after the first step: ZeRO-3 < ZeRO-2 < DDP (accounted, not RSS)."""
    tmp = two_runs
    held = {name: [r["params_bytes"] + r["optimizer_state_bytes"] for r in _memory(tmp / name)]
            for name in ("two", "zero2", "zero3")}
    grads = {name: [r["grads_bytes"] for r in _memory(tmp / name)] for name in ("two", "zero2", "zero3")}
    for rank in (0, 1):
        assert held["zero3"][rank] < held["zero2"][rank] < held["two"][rank], held
        # ZeRO-2 and -3 keep only their half of the reduced gradient (plus alignment padding)
        assert grads["zero2"][rank] < 0.6 * grads["two"][rank] and grads["zero3"][rank] < 0.6 * grads["two"][rank]
    ddp, z2, z3 = (_memory(tmp / n)[0] for n in ("two", "zero2", "zero3"))
    assert z2["params_bytes"] == ddp["params_bytes"]  # ZeRO-2 does not partition the weights
    assert z3["params_bytes"] < 0.6 * ddp["params_bytes"]  # ZeRO-3 does (small ones stay whole: persistence)


# ---- examples/multinode: the launcher (the accelerate configs: tests/test_backends.py) -------
def test_launch_script_maps_scheduler_variables():
    env = {k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "GPUS_"))}
    env.update(SLURM_NNODES="2", SLURM_NODEID="1", SLURM_GPUS_ON_NODE="4", MASTER_ADDR="node-a",
               LAUNCH_DRY_RUN="1")
    proc = run_command(["bash", str(MULTINODE / "launch.sh"), str(MULTINODE / "accelerate_zero3.yaml"),
                        "run.yaml", "train.max_steps=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split()
    opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert opt["--num_machines"] == "2" and opt["--machine_rank"] == "1" and opt["--num_processes"] == "8"
    assert opt["--main_process_ip"] == "node-a" and opt["--main_process_port"] == "29500"
    assert args[-1] == "train.max_steps=5" and opt["--config"].endswith("run.yaml")


# ---- two machines on one host: one process per "machine", rendezvous on 127.0.0.1 -------------
def _two_machines(cmd_of_rank, env: dict[str, str], logs: Path) -> list[str]:
    """Start machine 0 and machine 1 (``cmd_of_rank(r)``) together; both must exit 0; their stdouts.

    Output goes to files (a full pipe would block a machine while the test waits on the other).
    """
    from core.testing.procs import scaled

    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in (0, 1):
        with open(logs / f"out{r}", "w") as out, open(logs / f"err{r}", "w") as err:
            procs.append(subprocess.Popen(cmd_of_rank(r), cwd=ROOT, env=env, stdout=out, stderr=err, text=True))
    try:
        for p in procs:
            p.wait(timeout=scaled(400))
    except subprocess.TimeoutExpired:
        pytest.fail(f"two machines still running after {scaled(400):.0f} s (a hang, or a very busy machine; "
                    f"VLMR1_TEST_TIMEOUT_SCALE raises the limit); logs in {logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, (f"machine {r}: exit {p.returncode}\n{(logs / f'out{r}').read_text()[-3000:]}\n"
                                   f"{(logs / f'err{r}').read_text()[-5000:]}")
    return [(logs / f"out{r}").read_text() for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_machines_ddp_take_the_same_steps_as_one_process(one_run):
    """``accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1``, 1 process each."""
    tmp, port = one_run, str(_free_port())

    def cmd(rank: int) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                "--main_process_port", port, "--rdzv_backend", "static", "--mixed_precision", "no",
                "--dynamo_backend", "no", "-m", "core.train", "--config", str(QUICKSTART),
                *_overrides(tmp, "machines_ddp", 6), *ZERO_OVERRIDES]

    outs = _two_machines(cmd, ENV, tmp / "machines_ddp_logs")
    assert "backend: DDP (gloo), 2 processes" in outs[0].splitlines()
    for step in (1, 2):
        one = load_file(str(tmp / "one" / f"checkpoint-{step}" / "model.safetensors"))
        two = load_file(str(tmp / "machines_ddp" / f"checkpoint-{step}" / "model.safetensors"))
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert diff < TOL, f"step {step}: max abs diff {diff:.3g} (tolerance {TOL})"


@pytest.mark.slow
@pytest.mark.distributed
@needs_deepspeed
def test_launch_script_runs_two_zero3_machines_that_take_the_same_steps_as_one_process(one_run, tmp_path):
    """``examples/multinode/launch.sh`` as SLURM runs it on each node, only the rank variables changed."""
    tmp, port = one_run, str(_free_port())
    env = {k: v for k, v in ZERO_ENV.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK"))}
    # launch.sh calls the `accelerate` command: the venv's
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    (tmp_path / "run.yaml").write_text(QUICKSTART.read_text())

    def cmd(rank: int) -> list[str]:
        env_r = f"SLURM_NODEID={rank}"
        return ["env", env_r, "bash", str(MULTINODE / "launch.sh"), str(MULTINODE / "accelerate_zero3.yaml"),
                str(tmp_path / "run.yaml"), *_overrides(tmp, "machines_zero3", 6), *ZERO_OVERRIDES]

    outs = _two_machines(cmd, env, tmp_path / "logs")
    assert "backend: DeepSpeed ZeRO-3 (gloo), 2 processes" in outs[0].splitlines()
    m1, m2 = _jsonl(tmp / "one" / "metrics.jsonl"), _jsonl(tmp / "machines_zero3" / "metrics.jsonl")
    for a, b in zip(m1, m2, strict=True):
        assert a["reward"] == b["reward"]
        assert a["loss"] == pytest.approx(b["loss"], abs=ZERO_TOL["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=ZERO_TOL["grad_norm_rel"])
    for step in (1, 2):
        one = load_file(str(tmp / "one" / f"checkpoint-{step}" / "model.safetensors"))
        two = load_file(str(tmp / "machines_zero3" / f"checkpoint-{step}" / "model.safetensors"))
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert diff < ZERO_TOL["weights"], f"step {step}: max abs diff {diff:.3g} (tolerance {ZERO_TOL['weights']})"
