"""The RL-vs-SFT grounding experiment (``examples/grounding_cpu/rl_vs_sft.py``): its arithmetic, and a
reduced run end to end (one seed, a few steps, a toy model) through the real commands."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "grounding_cpu" / "rl_vs_sft.py"


def _mod():
    spec = importlib.util.spec_from_file_location("rl_vs_sft", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interpolate_and_equal_cpu_summary():
    m = _mod()
    assert m.interpolate([0, 10, 20], [0.0, 0.5, 0.7], 15) == pytest.approx(0.6)
    assert m.interpolate([0, 10], [0.2, 0.4], -1) == 0.2 and m.interpolate([0, 10], [0.2, 0.4], 99) == 0.4

    def pt(cpu: float, acc: float) -> dict:
        return {"cpu_s": cpu, "id": {"acc@0.5": acc, "mean_iou": acc / 2}}

    results = {"splits": ["id"], "seeds": [0, 1], "runs": {
        "0": {"grpo": {"points": [pt(0, 0.5), pt(100, 0.9)]},
              "sft": {"points": [pt(0, 0.5), pt(50, 0.6), pt(200, 0.8)]}},
        "1": {"grpo": {"points": [pt(0, 0.4), pt(80, 0.6)]}, "sft": {"points": [pt(0, 0.4), pt(80, 0.7)]}},
    }}
    s = m.summarize(results)
    assert s["equal_cpu_s"] == {"0": 100, "1": 80}
    # seed 0 SFT at 100 CPU s: between (50, 0.6) and (200, 0.8) -> 0.6 + 0.2 * 50 / 150
    assert s["equal_cpu"]["sft"]["id"]["acc@0.5"]["values"] == pytest.approx([0.6 + 0.2 / 3, 0.7])
    assert s["end"]["grpo"]["id"]["acc@0.5"]["mean"] == pytest.approx(0.75)
    assert s["end"]["grpo"]["id"]["acc@0.5"]["std"] == pytest.approx(math.sqrt(2 * 0.15**2))  # sample std
    assert s["end"]["sft"]["id"]["mean_iou"]["values"] == pytest.approx([0.4, 0.35])


@pytest.mark.slow
def test_reduced_experiment_end_to_end(tmp_path):
    out = tmp_path / "exp"
    toy = f"model.path={tmp_path / 'tiny'} 'model.tiny={{hidden_size: 32, num_layers: 1, seed: 0}}' " \
          "task.options.num_train=32 grpo.max_completion_length=18"
    proc = run_command(
        [sys.executable, str(SCRIPT), "--out", str(out), "--seeds", "0", "--sft-steps", "6", "--grpo-steps", "4",
         "--points", "2", "--eval-n", "4", "--eval-batch", "4", "--extra", toy,
         "--grpo-extra", "grpo.num_generations=2 train.per_device_batch_size=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.md", "results.json", "accuracy_vs_cpu.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["splits"] == ["id", "ood_reasoning", "ood_visual"] and res["seeds"] == [0]
    for arm in ("grpo", "sft"):
        pts = res["runs"]["0"][arm]["points"]
        assert len(pts) == 3  # the warm start + 2 checkpoints
        assert pts[0]["cpu_s"] == 0 and 0 < pts[1]["cpu_s"] < pts[2]["cpu_s"]
        for p in pts:
            for split in res["splits"]:
                assert 0 <= p[split]["acc@0.5"] <= 1 and 0 <= p[split]["mean_iou"] <= 1 and p[split]["n"] == 4
    assert [p["step"] for p in res["runs"]["0"]["grpo"]["points"]] == [0, 2, 4]
    assert res["sft_steps"] >= 2 and res["sft_steps"] % 2 == 0  # sized from GRPO's CPU seconds, even spacing
    md = (out / "results.md").read_text()
    assert "## At the end of training" in md and "## At equal CPU time" in md and "| ood_reasoning |" in md
    # The arms started from the warm start, not from the raw tiny model.
    grpo_cfg = (out / "seed0" / "grpo" / "config.yaml").read_text()
    assert str(out / "warm_start") in grpo_cfg


def test_one_seed_tables_show_no_spread():
    m = _mod()

    def pt(cpu: float, acc: float) -> dict:
        return {"cpu_s": cpu, "id": {"acc@0.5": acc, "mean_iou": acc / 2}}

    results = {"splits": ["id"], "seeds": [0], "machine": "x", "date": "d", "command": "c", "eval_n": 4,
               "grpo_steps": 4, "sft_steps": 4,
               "warm_start": {"steps": 6, "cpu_s": 1.0, "eval": {"id": {"acc@0.5": 0.5, "mean_iou": 0.25}}},
               "runs": {"0": {"grpo": {"points": [pt(0, 0.5), pt(10, 0.75)]},
                              "sft": {"points": [pt(0, 0.5), pt(10, 0.625)]}}}}
    md = m.markdown(results, m.summarize(results))
    assert "±" not in md and "| id | 0.750 | 0.625 | +0.125 | 0.375 | 0.312 |" in md, md
    assert "One seed" in md
    results["seeds"], results["runs"]["1"] = [0, 1], results["runs"]["0"]
    assert "0.750 ± 0.000 [0.750, 0.750]" in m.markdown(results, m.summarize(results))


def test_a_running_stage_shows_progress_on_the_console(tmp_path, capsys):
    m = _mod()
    # Prints a step line every 0.3 s for ~1.5 s; progress is polled every 0.2 s, so lines show up even when a
    # shared machine delays the child (the check needs one poll between its first print and its exit).
    child = "import time\nfor i in range(1, 6):\n    print(f'step {i}/5', flush=True)\n    time.sleep(0.3)\n"
    cpu = m.run_stage([sys.executable, "-c", child], tmp_path / "logs" / "toy.log", None, every=0.2)
    out = capsys.readouterr().out
    assert cpu >= 0 and "done in" in out
    assert any(ln.startswith("   [toy ") and "step " in ln for ln in out.splitlines()), out
    assert (tmp_path / "logs" / "toy.log").read_text().count("step ") == 5
    assert m.last_line(tmp_path / "logs" / "toy.log") == "step 5/5"
