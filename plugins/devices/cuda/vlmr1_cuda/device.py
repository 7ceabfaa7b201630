"""The ``cuda`` compute device: NVIDIA GPUs through torch's CUDA build, NCCL between processes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import Device

if TYPE_CHECKING:
    import torch

GIB = 2**30


class CUDADevice(Device):
    """One CUDA GPU per process (``cuda:<local_rank>``); ``nccl`` for multi-process runs.

    Preferred over the CPU by ``device: auto`` (priority 10) wherever a GPU is visible.
    Process-wide settings (TF32, cuDNN autotuning, memory fraction) are applied by
    :meth:`torch_device`, which the engine calls once per process before building the model.
    """

    name = "cuda"
    description = "NVIDIA GPU via torch CUDA (bf16 where supported, flash-attn/sdpa, NCCL)"
    priority = 10
    distributed_backend = "nccl"

    class Options(BaseModel):
        """Options of the ``cuda`` device (``device.options`` in the run config)."""

        model_config = ConfigDict(extra="forbid")
        allow_tf32: bool = Field(
            True, description="TF32 tensor cores for float32 matmul/cuDNN (Ampere+): faster, ~1e-3 relative error")
        cudnn_benchmark: bool = Field(
            False, description="cuDNN autotuning (helps fixed shapes; VLM batches vary, so off by default)")
        memory_fraction: float | None = Field(
            None, gt=0.0, le=1.0,
            description="cap this process's caching allocator at this fraction of the GPU (leave room for vLLM)")
        flash_attention: bool = Field(
            True, description="offer flash_attention_2/3 when flash-attn is importable and the GPU supports it")

    # ---- availability -----------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        """Usable when torch has a CUDA (or ROCm) build and at least one GPU is visible."""
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - torch is a core dependency
            return False, f"torch cannot be imported: {exc}"
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return False, (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
                           "install a CUDA build of torch")
        if torch.cuda.is_available():
            return True, ""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        try:
            # torch.cuda.init() raises with the driver's own explanation ("Found no NVIDIA driver ...").
            torch.cuda.init()
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return False, f"no usable CUDA device{where}: {detail}"
        return False, f"no CUDA device visible{where} (torch.cuda.device_count() == 0)"

    # ---- placement --------------------------------------------------------------------
    def torch_device(self, local_rank: int = 0) -> torch.device:
        """``cuda:<local_rank>``, made current, with this device's process-wide options applied."""
        import torch

        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"device 'cuda' is not usable: {why}")
        count = torch.cuda.device_count()
        if not 0 <= local_rank < count:
            raise RuntimeError(
                f"device 'cuda': local rank {local_rank} has no GPU; {count} visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Launch at most {count} "
                "processes per node or make more GPUs visible.")
        torch.cuda.set_device(local_rank)
        self._apply_options(local_rank)
        return torch.device("cuda", local_rank)

    def _apply_options(self, index: int) -> None:
        """Set the process-wide backend flags the options ask for (idempotent)."""
        import torch

        opts = self.options
        torch.backends.cuda.matmul.allow_tf32 = opts.allow_tf32
        torch.backends.cudnn.allow_tf32 = opts.allow_tf32
        torch.backends.cudnn.benchmark = opts.cudnn_benchmark
        if opts.memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(opts.memory_fraction, index)

    # ---- capabilities -------------------------------------------------------------------
    def compute_capability(self) -> tuple[int, int] | None:
        """``(major, minor)`` of the current GPU, or ``None`` where no GPU is usable."""
        import torch

        if not self.available()[0]:
            return None
        return torch.cuda.get_device_capability()

    def supported_dtypes(self) -> list[str]:
        """float32 and float16 on any GPU; bfloat16 only where the GPU runs it natively (Ampere+).

        ``including_emulation=False``: on pre-Ampere GPUs torch can *emulate* bf16, which is
        correct but far slower than float16, so it is not offered for training there.
        """
        import torch

        dtypes = ["float32", "float16"]
        if self.available()[0] and _bf16_native(torch):
            dtypes.append("bfloat16")
        return dtypes

    def attention_implementations(self) -> list[str]:
        """Best first: ``flash_attention_3`` (Hopper), ``flash_attention_2`` (Ampere+), ``sdpa``, ``eager``.

        The flash kernels are offered only where transformers reports the package usable and the
        GPU generation supports them; they need float16/bfloat16 weights.
        """
        out: list[str] = []
        cap = self.compute_capability()
        if cap is not None and self.options.flash_attention:
            from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

            if cap[0] == 9 and is_flash_attn_3_available():
                out.append("flash_attention_3")
            if cap[0] >= 8 and is_flash_attn_2_available():
                out.append("flash_attention_2")
        return [*out, "sdpa", "eager"]

    # ---- observability and seeding -----------------------------------------------------
    def memory_stats(self) -> dict[str, float]:
        """Allocated, reserved and peak-allocated GiB of the current GPU (caching allocator)."""
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            # Reading the figures would initialise CUDA in a process that never used it.
            return {}
        return {
            "mem_allocated_gib": torch.cuda.memory_allocated() / GIB,
            "mem_reserved_gib": torch.cuda.memory_reserved() / GIB,
            "mem_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        }

    def seed(self, seed: int) -> None:
        """Python, NumPy and torch RNGs, and every GPU's generator."""
        import torch

        super().seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)

    def describe(self) -> dict[str, Any]:
        """GPU name, capability, count and versions, for the run log."""
        import torch

        ok, why = self.available()
        if not ok:
            return {"available": False, "reason": why}
        cap = torch.cuda.get_device_capability()
        return {
            "available": True,
            "name": torch.cuda.get_device_name(),
            "capability": f"{cap[0]}.{cap[1]}",
            "count": torch.cuda.device_count(),
            "torch_cuda": torch.version.cuda,
            "dtypes": self.supported_dtypes(),
            "attention": self.attention_implementations(),
        }


def _bf16_native(torch: Any) -> bool:
    """Whether the current GPU computes bfloat16 natively (tolerates old torch signatures)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation argument
        return bool(torch.cuda.is_bf16_supported())
