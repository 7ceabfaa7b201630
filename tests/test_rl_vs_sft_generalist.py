"""The RL-vs-SFT-from-a-generalist-base experiment (``examples/rl_vs_sft_generalist``): its matching
and report (``analyze.py``) on hand-made probe summaries, its knob checks, and a reduced run of
``run.sh`` end to end through the real commands (one seed, a toy model, a few steps)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "examples" / "rl_vs_sft_generalist"
PROBE_TASKS = ("new_task", "ood", "ground_simple", "ground_relational", "scene_qa")


def _analyze():
    spec = importlib.util.spec_from_file_location("rl_vs_sft_generalist_analyze", HERE / "analyze.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _probe(path: Path, new: float, ood: float, prior: tuple[float, float, float], kl: float) -> None:
    """A ``core.evaluate`` summary.json of probe.yaml, as run.sh leaves it."""
    acc = dict(zip(PROBE_TASKS, (new, ood, *prior), strict=True))
    ds = {t: ({"exact_match": {"n": 10, "accuracy": a}} if t == "scene_qa" else {"rec": {"n": 10, "acc@0.5": a}})
          for t, a in acc.items()}
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"datasets": ds, "kl_to_base": {
        "per_token": 9.0, "datasets": {t: (kl if t == "new_task" else 5.0) for t in PROBE_TASKS}}}))


def _fake_run(out: Path, grpo_new: dict[int, float], sft_new: dict[int, float]) -> list[str]:
    """Two seeds, one lr per arm, steps 1 and 2; GRPO keeps the prior tasks at 0.8, SFT drops them to 0.5."""
    for seed in (0, 1):
        _probe(out / f"seed{seed}" / "eval" / "base", 0.3, 0.2, (0.9, 0.6, 0.9), 0.0)
        for step in (1, 2):
            _probe(out / f"seed{seed}" / "eval" / "grpo" / "lr1e-4" / f"step{step}",
                   grpo_new[step] + 0.01 * seed, 0.3, (0.8, 0.8, 0.8 + 0.02 * seed), 0.01 * step)
            _probe(out / f"seed{seed}" / "eval" / "sft" / "lr3e-4" / f"step{step}",
                   sft_new[step] + 0.01 * seed, 0.25, (0.5, 0.5, 0.5), 0.2 * step)
    return ["--out", str(out), "--seeds", "0,1", "--grpo-lrs", "1e-4", "--sft-lrs", "3e-4", "--arm-steps", "2",
            "--points", "2"]


def test_analyze_matches_on_new_task_accuracy_and_writes_the_issue_format(tmp_path):
    m = _analyze()
    # Matching pairs: (grpo step 1, sft step 1) at 0.40 / 0.41, and (grpo step 2, sft step 2) at 0.60 / 0.585;
    # the higher one wins. SFT step 1 vs GRPO step 2 (0.41 vs 0.60) does not match.
    args = _fake_run(tmp_path, {1: 0.40, 2: 0.60}, {1: 0.41, 2: 0.585})
    assert m.main(args) == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert set(summary) == {"matched", "seeds"} and summary["seeds"] == 2
    assert set(summary["matched"]) == {"grpo", "sft"}
    for arm in ("grpo", "sft"):
        assert set(summary["matched"][arm]) == {"new_task", "retention", "ood"}
        for v in summary["matched"][arm].values():
            assert set(v) == {"mean", "std"}
    g, s = summary["matched"]["grpo"], summary["matched"]["sft"]
    assert g["new_task"]["mean"] == pytest.approx(0.605) and s["new_task"]["mean"] == pytest.approx(0.59)
    assert g["new_task"]["std"] == pytest.approx(0.01 / math.sqrt(2))  # sample std of two values 0.01 apart
    assert g["retention"]["mean"] == pytest.approx((0.8 * 2 + 0.81) / 3)
    assert s["retention"]["mean"] == pytest.approx(0.5) and s["retention"]["std"] == 0
    assert g["ood"]["mean"] == pytest.approx(0.3) and s["ood"]["mean"] == pytest.approx(0.25)
    raw = json.loads((tmp_path / "results" / "raw.json").read_text())
    assert len(raw["points"]) == 8 and raw["matched"]["grpo"]["step"] == 2 and raw["matched"]["sft"]["step"] == 2
    sft_pt = next(p for p in raw["points"] if p["arm"] == "sft" and p["seed"] == 0 and p["step"] == 2)
    assert sft_pt["forgetting"] == pytest.approx(0.8 - 0.5) and sft_pt["kl"] == pytest.approx(0.4)  # new-task KL
    md = (tmp_path / "results.md").read_text()
    for heading in ("(a) New-task accuracy vs retention", "(b) Forgetting vs KL", "(c) At matched"):
        assert heading in md, heading
    assert "| GRPO | lr 1e-4, step 2 |" in md and "| SFT | lr 3e-4, step 2 |" in md
    assert "Goal" in md and "MET" in md  # retention +0.27 with seed ranges apart, OOD +0.05
    for png in ("accuracy_vs_retention.png", "forgetting_vs_kl.png"):
        assert (tmp_path / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_analyze_reports_no_match_instead_of_inventing_one(tmp_path):
    m = _analyze()
    # GRPO reaches 0.40-0.51 and SFT 0.70-0.81: no pair within 0.02.
    assert m.main(_fake_run(tmp_path, {1: 0.40, 2: 0.50}, {1: 0.70, 2: 0.80})) == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["matched"] is None and summary["seeds"] == 2
    assert "within 0.02" in summary["reason"] and "[0.405, 0.505]" in summary["reason"], summary["reason"]
    md = (tmp_path / "results.md").read_text()
    assert "**No match**" in md and "not assessable" in md and "| GRPO | lr" not in md


def test_run_sh_refuses_uneven_checkpoints_before_running_anything(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "o"), ARM_STEPS="5", POINTS="2")
    proc = subprocess.run(["bash", str(HERE / "run.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: ARM_STEPS (5) must be a positive multiple of POINTS (2)" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_reduced_experiment_end_to_end(tmp_path):
    """run.sh at toy size: 1 seed, a 6-step base, one learning rate per arm (GRPO_LRS / SFT_LRS: the sweep's
    loop and the matching across settings; analyze.py's unit tests cover several), 2 steps each, 3 samples
    per probe task. Six python stages of ~5-15 s each on an idle core; the timeout is generous for a loaded
    machine.
    """
    out = tmp_path / "exp"
    env = dict(os.environ, OUT=str(out), SEEDS="0", BASE_STEPS="6", ARM_STEPS="2", POINTS="1",
               GRPO_LRS="3e-3", SFT_LRS="3e-2", EVAL_N="3", THREADS="1",
               BASE_EXTRA="'model.tiny={hidden_size: 32, num_layers: 1, seed: 0}'",
               EXTRA="grpo.max_completion_length=18", EVAL_EXTRA="eval.batch_size=15",
               GRPO_EXTRA="grpo.num_generations=2 train.per_device_batch_size=4",
               PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    proc = run_command(["bash", str(HERE / "run.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-3000:]
                                  + "\n(the reduced run's timeout is 1200 s: a very loaded machine may need more)")
    for name in ("results.md", "results/summary.json", "results/raw.json", "results/accuracy_vs_retention.png",
                 "results/forgetting_vs_kl.png"):
        assert (out / name).is_file(), name
    raw = json.loads((out / "results" / "raw.json").read_text())
    assert [(p["arm"], p["lr"], p["step"]) for p in raw["points"]] == [
        ("grpo", "3e-3", 2), ("sft", "3e-2", 2)]
    base = raw["base"]["0"]
    for p in [base, *raw["points"]]:
        for v in (p["new_task"], p["ood"], p["retention"], *p["prior"].values()):
            assert 0 <= v <= 1, p
        assert p["n"] == {t: 3 for t in PROBE_TASKS}, p["n"]
        assert math.isfinite(p["kl"]) and p["kl"] >= 0, p
    assert base["kl"] == 0  # the base against itself
    # SFT at these learning rates moves the model away from the base: a KL clearly above zero. (The toy
    # GRPO arm scores 0 on every sampled box, so its groups carry no signal and it stays at the base.)
    assert all(p["kl"] > 1e-3 for p in raw["points"] if p["arm"] == "sft"), raw["points"]
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary["seeds"] == 1
    if summary["matched"] is None:
        assert set(summary) == {"matched", "reason", "seeds"} and summary["reason"]
    else:
        assert set(summary) == {"matched", "seeds"}
        for arm in ("grpo", "sft"):
            for key in ("new_task", "retention", "ood"):
                v = summary["matched"][arm][key]
                assert set(v) == {"mean", "std"} and 0 <= v["mean"] <= 1 and v["std"] == 0
    md = (out / "results.md").read_text()
    assert "## The base, per task" in md and "(c) At matched" in md
    # The arms started from the seed's base, not from the raw tiny model.
    assert str(out / "seed0" / "base") in (out / "seed0" / "grpo" / "lr3e-3" / "config.yaml").read_text()
    # Rerunning reuses every finished stage and only redoes the report.
    again = run_command(["bash", str(HERE / "run.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
    assert again.returncode == 0 and "== " not in again.stdout, again.stdout[-2000:]
