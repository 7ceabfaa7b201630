"""The built-in CPU device: always available, ``gloo`` for multi-process runs."""

from __future__ import annotations

from core.interfaces import Device


class CPUDevice(Device):
    """The CPU, always available; ``gloo`` for multi-process runs."""

    name = "cpu"
    description = "CPU (always available; gloo for multi-process)"
    priority = 0
    distributed_backend = "gloo"

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
