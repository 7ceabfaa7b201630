"""Float32 linear layers through oneDNN on CPU, forward and backward (the built-in CPU device's kernels).

Why by hand: PyTorch's CPU ``nn.Linear`` (``aten::addmm`` / ``aten::mm``) calls MKL's sgemm for
float32, and MKL does not reach the machine's speed on every x86 CPU: on this project's AMD EPYC
machine (2 cores, AVX-512) MKL runs float32 GEMMs at ~240 GFLOP/s where oneDNN, which PyTorch
also ships, reaches ~530 on the same shapes, with float32 accuracy (no bf16 down-conversion;
``benchmarks/linear_kernels.py`` measures both, and the error against float64, on any machine).
PyTorch exposes no switch that sends float32 ``mm`` to oneDNN at full precision (its
``mkldnn`` matmul path is for bf16/fp16, or float32 with reduced-precision math), so
:func:`use_onednn_linears` swaps the ``forward`` of each ``nn.Linear`` for one that calls
``torch.ops.mkldnn._linear_pointwise`` (the op inductor's CPU backend emits for linears) and a
backward that computes ``grad @ W`` and ``grad^T @ x`` with the same op. Same FLOPs, float32 all
the way; results differ from MKL's in float rounding only (summation order).

oneDNN pays ~10 us per call where MKL pays ~3 us, so products smaller than :data:`MIN_WORK`
(``rows x in x out``; the crossover measured at 1-2 M on that machine) keep MKL: the tiny
quickstart model's layers, and a decode step's smallest projections.

Falls back to ``nn.Linear.forward`` per call for anything else: not float32, not on CPU, empty,
under CPU autocast (which would have run the layer in bfloat16), or a DeepSpeed ZeRO-3 parameter
(``ds_id``: gathered and released by DeepSpeed around the forward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Smallest ``rows * in_features * out_features`` sent to oneDNN (``benchmarks/linear_kernels.py``: at
#: 16 x 384 x 128 = 0.8 M oneDNN took 1.2x MKL's time, at 16 x 384 x 384 = 2.4 M 0.74x).
MIN_WORK = 2**21


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its linear op."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available()) and ops is not None and hasattr(ops, "_linear_pointwise")


def _mm_t(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t.T`` through oneDNN (``a`` ``[M, K]``, ``b_t`` ``[N, K]``, any strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")


class _Linear(torch.autograd.Function):
    """``x @ W.T + b`` with every GEMM through oneDNN (forward, ``dx``, ``dW``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g = grad.contiguous().reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm_t(g, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            gw = _mm_t(g.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose float32 CPU forward and backward run on oneDNN (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight, bias)``, through oneDNN where it applies."""
        w = self.weight
        if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" \
                or w.device.type != "cpu" or hasattr(w, "ds_id") or x.numel() == 0 or w.numel() == 0 \
                or torch.is_autocast_enabled("cpu") or x.numel() * w.shape[0] < MIN_WORK:
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            return _Linear.apply(x, w, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")


def use_onednn_linears(model: nn.Module) -> int:
    """Route every plain ``nn.Linear`` of ``model`` through oneDNN (class swap, in place); returns how many.

    Subclasses of ``nn.Linear`` with their own forward (quantised layers, PEFT's) are left alone;
    a LoRA layer's base and adapter linears are plain ``nn.Linear`` and are swapped. Parameters,
    buffers, hooks and the state dict are unchanged, so saving and reloading are unaffected.
    """
    if not onednn_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            n += 1
    return n
