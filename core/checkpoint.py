"""Atomic checkpoints and exact resume.

A checkpoint folder ``OUTPUT/checkpoint-<step>/`` holds a standard transformers checkpoint
(``model.safetensors``, ``config.json``, ``generation_config.json``, processor files; a PEFT
adapter under LoRA) plus ``trainer_state.pt`` (optimizer, scheduler, RNG states) and
``trainer_state.json`` (step, data position, the run config). It is written to a temporary
sibling folder and renamed when complete, so a crash never leaves a half checkpoint where
resume would find it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    """Every RNG state a CPU/CUDA run depends on."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_JSON).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    save_model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
    is_main: bool = True,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; prune to the last ``keep_last``.

    ``save_model(folder)`` writes the transformers/PEFT files (it may gather sharded
    weights, so every process calls this function; only the main one writes).
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    save_model(tmp)
    if not is_main:
        return final
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / STATE_PT)
    (tmp / STATE_JSON).write_text(json.dumps({"step": step, **state}, indent=2, default=str))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. final == last periodic): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(torch state with optimizer/scheduler/rng, json state with step ...)``."""
    ckpt = Path(ckpt)
    blob = torch.load(ckpt / STATE_PT, map_location="cpu", weights_only=False)
    meta = json.loads((ckpt / STATE_JSON).read_text())
    return blob, meta


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
