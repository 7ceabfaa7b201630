"""vlmr1 device plugin for NVIDIA GPUs (CUDA, NCCL)."""

from vlmr1_cuda.device import CUDADevice

__all__ = ["CUDADevice"]
