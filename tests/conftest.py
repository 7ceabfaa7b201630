"""Fixtures shared across test modules: the tiny Qwen2.5-VL most engine tests run on.

Built offline through the installed family (the same code path ``model.tiny`` takes), once per
session; each module that needs it loaded gets its own copy, since tests may change weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_qwen_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Qwen2.5-VL checkpoint (seed 0) on disk; tests read it and never write into it."""
    from core.plugins import PluginHost

    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        fam_cls = PluginHost("qwen-vl").registry.get("models", "qwen2_5_vl")
    except LookupError as exc:
        pytest.skip(f"needs the qwen-vl plugin: {exc}")
    return Path(fam_cls.build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen") / "tiny-qwen2_5_vl", seed=0))


@pytest.fixture(scope="module")
def tiny_qwen(tiny_qwen_path: Path) -> tuple[Any, Any, Any]:
    """``(family, model, processor)``: that checkpoint loaded the training way (float32, eval mode), per module."""
    import torch

    from core.plugins import PluginHost

    family = PluginHost("qwen-vl").registry.get("models", "qwen2_5_vl").from_options({})
    model = family.load_model(tiny_qwen_path, dtype=torch.float32).eval()
    return family, model, family.load_processor(tiny_qwen_path)
