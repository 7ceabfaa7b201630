"""One home per idea: the behaviours that used to differ between the apps' copies.

- one dtype rule: training, evaluation and serving load a checkpoint in the same precision,
  also on an accelerator without bfloat16 (where serving used to pick float16, training float32);
- one evaluator: the accuracy a training run prints equals the one ``core.evaluate`` writes for
  the same checkpoint and split;
- one exit-code table: a plugin's ``sys.exit(0)`` inside a run is a failure, not a success.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, build_config, load_raw
from core.interfaces import Device
from core.plugins import PluginHost
from core.plugins.plan import make_plan, plan_without_groups
from core.runtime import loader
from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "core" / "defaults" / "quickstart.yaml"


class _Accel(Device):
    """A fake accelerator: its torch device type is ``cuda`` (nothing is ever put on it here)."""

    name = "fake_accel"

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cuda", local_rank)


class NoBf16(_Accel):
    def supported_dtypes(self) -> list[str]:
        return ["float32", "float16"]


class WithBf16(_Accel):
    def supported_dtypes(self) -> list[str]:
        return ["float32", "bfloat16", "float16"]


def test_dtype_rule_on_an_accelerator_without_bf16():
    # auto never picks float16: training in it without loss scaling is unsafe, and the same
    # checkpoint must not be served in a precision it was not trained in.
    assert loader.resolve_dtype("auto", NoBf16()) == torch.float32
    assert loader.resolve_dtype("auto", WithBf16()) == torch.bfloat16
    assert loader.resolve_dtype("auto", Device()) == torch.float32  # the CPU: bf16 is slow there
    assert loader.resolve_dtype("float16", NoBf16()) == torch.float16
    with pytest.raises(ConfigError, match="dtype bfloat16 is not supported by device 'fake_accel'"):
        loader.resolve_dtype("bfloat16", NoBf16())


def test_train_infer_and_serve_load_through_one_rule(tmp_path, monkeypatch):
    """All three loading paths ask ``resolve_dtype`` and end in the same precision."""
    host = PluginHost("qwen-vl,synthetic,text")
    cfg = build_config(load_raw(QUICKSTART), [f"model.path={tmp_path / 'tiny'}", "model.dtype=bfloat16"])
    plan = make_plan(cfg, host.registry, 1)
    asked: list[str] = []
    real = loader.resolve_dtype

    def spy(name, device, device_type=None):
        asked.append(name)
        return real(name, device, device_type)

    monkeypatch.setattr(loader, "resolve_dtype", spy)
    train = loader.load_policy(plan, host.registry, phase="train")
    infer = loader.load_policy(plan_without_groups(cfg, host.registry), host.registry, phase="infer")
    serve = loader.load_checkpoint(tmp_path / "tiny", train.family, plan.device.cls(), dtype="bfloat16")
    assert asked == ["bfloat16"] * 3
    for bundle in (train, infer, serve):
        assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_training_eval_equals_core_evaluate_on_the_same_checkpoint(tmp_path):
    """The 'after training' accuracy in eval.json is the number core.evaluate computes from the saved checkpoint."""
    out = tmp_path / "run"
    common = [f"model.path={tmp_path / 'tiny'}", "eval.num_samples=24", "eval.batch_size=8"]
    train = run_command([sys.executable, "-m", "core.train", *common, f"logging.output_dir={out}",
                         "train.max_steps=12", "checkpoint.save_every=0", "logging.tensorboard=false",
                         "logging.progress_bar=false", "logging.plot=false"],
                        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert train.returncode == 0, train.stderr[-3000:]
    after = json.loads((out / "eval.json").read_text())["after"]
    ev_out = tmp_path / "eval"
    ev = run_command([sys.executable, "-m", "core.evaluate", "--checkpoint", str(out), "--limit", "24",
                      "--out", str(ev_out), "--quiet", *common],
                     cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((ev_out / "summary.json").read_text())
    assert summary["checkpoint"].endswith("checkpoint-12")
    (per,) = summary["datasets"].values()
    assert after["metric"] == "exact_match" and set(per) == {"exact_match"}
    assert after["accuracy"] == per["exact_match"]["accuracy"]
    assert after["num_samples"] == per["exact_match"]["n"] == 24
    assert after["datasets"] == summary["datasets"]


def test_a_plugin_calling_sys_exit_fails_the_run(tmp_path, capsys):
    """``sys.exit(0)`` from inside an app's library call is exit 1 with the place named, never success."""
    from core.cli import run_app

    def body() -> int:
        sys.exit(0)

    assert run_app(body) == 1
    err = capsys.readouterr().err
    assert "stopped by sys.exit(0)" in err and "test_one_home.py" in err
