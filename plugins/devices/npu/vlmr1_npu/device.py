"""The ``npu`` compute device: Huawei Ascend NPUs through torch-npu, HCCL between processes.

``torch_npu`` is imported inside the methods only: importing it loads the CANN runtime, which
must not happen on machines that merely list plugins. Importing ``torch_npu`` registers the
``npu`` device type with torch (torch's "privateuse1" backend renamed to ``npu``) and the
``torch.npu`` module, a mirror of ``torch.cuda``; this module goes through ``torch_npu.npu``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import Device

if TYPE_CHECKING:
    import torch

GIB = 2**30

#: Device-name prefixes of Ascend chips that compute bfloat16 natively (Atlas A2 "910B" and
#: A3 "910_93"). Used only where torch_npu lacks ``is_bf16_supported``. First-generation
#: 910 (910A/910ProA/910ProB/910PremiumA) and the 310 inference chips have no bf16.
BF16_SOCS = ("Ascend910B", "Ascend910_93", "Ascend910C")

INSTALL_HINT = ("install torch-npu matching torch {torch} (same major.minor) and the machine's CANN toolkit, "
                "then `source /usr/local/Ascend/ascend-toolkit/set_env.sh`")


def _visible() -> str:
    """The device-visibility variable, for reasons."""
    value = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    return f" (ASCEND_RT_VISIBLE_DEVICES={value!r})" if value is not None else ""


class NPUDevice(Device):
    """One Ascend NPU per process (``npu:<local_rank>``); ``hccl`` for multi-process runs.

    Priority 10, like CUDA: a machine has one or the other. Process-wide settings are applied
    by :meth:`torch_device`, which the engine calls once per process.
    """

    name = "npu"
    description = "Huawei Ascend NPU via torch-npu (bf16 on 910B/A2+, HCCL)"
    priority = 10
    distributed_backend = "hccl"

    class Options(BaseModel):
        """Options of the ``npu`` device (``device.options`` in the run config)."""

        model_config = ConfigDict(extra="forbid")
        jit_compile: bool | None = Field(
            None,
            description="torch_npu.npu.set_compile_mode(jit_compile=...); False (binary kernels) is Ascend's advice "
                        "for LLM training on 910B; None leaves torch_npu's default")

    # ---- torch_npu access -------------------------------------------------------------
    @staticmethod
    def _torch_npu() -> Any:
        """Import torch_npu (raises ImportError etc. exactly as the import does)."""
        import torch_npu

        return torch_npu

    def _npu(self) -> Any:
        """The ``torch_npu.npu`` module (the same object as ``torch.npu``), or raise with the reason."""
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"device 'npu' is not usable: {why}")
        return self._torch_npu().npu

    # ---- availability -----------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        """Usable when torch_npu imports, matches torch, and sees at least one NPU."""
        import torch

        hint = INSTALL_HINT.format(torch=torch.__version__)
        try:
            torch_npu = self._torch_npu()
        except ModuleNotFoundError as exc:
            if exc.name == "torch_npu":
                return False, f"torch_npu is not installed; {hint}"
            return False, f"torch_npu failed to import: {exc}; {hint}"
        except Exception as exc:  # a missing CANN library surfaces as ImportError/OSError/RuntimeError
            return False, f"torch_npu failed to import ({type(exc).__name__}: {exc}); {hint}"
        npu_ver = str(getattr(torch_npu, "__version__", ""))
        if npu_ver and _major_minor(npu_ver) != _major_minor(torch.__version__):
            return False, f"torch_npu {npu_ver} does not match torch {torch.__version__}; {hint}"
        npu = torch_npu.npu
        try:
            count = int(npu.device_count())
            ok = bool(npu.is_available())
        except Exception as exc:  # driver not loaded, permissions ...
            return False, f"torch_npu cannot query devices{_visible()}: {exc}; check the driver with `npu-smi info`"
        if not ok or count == 0:
            return False, (f"no Ascend NPU visible{_visible()} (torch.npu.device_count() == {count}); "
                           "check the driver with `npu-smi info`")
        return True, ""

    # ---- placement --------------------------------------------------------------------
    def device_string(self, local_rank: int = 0) -> str:
        """``npu:<local_rank>``."""
        if local_rank < 0:
            raise ValueError(f"device 'npu': local rank must be >= 0, got {local_rank}")
        return f"npu:{local_rank}"

    def torch_device(self, local_rank: int = 0) -> torch.device:
        """``npu:<local_rank>``, made current, with this device's process-wide options applied."""
        import torch

        npu = self._npu()
        count = int(npu.device_count())
        if not 0 <= local_rank < count:
            raise RuntimeError(f"device 'npu': local rank {local_rank} has no NPU; {count} visible{_visible()}. "
                               f"Launch at most {count} processes per node or make more NPUs visible.")
        npu.set_device(local_rank)
        if self.options.jit_compile is not None:
            npu.set_compile_mode(jit_compile=self.options.jit_compile)
        return torch.device(self.device_string(local_rank))

    # ---- capabilities -------------------------------------------------------------------
    def device_name(self) -> str | None:
        """The chip name (e.g. ``Ascend910B3``), or ``None`` where no NPU is usable."""
        if not self.available()[0]:
            return None
        return str(self._torch_npu().npu.get_device_name(0))

    def supported_dtypes(self) -> list[str]:
        """float32 and float16 always; bfloat16 only on chips that have it (910B / Atlas A2 and later).

        torch_npu's own ``is_bf16_supported()`` decides where it exists; otherwise the chip name
        is matched against :data:`BF16_SOCS`.
        """
        dtypes = ["float32", "float16"]
        if not self.available()[0]:
            return dtypes
        npu = self._torch_npu().npu
        check = getattr(npu, "is_bf16_supported", None)
        bf16 = bool(check()) if check is not None else str(npu.get_device_name(0)).startswith(BF16_SOCS)
        if bf16:
            dtypes.append("bfloat16")
        return dtypes

    def attention_implementations(self) -> list[str]:
        """``flash_attention_2`` (transformers maps it to torch_npu's ``npu_fusion_attention``), ``sdpa``, ``eager``."""
        import importlib.util

        out = []
        if self.available()[0] and importlib.util.find_spec("transformers.integrations.npu_flash_attention"):
            out.append("flash_attention_2")
        return [*out, "sdpa", "eager"]

    # ---- observability and seeding -----------------------------------------------------
    def memory_stats(self) -> dict[str, float]:
        """Allocated, reserved and peak-allocated GiB of the current NPU (torch_npu caching allocator)."""
        if not self.available()[0]:
            return {}
        npu = self._torch_npu().npu
        if not getattr(npu, "is_initialized", lambda: True)():
            return {}
        return {
            "mem_allocated_gib": npu.memory_allocated() / GIB,
            "mem_reserved_gib": npu.memory_reserved() / GIB,
            "mem_max_allocated_gib": npu.max_memory_allocated() / GIB,
        }

    def seed(self, seed: int) -> None:
        """Python, NumPy and torch RNGs, and every NPU's generator."""
        super().seed(seed)
        if self.available()[0]:
            self._torch_npu().npu.manual_seed_all(seed)

    def describe(self) -> dict[str, Any]:
        """Chip name, count and versions, for the run log."""
        ok, why = self.available()
        if not ok:
            return {"available": False, "reason": why}
        torch_npu = self._torch_npu()
        return {
            "available": True,
            "name": self.device_name(),
            "count": int(torch_npu.npu.device_count()),
            "torch_npu": str(getattr(torch_npu, "__version__", "?")),
            "dtypes": self.supported_dtypes(),
            "attention": self.attention_implementations(),
        }


def _major_minor(version: str) -> tuple[str, ...]:
    """``"2.5.1.post1+cpu"`` -> ``("2", "5")``."""
    return tuple(version.split("+")[0].split(".")[:2])
