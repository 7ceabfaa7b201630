"""Reward faults a long run meets, at step scale, with the figures docs/reliability.md quotes.

``pytest tests/test_reward_faults.py -s`` prints one line per fault: how many of a step's
completions kept their real score, and what the run did. The last test is a real training run
(``python -m core.train`` on a tiny model) whose judge server is down: it must stop with a
clear message and a non-zero exit instead of training on zeros.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from core.interfaces import Reward, RewardBatch, RewardItem
from core.runtime.reward_runner import RewardError, RewardRunner, RewardSpec
from core.testing import HangsOnce
from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
N = 32  # completions per step, as in a small real run


def step_batch(poison: set[int] = frozenset()) -> RewardBatch:
    return RewardBatch([RewardItem(completion="poison" if i in poison else f"<answer>{i}</answer>", solution="x")
                        for i in range(N)])


class PoisonRow(Reward):
    name = "poison"

    def score(self, batch):
        if any(it.completion == "poison" for it in batch):
            raise ValueError("unparsable completion")
        return [1.0] * len(batch)


def scored(res) -> int:
    """Completions of the step that kept a real score."""
    return int((~res.failed[:, 0]).sum())


def test_fault_figures():
    lines = []
    # 1. one poisonous row in a step of 32
    res = RewardRunner([RewardSpec("poison", PoisonRow(), 1.0, 5.0, "zero")])(step_batch({7}))
    assert scored(res) == N - 1
    lines.append(f"one raising row in {N}: {scored(res)}/{N} completions keep their score (before: 0/{N})")
    # 2. a call that hangs once (a lost connection), then 19 normal steps
    r = HangsOnce()
    runner = RewardRunner([RewardSpec("judge", r, 1.0, 0.3, "zero")])
    try:
        per_step = [scored(runner(step_batch())) for _ in range(20)]
    finally:
        r.release.set()
    assert per_step[0] == 0 and per_step[1:] == [N] * 19
    lines.append(f"one hung call, then 19 steps: {sum(per_step[1:])}/{19 * N} later completions scored "
                 f"(before: 0/{19 * N}: the reward stayed off)")
    # 3. a reward that fails on most rows for good: the run stops after max_error_steps
    runner = RewardRunner([RewardSpec("poison", PoisonRow(), 1.0, 5.0, "zero", 0.5, 10)])
    steps = 0
    with pytest.raises(RewardError, match="failed on at least 50%"):
        for _ in range(100):
            steps += 1
            runner(step_batch(set(range(20))))
    assert steps == 10
    lines.append(f"20/{N} rows failing every step: run stopped at step {steps} with RewardError "
                 "(before: trained on zeros, exit 0)")
    print("\nreward faults:\n  " + "\n  ".join(lines))


def test_judge_down_stops_a_real_run_with_a_clear_message(tmp_path):
    """The judge's endpoint refuses connections; the run must not train on zeros and exit 0."""
    cfg = {
        "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "tiny"), "tiny": {"hidden_size": 64, "num_layers": 2}},
        "task": {"name": "synthetic_color", "options": {"num_train": 32, "num_eval": 4}},
        "rewards": [{"name": "default"},
                    {"name": "judge", "max_error_steps": 2, "timeout_s": 20,
                     "options": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": None,
                                 "max_retries": 0, "request_timeout_s": 2}}],
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 8, "max_steps": 6, "seed": 3},
        "logging": {"output_dir": str(tmp_path / "out"), "tensorboard": False, "progress_bar": False, "plot": False},
        "checkpoint": {"save_every": 0, "save_final": False},
        "eval": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    proc = run_command([sys.executable, "-m", "core.train", "--config", str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "reward 'judge' failed on at least 50% of the completions in each of the last 2 steps" in proc.stderr
    assert "ConnectError" in proc.stderr  # the last failure is named
    print(f"\njudge down: run stopped at step 2 with exit {proc.returncode} in {time.monotonic() - t0:.0f} s")


# ---- contract violations stop at the first step (issue 22) ------------------------------------
_CONTRACT_PLUGIN = '''
from core.hookspecs import hookimpl
from core.interfaces import Reward


class ShortList(Reward):
    """One score too few: a classic off-by-one."""

    name = "short_list"

    def score(self, batch):
        return [1.0] * (len(batch) - 1)


class ExitsInSetup(Reward):
    """Ends the process while setting up (e.g. a missing API key handled with sys.exit)."""

    name = "exits_in_setup"

    def setup(self, ctx):
        raise SystemExit(0)

    def score(self, batch):
        return [1.0] * len(batch)


@hookimpl
def vlmr1_register_rewards(register):
    register(ShortList)
    register(ExitsInSetup)
'''


def _contract_run(tmp_path: Path, reward: str):
    """``python -m core.train`` (tiny model, 3 steps, a checkpoint every step) with a throwaway reward plugin."""
    from core.testing import write_distribution
    from core.testing.procs import run_command

    site = tmp_path / "site"
    write_distribution(site, "vlmr1-plugin-contract", "0.3.0", modules={"contract_pkg/hooks.py": _CONTRACT_PLUGIN},
                       entry_points={"contract": "contract_pkg.hooks"})
    cfg = {
        "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "tiny"), "tiny": {"hidden_size": 64, "num_layers": 2}},
        "task": {"name": "synthetic_color", "options": {"num_train": 8, "num_eval": 2}},
        "rewards": [{"name": "default"}, {"name": reward, "max_error_steps": 10}],
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 8, "max_steps": 3, "seed": 3},
        "logging": {"output_dir": str(tmp_path / "out"), "tensorboard": False, "progress_bar": False, "plot": False},
        "checkpoint": {"save_every": 1, "save_final": True},
        "eval": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # Generous: a tiny model's 1-step run takes ~20 s on 2 idle cores; the limit only guards against a hang.
    return run_command([sys.executable, "-m", "core.train", "--config", str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)


def test_a_wrong_length_reward_stops_a_real_run_at_step_1(tmp_path):
    """Before: one warning, then 10 steps of zeros and exit 0 for a short run. Now exit 1 at step 1, no checkpoint."""
    proc = _contract_run(tmp_path, "short_list")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert ("error: reward 'short_list' (plugin vlmr1-plugin-contract 0.3.0, contract_pkg.hooks.ShortList) broke "
            "the Reward contract: score() returned 7 score(s) for 8 completions") in errors[0]
    assert "fix the reward's score()" in errors[0]
    assert "Traceback" not in proc.stderr
    out = tmp_path / "out"
    assert not list(out.glob("checkpoint-*")), sorted(p.name for p in out.iterdir())
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()


def test_sys_exit_in_a_rewards_setup_ends_the_run_with_exit_1_naming_it(tmp_path):
    proc = _contract_run(tmp_path, "exits_in_setup")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("error: reward 'exits_in_setup' (plugin vlmr1-plugin-contract 0.3.0, contract_pkg.hooks.ExitsInSetup) "
            "called sys.exit(0) inside setup()") in proc.stderr, proc.stderr[-3000:]
    assert not list((tmp_path / "out").glob("checkpoint-*"))
