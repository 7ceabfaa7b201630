"""Compute-device interface (CPU built in; CUDA, Ascend NPU ... as plugins)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, ClassVar

from core.interfaces.base import Component

if TYPE_CHECKING:
    import torch


class Device(Component):
    """A compute device kind.

    Class attributes:
        priority: higher wins when the config says ``device: auto`` and several are usable.
        distributed_backend: the ``torch.distributed`` backend (``gloo``, ``nccl``, ``hccl``).
    """

    priority: ClassVar[int] = 0
    distributed_backend: ClassVar[str] = "gloo"

    def available(self) -> tuple[bool, str]:
        """``(usable, reason)``: the reason says why not (missing driver, no hardware ...)."""
        return True, ""

    def torch_device(self, local_rank: int = 0) -> torch.device:
        """The ``torch.device`` for this process."""
        import torch

        return torch.device("cpu")

    def supported_dtypes(self) -> list[str]:
        """Dtype names usable for training on this device."""
        return ["float32"]

    def attention_implementations(self) -> list[str]:
        """Attention kernels usable here, best first (``flash_attention_2``, ``sdpa``, ``eager``)."""
        return ["sdpa", "eager"]

    def memory_stats(self) -> dict[str, float]:
        """Memory figures (GiB) for the logs, e.g. ``{"mem_allocated_gib": 1.2}``."""
        return {}

    def prepare_model(self, model: Any) -> None:
        """Adapt a loaded model to this device in place (e.g. faster kernels); default: nothing.

        Called once for every model the engine loads (the policy, with its LoRA adapters if any,
        the reference model, evaluation and serving models), after loading and before
        ``accelerate`` wraps it. Must keep the parameters, the state dict and the model's
        results (up to float rounding).
        """

    def seed(self, seed: int) -> None:
        """Seed every RNG this device uses."""
        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
