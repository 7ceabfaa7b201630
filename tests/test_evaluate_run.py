"""``core.evaluate`` end to end on tiny offline checkpoints and the synthetic tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import build_config
from core.evaluate import main
from core.interfaces import Completion, RolloutEngine
from core.plugins import PluginHost
from core.plugins.plan import plan_without_groups
from core.runtime.evaluator import evaluate
from core.runtime.loader import load_policy
from core.testing import ComponentsPlugin
from core.testing.procs import scaled

PLUGINS = "qwen-vl,synthetic,grounding,text"


@pytest.fixture(scope="module")
def tiny(tiny_qwen_path):
    """The shared tiny Qwen2.5-VL checkpoint (tests/conftest.py); the synthetic tasks must be installed too."""
    try:
        PluginHost(PLUGINS).registry.get("tasks", "synthetic_grounding")
    except LookupError as exc:
        pytest.skip(f"needs the synthetic plugin: {exc}")
    return tiny_qwen_path


def _config(tmp_path: Path, tiny: Path, **task_options) -> Path:
    cfg = {
        "model": {"path": str(tiny)},
        "task": {"name": "synthetic_grounding", "options": {"num_eval": 12, "seed": 0, **task_options}},
        "rewards": [{"name": "iou", "options": {"require_answer_tag": False}}],
        "grpo": {"num_generations": 2, "max_completion_length": 6},
        "train": {"per_device_batch_size": 2},
        "eval": {"batch_size": 4},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _read(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


def test_cli_writes_predictions_and_summary(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    rc = main(["--config", str(_config(tmp_path, tiny)), "--limit", "5", "--batch-size", "2", "--out", str(out),
               "--plugins", PLUGINS, "--quiet"])
    assert rc == 0
    rows, summary = _read(out)
    assert [r["id"] for r in rows] == [f"synthetic_grounding/eval/{i:06d}" for i in range(5)]
    r = rows[0]
    assert set(r) >= {"id", "dataset", "kind", "prompt", "completion", "solution", "metrics"}
    assert r["kind"] == "rec" and r["prompt"].startswith("Locate the") and len(r["solution"]) == 4
    assert set(r["metrics"]) == {"iou", "correct", "parsed", "pred_box", "gold_box"}
    rec = summary["datasets"]["synthetic_grounding"]["rec"]
    assert rec["n"] == 5 and 0.0 <= rec["acc@0.5"] <= 1.0
    assert summary["decoding"]["greedy"] is True and summary["num_samples"] == 5
    printed = capsys.readouterr().out
    assert "acc@0.5" in printed and "synthetic_grounding" in printed
    # Greedy decoding: a second run gives the same completions.
    out2 = tmp_path / "out2"
    assert main(["--config", str(_config(tmp_path, tiny)), "--limit", "5", "--batch-size", "2", "--out",
                 str(out2), "--plugins", PLUGINS, "--quiet"]) == 0
    assert [x["completion"] for x in _read(out2)[0]] == [x["completion"] for x in rows]


def test_cli_errors_are_clear(tmp_path, tiny, capsys):
    cfg = str(_config(tmp_path, tiny))
    assert main(["--config", cfg, "--checkpoint", str(tmp_path), "--plugins", PLUGINS]) == 2
    assert "no complete checkpoint-N folder" in capsys.readouterr().err
    assert main(["--config", cfg, "--limit", "0", "--plugins", PLUGINS]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert main(["--config", cfg, "--split", "nope", "--plugins", PLUGINS, "--quiet"]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err
    assert main(["--config", cfg, "--rollout", "nope", "--plugins", PLUGINS]) == 2
    assert "rollout.name" in capsys.readouterr().err


class OracleRollout(RolloutEngine):
    """Answers with pre-set texts, in call order (stands in for a model that knows the boxes)."""

    name = "oracle"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.answers: list[str] = []

    def generate(self, prompts, sampling):
        return [[Completion(ids=[1], text=self.answers.pop(0))] for _ in prompts]


def test_boxes_in_the_model_convention_score_one_through_the_real_family(tmp_path, tiny):
    """Qwen2.5-VL answers in resized-input pixels; evaluation maps them back before the IoU."""
    from core.supervised import answer_for

    host = PluginHost(PLUGINS)
    host.register(ComponentsPlugin(OracleRollout), "test-oracle")
    cfg = build_config(json.loads(_config(tmp_path, tiny, num_objects=2).read_text()), ["rollout.name=oracle"])
    plan = plan_without_groups(cfg, host.registry)
    bundle = load_policy(plan, host.registry, phase="infer", load_model=False)
    samples = list(host.registry.create("tasks", "synthetic_grounding", plan.options["task"]).load("eval"))[:6]
    engine = OracleRollout()
    engine.setup(None)

    def run(answers):
        engine.answers = list(answers)
        return evaluate(plan, host.registry, bundle, engine, samples, max_new_tokens=8, batch_size=4,
                        progress=False).summary["synthetic_grounding"]["rec"]

    model_space = [answer_for(s, bundle.family, bundle.processor, s.load_images()) for s in samples]
    assert run(model_space) == {"n": 6, "skipped": 0, "acc@0.5": 1.0, "mean_iou": pytest.approx(1.0, abs=0.1),
                                "parse_rate": 1.0}
    # The same boxes written in original pixels (the wrong convention for this family) miss.
    original = ["[" + ", ".join(str(v) for v in s.solution) + "]" for s in samples]
    assert run(original)["acc@0.5"] < 0.5


def test_server_back_end_matches_the_built_in_one(tmp_path, tiny):
    """``core.serve`` + the ``openai_server`` engine give the built-in engine's greedy answers."""
    try:
        PluginHost("xllm").registry.get("rollouts", "openai_server")
    except Exception as exc:
        pytest.skip(f"needs the openai_server rollout engine (vlmr1-plugin-xllm): {exc}")
    from core.serving import ServerProcess

    cfg = str(_config(tmp_path, tiny))
    common = ["--config", cfg, "--limit", "4", "--batch-size", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "local"), "--plugins", PLUGINS]) == 0
    with ServerProcess(tiny, ["--plugins", "qwen-vl"], startup_timeout=scaled(300)) as srv:
        assert main([*common, "--out", str(tmp_path / "server"), "--plugins", PLUGINS + ",xllm",
                     "--rollout", "openai_server", f"rollout.options.base_url={srv.url}",
                     "rollout.options.max_retries=0"]) == 0
    local, server = _read(tmp_path / "local"), _read(tmp_path / "server")
    assert [r["completion"] for r in server[0]] == [r["completion"] for r in local[0]]
    assert server[1]["datasets"] == local[1]["datasets"]
    assert server[1]["rollout"] == "openai_server"


def test_unreachable_server_is_one_error_line_and_exit_1(tmp_path, tiny, capsys):
    """A rollout server nobody listens on: ``error: ...`` naming its URL, exit 1, no traceback."""
    import socket

    try:
        PluginHost("xllm").registry.get("rollouts", "openai_server")
    except Exception as exc:
        pytest.skip(f"needs the openai_server rollout engine (vlmr1-plugin-xllm): {exc}")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = str(_config(tmp_path, tiny))
    code = main(["--config", cfg, "--limit", "1", "--quiet", "--out", str(tmp_path / "x"), "--plugins",
                 PLUGINS + ",xllm", "--rollout", "openai_server", f"rollout.options.base_url=http://127.0.0.1:{port}/v1",
                 "rollout.options.max_retries=0"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: ") and f"127.0.0.1:{port}" in err and "Traceback" not in err
