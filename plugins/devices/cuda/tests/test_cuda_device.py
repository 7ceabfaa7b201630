"""Tests of the ``cuda`` device: everywhere (availability, options, registration), on a GPU (the rest)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from vlmr1_cuda import CUDADevice

from core.plugins import PluginHost
from core.plugins.plan import pick_device

HAS_CUDA = torch.cuda.is_available()
_needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def gpu_test(fn):
    """Mark a test ``gpu`` and skip it cleanly where no CUDA GPU is visible."""
    return pytest.mark.gpu(_needs_gpu(fn))


# ---- everywhere ----------------------------------------------------------------------------
def test_registered_through_entry_point_and_auto_pick():
    host = PluginHost("cuda")
    entry = host.registry.resolve("devices", "cuda")
    assert entry.cls is CUDADevice and entry.provider == "vlmr1-plugin-cuda"
    chosen, notes = pick_device(host.registry, "auto")
    if HAS_CUDA:
        assert chosen.name == "cuda"
    else:
        assert chosen.name == "cpu"
        assert any(n.startswith("device vlmr1-plugin-cuda:cuda not usable: ") for n in notes), notes


def test_availability_matches_torch_and_gives_reason():
    ok, why = CUDADevice().available()
    assert ok is HAS_CUDA
    if HAS_CUDA:
        assert why == ""
    else:
        assert why and ("CUDA" in why or "cuda" in why)
        with pytest.raises(RuntimeError, match="device 'cuda' is not usable: "):
            CUDADevice().torch_device(0)
        assert CUDADevice().memory_stats() == {}
        assert CUDADevice().supported_dtypes() == ["float32", "float16"]
        assert CUDADevice().attention_implementations() == ["sdpa", "eager"]
        assert CUDADevice().describe() == {"available": False, "reason": why}


def test_cpu_only_torch_build_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    ok, why = CUDADevice().available()
    assert not ok
    assert "CPU-only build" in why and torch.__version__ in why


def test_no_gpu_reason_names_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)  # a driver that finds no device raises nothing
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    ok, why = CUDADevice().available()
    assert not ok
    assert why == "no CUDA device visible (CUDA_VISIBLE_DEVICES='') (torch.cuda.device_count() == 0)"

    def broken_init():
        raise RuntimeError("Found no NVIDIA driver on your system.\nmore")

    monkeypatch.setattr(torch.cuda, "init", broken_init)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert CUDADevice().available() == (False, "no usable CUDA device: Found no NVIDIA driver on your system.")


@pytest.mark.parametrize(("native_bf16", "expected"), [
    (True, ["float32", "float16", "bfloat16"]),
    (False, ["float32", "float16"]),
])
def test_bf16_only_where_native(monkeypatch, native_bf16, expected):
    seen = {}

    def is_bf16_supported(including_emulation=True):
        seen["including_emulation"] = including_emulation
        return native_bf16

    monkeypatch.setattr(CUDADevice, "available", lambda self: (True, ""))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert CUDADevice().supported_dtypes() == expected
    assert seen == {"including_emulation": False}  # emulated bf16 (pre-Ampere) is not offered


@pytest.mark.parametrize(("cap", "fa2", "fa3", "flash_opt", "expected"), [
    ((9, 0), True, True, True, ["flash_attention_3", "flash_attention_2", "sdpa", "eager"]),
    ((9, 0), True, False, True, ["flash_attention_2", "sdpa", "eager"]),
    ((8, 0), True, True, True, ["flash_attention_2", "sdpa", "eager"]),  # FA3 is Hopper-only
    ((7, 5), True, False, True, ["sdpa", "eager"]),  # FA2 needs Ampere+
    ((8, 6), False, False, True, ["sdpa", "eager"]),  # flash-attn not installed
    ((9, 0), True, True, False, ["sdpa", "eager"]),  # switched off by option
])
def test_attention_implementations(monkeypatch, cap, fa2, fa3, flash_opt, expected):
    import transformers.utils as tu

    monkeypatch.setattr(CUDADevice, "compute_capability", lambda self: cap)
    monkeypatch.setattr(tu, "is_flash_attn_2_available", lambda: fa2)
    monkeypatch.setattr(tu, "is_flash_attn_3_available", lambda: fa3)
    dev = CUDADevice.from_options({"flash_attention": flash_opt})
    assert dev.attention_implementations() == expected


def test_options_validated():
    dev = CUDADevice.from_options({"allow_tf32": False, "memory_fraction": 0.5})
    assert dev.options.allow_tf32 is False and dev.options.memory_fraction == 0.5
    with pytest.raises(ValidationError, match="allow_tf23"):
        CUDADevice.from_options({"allow_tf23": True})
    with pytest.raises(ValidationError, match="memory_fraction"):
        CUDADevice.from_options({"memory_fraction": 1.5})


def test_class_facts():
    assert CUDADevice.name == "cuda"
    assert CUDADevice.distributed_backend == "nccl"
    assert CUDADevice.priority > 0  # beats the CPU (priority 0) under device: auto


# ---- on a GPU ------------------------------------------------------------------------------
@gpu_test
@pytest.mark.parametrize("tf32", [True, False])
def test_gpu_torch_device_applies_options(tf32):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        dev = CUDADevice.from_options({"allow_tf32": tf32})
        d = dev.torch_device(0)
        assert d == torch.device("cuda", 0) and torch.cuda.current_device() == 0
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
        with pytest.raises(RuntimeError, match=r"local rank 99 has no GPU; \d+ visible"):
            dev.torch_device(99)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@gpu_test
def test_gpu_memory_stats_track_allocations():
    dev = CUDADevice()
    dev.torch_device(0)
    before = dev.memory_stats()
    assert set(before) == {"mem_allocated_gib", "mem_reserved_gib", "mem_max_allocated_gib"}
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    after = dev.memory_stats()
    assert after["mem_allocated_gib"] - before["mem_allocated_gib"] == pytest.approx(0.25, abs=0.01)
    assert after["mem_reserved_gib"] >= after["mem_allocated_gib"]
    assert after["mem_max_allocated_gib"] >= after["mem_allocated_gib"]
    del x


@gpu_test
def test_gpu_seed_reproduces_cuda_samples():
    dev = CUDADevice()
    dev.seed(123)
    a = torch.randn(8, device="cuda")
    dev.seed(123)
    b = torch.randn(8, device="cuda")
    dev.seed(124)
    c = torch.randn(8, device="cuda")
    assert torch.equal(a, b) and not torch.equal(a, c)


@gpu_test
def test_gpu_dtypes_and_kernels_run():
    dev = CUDADevice()
    device = dev.torch_device(0)
    cap = torch.cuda.get_device_capability()
    assert ("bfloat16" in dev.supported_dtypes()) is (cap[0] >= 8)
    impls = dev.attention_implementations()
    assert impls[-2:] == ["sdpa", "eager"]
    for name in dev.supported_dtypes():
        dtype = getattr(torch, name)
        q = torch.randn(1, 2, 16, 8, device=device, dtype=dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float().cpu(), q.float().cpu(), q.float().cpu(),
                                                               is_causal=True)
        assert torch.allclose(out.float().cpu(), ref, atol=2e-2)
    info = dev.describe()
    assert info["available"] and info["count"] >= 1 and info["capability"] == f"{cap[0]}.{cap[1]}"


@gpu_test
def test_gpu_nccl_backend_is_available():
    import torch.distributed as dist

    assert dist.is_nccl_available()
    assert CUDADevice.distributed_backend == "nccl"
