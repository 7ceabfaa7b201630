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
