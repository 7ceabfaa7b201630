"""DeepSpeed ZeRO-3 on 2 CPU processes (gloo) when the ranks do unequal work: no deadlock, the same step.

Under ZeRO-3 each weight is split over the processes and gathered by a collective in every
forward. Ranks that generate different amounts would then call different numbers of collectives
and hang (NCCL) or abort (gloo). The run here FORCES each uneven case at once, with a 60 s
process-group timeout (``train.distributed_timeout_s``) so a hang fails in a minute:

- **dynamic-sampling rounds differing per rank**: 2 prompts per step, one group per rank. Rank 0's
  prompts (even rows) have the solution ``purple``, which no completion can be (guided choice
  among ``red`` and a long answer), so its group has zero reward variance and is regenerated;
  rank 1's (odd rows, ``red``) has variance at step 1, and rank 1 generates nothing in either
  resample round (``dynamic/resampled_groups`` = 2 with 1 zero-variance group proves it);
- **completions ending at different lengths**: the two choices are 2 and 12 tokens long (with EOS);
- **in-training evaluation shards of unequal size**: 3 samples on 2 ranks, before and after training.

With ``train.gather_for_generation`` (default) the weights are gathered once per rollout and
generation runs no collective; the run must then take the same steps as one process (tolerances:
``tests/test_multiprocess.py``'s ``ZERO_TOL``, same reasons). With the switch off the same settings
are refused at start (exit 2), and an even configuration runs sharded (transformers keeps the
ranks' decoding loops in step) and takes the same steps too.

Without the gather (checked by hand, the refusal bypassed) this run aborts after the 60 s timeout
inside the first resample round: gloo's collective on rank 1 waits for rank 0's forward.
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
ZERO3 = ROOT / "examples" / "multinode" / "accelerate_zero3.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "DS_ACCELERATOR": "cpu"}
#: Same as tests/test_multiprocess.py ZERO_TOL (why: there): float32 summation order only.
TOL = {"loss": 1e-5, "kl_rel": 1e-4, "grad_norm_rel": 1e-5, "weights": 2e-5}
LONG = "green and blue and yellow and red"

pytestmark = [pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs the deepspeed extra: pip install 'vlmr1[deepspeed]'")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(i: int, solution: str) -> str:
    return json.dumps({"id": f"q{i}", "conversations": [
        {"from": "human", "value": f"Question {i}: which colour?"}, {"from": "gpt", "value": solution}]})


def _config(tmp: Path) -> Path:
    """Odd prompts (rank 1's group each step) can score; even ones (rank 0's) cannot (solution ``purple``)."""
    (tmp / "train.jsonl").write_text("\n".join(_row(i, "red" if i % 2 else "purple") for i in range(16)) + "\n")
    (tmp / "eval.jsonl").write_text("\n".join(_row(100 + i, "red") for i in range(4)) + "\n")
    cfg = {
        "model": {"family": "qwen2_5_vl", "tiny": {"hidden_size": 64, "num_layers": 2, "seed": 0},
                  "path": str(tmp / "tiny")},
        "task": {"name": "vlmr1_jsonl", "options": {"data_files": str(tmp / "train.jsonl"),
                                                    "eval_files": str(tmp / "eval.jsonl"),
                                                    "question_template": "none"}},
        "rewards": [{"name": "all_match"}],
        "rollout": {"options": {"choices": ["red", LONG], "seed_per_prompt": True}},
        # dapo: normalised by the global token count, so a rank whose rows are all dropped (rank 0's
        # zero-variance group after the last round) still gives the 1-process step (grpo's per-rank
        # mean would halve it: docs/training.md, "Gradients")
        "grpo": {"num_generations": 4, "max_completion_length": 24, "beta": 0.04, "loss_type": "dapo",
                 "zero_variance_groups": "resample", "resample_budget": 2},
        "train": {"learning_rate": 3.0e-3, "per_device_batch_size": 8, "max_steps": 2, "shuffle": False,
                  "distributed_timeout_s": 60},
        "eval": {"enabled": True, "num_samples": 3, "batch_size": 1},
        "logging": {"progress_bar": False, "plot": False, "tensorboard": False, "log_completions_every": 1},
        "checkpoint": {"save_every": 1, "keep_last": 5},
    }
    path = tmp / "uneven.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _train(tmp: Path, out: str, *overrides: str, processes: int = 1, check: bool = True):
    args = ["-m", "core.train", "--config", str(tmp / "uneven.yaml"), f"logging.output_dir={tmp / out}",
            *overrides]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3),
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args,
               "train.per_device_batch_size=4"]
    proc = run_command(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uneven")
    _config(tmp)
    _train(tmp, "one")  # also builds the tiny checkpoint
    return tmp


def _assert_same_steps(tmp: Path, out: str, one_out: str = "one") -> None:
    """``out`` (2 processes) took the steps of ``one_out`` (1 process) within ``TOL``."""
    m1, m2 = _jsonl(tmp / one_out / "metrics.jsonl"), _jsonl(tmp / out / "metrics.jsonl")
    assert [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2, strict=True):
        assert a["reward"] == b["reward"]
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL["loss"])
        assert a["kl"] == pytest.approx(b["kl"], rel=TOL["kl_rel"], abs=1e-8)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=TOL["grad_norm_rel"])
    base = load_file(str(tmp / "tiny" / "model.safetensors"))
    for step in (1, 2):
        one = load_file(str(tmp / one_out / f"checkpoint-{step}" / "model.safetensors"))
        two = load_file(str(tmp / out / f"checkpoint-{step}" / "model.safetensors"))
        assert max(float((one[k] - base[k]).abs().max()) for k in one) > 1e-3, "the step must move the weights"
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert diff < TOL["weights"], f"{out} step {step}: max abs diff {diff:.3g} (tolerance {TOL['weights']})"


def test_zero3_uneven_work_on_two_ranks_neither_hangs_nor_changes_the_step(runs):
    tmp = runs
    proc = _train(tmp, "zero3", processes=2)
    assert "backend: DeepSpeed ZeRO-3 (gloo), 2 processes" in proc.stdout.splitlines()
    # uneven evaluation shards (2 + 1 samples), before and after training
    assert "eval before training" in proc.stdout and "eval after training" in proc.stdout, proc.stdout[-2000:]
    metrics = _jsonl(tmp / "zero3" / "metrics.jsonl")
    # step 1: only rank 0's group was regenerated, in both rounds, while rank 1 generated nothing
    # (step 2: both groups in round 1, rank 0's alone in round 2)
    assert (metrics[0]["dynamic/zero_std_groups_sampled"], metrics[0]["dynamic/resampled_groups"]) == (1.0, 2.0)
    assert (metrics[1]["dynamic/zero_std_groups_sampled"], metrics[1]["dynamic/resampled_groups"]) == (2.0, 3.0)
    comps = {c["completion"] for c in _jsonl(tmp / "zero3" / "completions.jsonl")}
    assert comps == {"red", LONG}, comps  # completions of different lengths (2 and 12 tokens with EOS)
    _assert_same_steps(tmp, "zero3")


def test_zero3_without_the_gather_refuses_uneven_settings(runs):
    proc = _train(runs, "refused", "train.gather_for_generation=false", processes=2, check=False)
    err = proc.stderr
    # each rank exits 2 (bad input) before loading weights, with one error line and no traceback;
    # the launcher then reports its failed children and exits 1
    assert proc.returncode != 0 and "exitcode  : 2" in err, proc.stdout[-2000:] + err[-3000:]
    assert "exitcode  : 1" not in err and "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: train.gather_for_generation=false under "
                                                            "DeepSpeed ZeRO-3")]
    assert lines, err[-3000:]
    assert "zero_variance_groups=resample" in lines[0] and "3 evaluation samples" in lines[0]


def test_zero3_without_the_gather_runs_an_even_configuration_sharded(runs):
    # Even: no resampling (each rank one whole group, one generate call), 4 eval samples = 2 per rank;
    # completions still end at different lengths, which transformers' synced decoding loops absorb.
    even = ("grpo.zero_variance_groups=keep", "eval.num_samples=4")
    _train(runs, "one_even", *even)
    proc = _train(runs, "zero3_sharded", *even, "train.gather_for_generation=false", processes=2)
    assert "eval after training" in proc.stdout
    _assert_same_steps(runs, "zero3_sharded", "one_even")
