"""A non-finite loss or gradient stops the run with a message naming the likely setting; no NaN weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from core.config import build_config
from core.grpo.guard import NonFiniteError, check_finite

BASE = {"model": {"path": "/m"}, "task": {"name": "toy"}, "rewards": [{"name": "iou", "weight": 2.0}]}


def test_guard_names_the_settings_and_clears_gradients():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    (model(torch.ones(1, 2)) * float("nan")).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = build_config(BASE, ["train.learning_rate=0.5", "train.max_grad_norm=null"])
    with pytest.raises(NonFiniteError) as err:
        check_finite(float("nan"), None, cfg, 3, opt)
    msg = str(err.value)
    assert msg.startswith("non-finite loss at optimizer update 3")
    for part in ("train.learning_rate=0.5", "grpo.temperature=1", "iou=2", "train.max_grad_norm=null"):
        assert part in msg, msg
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # nothing left to apply
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(NonFiniteError, match="non-finite gradient norm"):
        check_finite(1.0, math.inf, build_config(BASE), 1)
    check_finite(1.0, None, build_config(BASE), 1)  # unmeasured norm, finite loss: fine
    check_finite(1.0, 2.0, build_config(BASE), 1)


def test_training_run_stops_before_writing_nan_weights(tmp_path, monkeypatch, capsys):
    """A real tiny run whose loss turns NaN (as an overflow would): exit 1 with one line, no checkpoint."""
    import core.grpo.update as update
    from core.train import main

    real = update.grpo_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")  # NaN flows through backward into every gradient
        return out

    monkeypatch.setattr(update, "grpo_loss", poisoned)
    cfg = {
        "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "tiny"), "tiny": {"hidden_size": 32, "num_layers": 1}},
        "task": {"name": "synthetic_color", "options": {"num_train": 8, "num_eval": 2}},
        "rewards": [{"name": "all_match"}],
        "grpo": {"num_generations": 2, "max_completion_length": 2, "beta": 0.0},
        "train": {"per_device_batch_size": 4, "max_steps": 2},
        "logging": {"output_dir": str(tmp_path / "out"), "tensorboard": False, "progress_bar": False,
                    "plot": False},
        "eval": {"enabled": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["--config", str(path), "--plugins", "qwen-vl,synthetic,text"])
    err = capsys.readouterr().err
    assert rc == 1, err
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert line and "non-finite loss and gradient norm at optimizer update 1" in line[0], err
    assert "Traceback" not in err
    assert not list(Path(tmp_path / "out").glob("checkpoint-*"))
