"""The built-in CPU device: always available, ``gloo`` for multi-process runs."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import Device

log = logging.getLogger(__name__)


class CPUDevice(Device):
    """The CPU, always available; ``gloo`` for multi-process runs."""

    name = "cpu"
    description = "CPU (always available; gloo for multi-process)"
    priority = 0
    distributed_backend = "gloo"

    class Options(BaseModel):
        """Options of the CPU device.

        ``onednn_linear``: run float32 linear layers (forward and backward) through oneDNN
        instead of MKL (:mod:`core.plugins.builtin.onednn`; ~2x faster GEMMs measured on an AMD
        EPYC, same precision, rounding-level differences).
        """

        model_config = ConfigDict(extra="forbid")
        onednn_linear: bool = Field(True, description="float32 nn.Linear layers through oneDNN (forward and "
                                                      "backward) instead of MKL; false = PyTorch's own path")

    def supported_dtypes(self) -> list[str]:
        """bfloat16 works on CPU but is slow; float32 is the default."""
        return ["float32", "bfloat16"]

    def memory_stats(self) -> dict[str, float]:
        """Resident set size of this process."""
        try:
            import psutil

            return {"rss_gib": psutil.Process().memory_info().rss / 2**30}
        except ImportError:  # psutil is optional
            return {}

    def prepare_model(self, model: Any) -> None:
        """With ``onednn_linear``, route the model's float32 ``nn.Linear`` layers through oneDNN."""
        if not getattr(self.options, "onednn_linear", False):
            return
        from core.plugins.builtin.decode import sharded_across_ranks
        from core.plugins.builtin.onednn import use_onednn_linears

        if sharded_across_ranks(model):  # FSDP / ZeRO-3 manage the weights around each forward themselves
            return
        n = use_onednn_linears(model)
        log.debug("oneDNN linears: %d layers of %s", n, type(model).__name__)
