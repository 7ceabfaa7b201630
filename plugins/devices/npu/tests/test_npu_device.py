"""Tests of the ``npu`` device without Ascend hardware.

Where torch_npu is missing the device must say so; with a fake ``torch_npu`` (injected into
``sys.modules``, or as a package on ``PYTHONPATH`` that registers the ``npu`` device type the
way the real one does) the device strings, backend, dtype limits, memory figures and seeding
are checked. Nothing here proves the plugin on a real NPU (see the README).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import types

import pytest
import torch
from pydantic import ValidationError
from vlmr1_npu import NPUDevice

from core.plugins import PluginHost
from core.plugins.plan import pick_device
from core.testing.procs import run_command

GIB = 2**30
TORCH_MM = ".".join(torch.__version__.split("+")[0].split(".")[:2])


def make_fake(count: int = 2, name: str = "Ascend910B3", bf16: bool | None = True, version: str | None = None):
    """A ``torch_npu`` stand-in: ``torch_npu.npu`` mirrors the parts of ``torch.cuda`` the device uses."""
    calls: list[tuple] = []
    npu = types.SimpleNamespace(
        device_count=lambda: count,
        is_available=lambda: count > 0,
        set_device=lambda i: calls.append(("set_device", i)),
        set_compile_mode=lambda jit_compile: calls.append(("set_compile_mode", jit_compile)),
        get_device_name=lambda i=0: name,
        is_initialized=lambda: True,
        memory_allocated=lambda: 3 * GIB,
        memory_reserved=lambda: 4 * GIB,
        max_memory_allocated=lambda: 5 * GIB // 2,
        manual_seed_all=lambda s: calls.append(("manual_seed_all", s)),
    )
    if bf16 is not None:
        npu.is_bf16_supported = lambda: bf16
    mod = types.ModuleType("torch_npu")
    mod.__version__ = version or f"{TORCH_MM}.0.post1"
    mod.npu = npu
    return mod, calls


@pytest.fixture
def fake_npu(monkeypatch):
    """Inject a fake torch_npu with two 910B NPUs; yields the recorded calls."""
    mod, calls = make_fake()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    return calls


# ---- without torch_npu ------------------------------------------------------------------
def test_missing_torch_npu_gives_install_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ModuleNotFoundError
    dev = NPUDevice()
    ok, why = dev.available()
    assert not ok
    assert why.startswith("torch_npu is not installed; install torch-npu matching torch ")
    assert "CANN" in why
    with pytest.raises(RuntimeError, match="device 'npu' is not usable: torch_npu is not installed"):
        dev.torch_device(0)
    assert dev.supported_dtypes() == ["float32", "float16"]
    assert dev.attention_implementations() == ["sdpa", "eager"]
    assert dev.memory_stats() == {}
    assert dev.describe() == {"available": False, "reason": why}
    dev.seed(3)  # still seeds the host RNGs
    a = torch.rand(2)
    dev.seed(3)
    assert torch.equal(a, torch.rand(2))


def test_broken_cann_runtime_is_reported(monkeypatch):
    def broken():
        raise OSError("libascendcl.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(NPUDevice, "_torch_npu", staticmethod(broken))
    ok, why = NPUDevice().available()
    assert not ok
    assert why.startswith("torch_npu failed to import (OSError: libascendcl.so: cannot open shared object file")
    assert "set_env.sh" in why


def test_version_mismatch_is_reported(monkeypatch):
    mod, _ = make_fake(version="1.11.0")
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    ok, why = NPUDevice().available()
    assert not ok and why.startswith(f"torch_npu 1.11.0 does not match torch {torch.__version__}")


def test_no_npu_visible(monkeypatch):
    mod, _ = make_fake(count=0)
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    ok, why = NPUDevice().available()
    assert not ok
    assert why == ("no Ascend NPU visible (ASCEND_RT_VISIBLE_DEVICES='') (torch.npu.device_count() == 0); "
                   "check the driver with `npu-smi info`")


def test_registered_and_skipped_by_auto_on_this_machine(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    host = PluginHost("npu")
    entry = host.registry.resolve("devices", "npu")
    assert entry.cls is NPUDevice and entry.provider == "vlmr1-plugin-npu"
    chosen, notes = pick_device(host.registry, "auto")
    assert chosen.name != "npu"
    assert any(n.startswith("device vlmr1-plugin-npu:npu not usable: torch_npu is not installed") for n in notes)


# ---- with a fake torch_npu ----------------------------------------------------------------
def test_fake_npu_is_available_with_hccl(fake_npu):
    dev = NPUDevice()
    assert dev.available() == (True, "")
    assert NPUDevice.distributed_backend == "hccl"
    assert [dev.device_string(i) for i in range(3)] == ["npu:0", "npu:1", "npu:2"]
    with pytest.raises(ValueError, match="local rank must be >= 0"):
        dev.device_string(-1)
    with pytest.raises(RuntimeError, match=r"local rank 2 has no NPU; 2 visible"):
        dev.torch_device(2)
    assert fake_npu == []  # nothing was set for the refused rank


@pytest.mark.parametrize(("name", "bf16", "expected_bf16"), [
    ("Ascend910B3", True, True),   # torch_npu's own answer wins
    ("Ascend910B3", False, False),
    ("Ascend910B2", None, True),   # no is_bf16_supported: decided by chip name (Atlas A2)
    ("Ascend910_9391", None, True),  # Atlas A3
    ("Ascend910ProB", None, False),  # first-generation 910: no bf16
    ("Ascend910A", None, False),
    ("Ascend310P3", None, False),
])
def test_bf16_limits(monkeypatch, name, bf16, expected_bf16):
    mod, _ = make_fake(name=name, bf16=bf16)
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    dev = NPUDevice()
    expected = ["float32", "float16"] + (["bfloat16"] if expected_bf16 else [])
    assert dev.supported_dtypes() == expected
    assert dev.device_name() == name


def test_memory_stats_seed_and_describe(fake_npu):
    dev = NPUDevice()
    assert dev.memory_stats() == {"mem_allocated_gib": 3.0, "mem_reserved_gib": 4.0, "mem_max_allocated_gib": 2.5}
    dev.seed(11)
    assert fake_npu == [("manual_seed_all", 11)]
    assert dev.attention_implementations() == ["flash_attention_2", "sdpa", "eager"]
    info = dev.describe()
    assert info == {"available": True, "name": "Ascend910B3", "count": 2, "torch_npu": f"{TORCH_MM}.0.post1",
                    "dtypes": ["float32", "float16", "bfloat16"],
                    "attention": ["flash_attention_2", "sdpa", "eager"]}


def test_options_validated():
    assert NPUDevice.from_options({"jit_compile": False}).options.jit_compile is False
    assert NPUDevice().options.jit_compile is None
    with pytest.raises(ValidationError, match="jit_compiel"):
        NPUDevice.from_options({"jit_compiel": False})


FAKE_PACKAGE = '''
"""Fake torch_npu: registers the npu device type as the real one does, records calls in a file."""
import json, os, sys, types
import torch

__version__ = ".".join(torch.__version__.split("+")[0].split(".")[:2]) + ".0"
_log = os.environ["FAKE_NPU_LOG"]


def _rec(*item):
    with open(_log, "a") as f:
        f.write(json.dumps(item) + "\\n")


_rec("imported")
torch.utils.rename_privateuse1_backend("npu")
npu = types.SimpleNamespace(
    device_count=lambda: 4, is_available=lambda: True, get_device_name=lambda i=0: "Ascend910B1",
    is_bf16_supported=lambda: True, set_device=lambda i: _rec("set_device", i),
    set_compile_mode=lambda jit_compile: _rec("set_compile_mode", jit_compile),
)
torch.npu = npu
'''

SCRIPT = '''
import json, sys
from core.plugins import PluginHost
host = PluginHost("npu")
cls = host.registry.get("devices", "npu")
print(json.dumps({"imported_by_listing": "torch_npu" in sys.modules}))
dev = cls.from_options({"jit_compile": False})
d = dev.torch_device(3)
print(json.dumps({"device": str(d), "type": d.type, "index": d.index, "backend": cls.distributed_backend,
                  "dtypes": dev.supported_dtypes()}))
'''


def test_torch_device_with_fake_package_in_subprocess(tmp_path):
    """A fresh interpreter: listing plugins must not import torch_npu; torch_device gives npu:3."""
    pkg = tmp_path / "site" / "torch_npu"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_PACKAGE))
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
               FAKE_NPU_LOG=str(log))
    proc = run_command([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert first == {"imported_by_listing": False}
    assert second == {"device": "npu:3", "type": "npu", "index": 3, "backend": "hccl",
                      "dtypes": ["float32", "float16", "bfloat16"]}
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [["imported"], ["set_device", 3], ["set_compile_mode", False]]
