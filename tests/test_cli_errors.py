"""One-line errors from the CLIs for failures of the environment: missing extras, a full disk."""

from __future__ import annotations

import errno
import importlib.util

import pytest
import yaml

BASE = {
    "plugins": ["qwen-vl", "synthetic", "text"],
    "model": {"path": "/no/such/model", "family": "qwen2_5_vl"},
    "task": {"name": "synthetic_color", "options": {"num_train": 8, "num_eval": 2}},
    "rewards": [{"name": "all_match"}],
    "grpo": {"num_generations": 2},
    "train": {"per_device_batch_size": 2, "max_steps": 1},
    "device": {"name": "cpu"},
}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    (tmp_path / "model").mkdir()  # exists (the runs here stop before loading it)
    path.write_text(yaml.safe_dump({**BASE, "model": {"path": str(tmp_path / "model"), "family": "qwen2_5_vl"},
                                    "logging": {"output_dir": str(tmp_path / "out"), "tensorboard": False}}))
    return path


@pytest.fixture
def without(monkeypatch):
    real = importlib.util.find_spec

    def hide(*names: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n in names else real(n, *a, **k))
    return hide


def test_sft_without_its_extra_prints_the_install_command(config, without, capsys):
    from core.sft import main

    without("trl", "datasets")
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == "error: python -m core.sft needs trl and datasets, which are not installed: " \
                  "pip install 'vlmr1[sft]'\n"


def test_wandb_without_its_extra_is_refused_before_weights_load(config, without, capsys):
    from core.train import main

    without("wandb")
    assert main(["--config", str(config), "logging.wandb=true"]) == 2
    assert capsys.readouterr().err == ("error: logging.wandb=true needs wandb, which is not installed: "
                                       "pip install 'vlmr1[wandb]'\n")


def test_disk_full_during_training_is_one_line(config, monkeypatch, capsys):
    import core.grpo.trainer as trainer
    from core.train import main

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/metrics.jsonl")

    monkeypatch.setattr(trainer, "run", full)
    assert main(["--config", str(config)]) == 1
    assert capsys.readouterr().err == ("error: disk full while writing /out/metrics.jsonl: free space in "
                                       "logging.output_dir and rerun with --resume\n")


def checkpoint_in(out, config_path, *overrides: str):
    """A real checkpoint-2 in ``out`` written for the config at ``config_path`` (plus overrides)."""
    import torch

    from core.config import build_config, load_raw
    from core.runtime.checkpoint import save_checkpoint

    cfg = build_config(load_raw(config_path), list(overrides))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(out, 2, save_model=lambda f: (f / "config.json").write_text("{}"), optimizer=opt,
                           scheduler=sched, state={"config": cfg.model_dump(mode="json"), "num_processes": 1},
                           keep_last=2)


def test_resume_with_changed_settings_is_refused_before_weights_load(config, tmp_path, capsys):
    from core.train import main

    checkpoint_in(tmp_path / "out", config)
    assert main(["--config", str(config), "--resume", "train.seed=5", "grpo.beta=0.1"]) == 2
    captured = capsys.readouterr()
    assert "note: changed since checkpoint-2: grpo.beta: 0.04 -> 0.1" in captured.out
    assert captured.err.startswith("error: resuming from ") and "train.seed: 0 -> 5" in captured.err
    assert "--resume-force" in captured.err and "Traceback" not in captured.err


def test_tampered_checkpoint_is_refused_by_the_cli(config, tmp_path, capsys):
    from core.train import main

    ckpt = checkpoint_in(tmp_path / "out", config)
    state = ckpt / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": 9'))
    assert main(["--config", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {ckpt} cannot be used: trainer_state.json does not match its "
                          "SHA-256 in manifest.json"), err
