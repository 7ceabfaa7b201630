"""The quickstart runs with Qwen2-VL, Qwen2.5-VL and InternVL by changing one config line.

``examples/quickstart/config.yaml`` is copied with only its ``family:`` line changed; every
run gets the same overrides (a tmp model path and output dir, fewer steps and samples) and
runs as ``python -m core.train``. The three runs are started together to use both cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.testing.procs import communicate

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart" / "config.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
#: family name -> the ``model_type`` its tiny checkpoint must have.
FAMILIES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "internvl": "internvl"}
STEPS = 2
COMMON = [f"train.max_steps={STEPS}", "train.per_device_batch_size=16", "task.options={num_train: 32, num_eval: 8}",
          "eval.num_samples=8", "eval.batch_size=8", "logging.tensorboard=false", "logging.plot=false",
          "logging.progress_bar=false"]


def with_family(family: str) -> str:
    """The quickstart config text with its ``family:`` line set to ``family`` (nothing else changed)."""
    lines = QUICKSTART.read_text().splitlines(keepends=True)
    hits = [i for i, ln in enumerate(lines) if ln.strip().startswith("family:")]
    assert len(hits) == 1, "the quickstart config should have exactly one `family:` line"
    indent = lines[hits[0]][: len(lines[hits[0]]) - len(lines[hits[0]].lstrip())]
    lines[hits[0]] = f"{indent}family: {family}\n"
    return "".join(lines)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family_switch")
    procs = {}
    for fam in FAMILIES:
        cfg = tmp / f"{fam}.yaml"
        cfg.write_text(with_family(fam))
        args = [sys.executable, "-m", "core.train", "--config", str(cfg), f"model.path={tmp / fam / 'tiny'}",
                f"logging.output_dir={tmp / fam / 'out'}", *COMMON]
        procs[fam] = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
    results = {}
    for fam, proc in procs.items():
        out, err = communicate(proc, timeout=300)
        results[fam] = (proc.returncode, out, err)
    return tmp, results


def test_config_differs_in_one_line():
    base = QUICKSTART.read_text().splitlines()
    for fam in FAMILIES:
        changed = [(a, b) for a, b in zip(base, with_family(fam).splitlines(), strict=True) if a != b]
        assert len(changed) == (fam != "qwen2_5_vl"), changed


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quickstart_trains_with_family(runs, family):
    from safetensors.torch import load_file

    tmp, results = runs
    rc, out, err = results[family]
    assert rc == 0, out[-2000:] + err[-4000:]
    run_dir = tmp / family / "out"
    # The family switch took effect: the tiny checkpoint built is that architecture.
    cfg = json.loads((tmp / family / "tiny" / "config.json").read_text())
    assert cfg["model_type"] == FAMILIES[family]
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all("rewards/all_match" in r and r["completion_length"] > 0 for r in rows)
    ev = json.loads((run_dir / "eval.json").read_text())
    assert set(ev) == {"before", "after"} and ev["after"]["num_samples"] == 8
    assert "eval before training" in out and "eval after training" in out
    # A random policy rarely scores in two steps (zero advantages), so the weights may not move;
    # that one GRPO step changes them is each family's conformance check ``grpo_step``.
    ckpt = json.loads((run_dir / f"checkpoint-{STEPS}" / "config.json").read_text())
    assert ckpt["model_type"] == FAMILIES[family]
    assert load_file(str(run_dir / f"checkpoint-{STEPS}" / "model.safetensors")).keys() == \
        load_file(str(tmp / family / "tiny" / "model.safetensors")).keys()
