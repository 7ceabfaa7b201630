"""Stop a step whose loss or gradient is not finite, before the optimizer writes NaN weights."""

from __future__ import annotations

import math
from typing import Any


class NonFiniteError(RuntimeError):
    """The loss or gradient norm of a step is inf/NaN; the weights were left unchanged."""


def check_finite(loss: float, grad_norm: float | None, cfg: Any, update: int, optimizer: Any = None) -> None:
    """Raise :class:`NonFiniteError` naming the settings that most often cause it.

    ``grad_norm`` is None when it was not measured (clipping off, or DeepSpeed clipping inside
    its engine): then only the loss is checked. The gradient norm is the same on every rank
    (measured after the all-reduce), so every rank stops together. ``optimizer``'s gradients
    are cleared first, so nothing non-finite can be applied later.
    """
    bad = [name for name, v in (("loss", loss), ("gradient norm", grad_norm)) if v is not None and not math.isfinite(v)]
    if not bad:
        return
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    t, g = cfg.train, cfg.grpo
    hints = [f"train.learning_rate={t.learning_rate:g}", f"grpo.temperature={g.temperature:g}",
             "the rewards' weights (" + ", ".join(f"{r.name}={r.weight:g}" for r in cfg.rewards) + ")"]
    if t.max_grad_norm is None:
        hints.append("train.max_grad_norm=null (no clipping)")
    if cfg.model.dtype == "float16":
        hints.append("model.dtype=float16 (overflows; bfloat16 or float32 are safer)")
    raise NonFiniteError(
        f"non-finite {' and '.join(bad)} at optimizer update {update} (loss {loss}, grad norm {grad_norm}); the "
        f"update was skipped and the run stopped so no NaN weights are saved. Likely causes: {', '.join(hints)}. "
        "Lower the learning rate or enable clipping, then rerun with --resume from the last checkpoint.")
