"""The CPU device's oneDNN linears (``core.plugins.builtin.onednn``): ``nn.Linear``'s results, in every loader.

Forward, input gradient, weight and bias gradients are compared with PyTorch's own
``nn.Linear`` (MKL) within float32 rounding, and the profiler must show the oneDNN op and no
``aten::mm``/``addmm`` (so a silent fallback fails). Fallbacks (other dtypes, DeepSpeed ZeRO-3
parameters) give ``nn.Linear``'s exact results. ``device.options.onednn_linear: false`` leaves
the model untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.plugins.builtin.cpu import CPUDevice
from core.plugins.builtin.onednn import OneDNNLinear, onednn_available, use_onednn_linears

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def _ops(fn) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _pair(bias: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(256, 512, bias=bias), nn.SiLU(), nn.Linear(512, 128, bias=bias))
    fast = copy.deepcopy(ref)
    assert use_onednn_linears(fast) == 2
    return ref, fast


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_every_gradient_match_nn_linear(bias):
    ref, fast = _pair(bias)
    x = torch.randn(4, 32, 256)  # 128 rows: both products above MIN_WORK
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
    # a non-contiguous upstream gradient (expanded), as sum() and broadcasting produce
    yr.sum().backward()
    ops = _ops(lambda: fast(xf).sum().backward())
    assert "mkldnn::_linear_pointwise" in ops and not ops & {"aten::mm", "aten::addmm"}, ops
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for (name, pr), pf in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_without_gradients_the_op_is_called_directly():
    ref, fast = _pair(True)
    x = torch.randn(32, 256)
    with torch.no_grad():
        ops = _ops(lambda: fast(x))
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    assert "mkldnn::_linear_pointwise" in ops and "aten::addmm" not in ops
    frozen = copy.deepcopy(fast).requires_grad_(False)
    assert not frozen(x).requires_grad  # a frozen reference model builds no graph


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_fall_back_to_nn_linear_exactly(dtype):
    ref, fast = _pair(True)
    ref, fast = ref.to(dtype), fast.to(dtype)
    x = torch.randn(32, 256, dtype=dtype)
    assert torch.equal(fast(x), ref(x))
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: fast(x))


def test_small_products_keep_mkl():
    from core.plugins.builtin.onednn import MIN_WORK

    ref, fast = _pair(True)
    x = torch.randn(MIN_WORK // (256 * 512) - 1, 256)  # just under MIN_WORK for the first layer
    assert torch.equal(fast[0](x), ref[0](x))
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: fast[0](x))


def test_autocast_and_empty_inputs_fall_back():
    ref, fast = _pair(True)
    x = torch.randn(32, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x)
        got = fast(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert fast(torch.randn(0, 256)).shape == (0, 128)


def test_a_zero3_parameter_falls_back():
    ref, fast = _pair(True)
    fast[0].weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    x = torch.randn(32, 256)
    assert torch.equal(fast[0](x), ref[0](x))


def test_swap_keeps_parameters_state_dict_and_copies():
    ref, fast = _pair(True)
    assert ref.state_dict().keys() == fast.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), fast.state_dict().values(), strict=True))
    assert isinstance(fast[0], nn.Linear) and type(copy.deepcopy(fast)[0]) is OneDNNLinear
    assert use_onednn_linears(fast) == 0  # already swapped: nothing left to swap


def test_lora_layers_are_swapped_and_train():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    fast = copy.deepcopy(ref)
    assert use_onednn_linears(fast) == 6  # 2 base layers + A and B of each adapter
    x = torch.randn(64, 256)  # the base layers above MIN_WORK, the rank-4 adapters below it
    ref(x).square().sum().backward()
    fast(x).square().sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads and all(n.count("lora_") for n in grads)
    for n, p in fast.named_parameters():
        if p.requires_grad:
            scale = float(grads[n].abs().max())
            assert float((p.grad - grads[n]).abs().max()) <= 1e-5 * scale, n


@pytest.mark.parametrize("on", [True, False])
def test_cpu_device_option(on):
    model = nn.Sequential(nn.Linear(4, 4))
    CPUDevice.from_options({"onednn_linear": on}).prepare_model(model)
    assert (type(model[0]) is OneDNNLinear) is on


def test_every_loader_prepares_the_model(tmp_path):
    """Training (policy and reference), inference and the server's loader all get the device's kernels."""
    from pathlib import Path

    from core.config import build_config, load_raw
    from core.plugins import PluginHost
    from core.plugins.plan import make_plan, plan_without_groups
    from core.runtime import loader

    quickstart = Path(__file__).resolve().parents[1] / "core" / "defaults" / "quickstart.yaml"

    host = PluginHost("qwen-vl,synthetic,text")
    for on in (True, False):
        cfg = build_config(load_raw(quickstart), [f"model.path={tmp_path / 'tiny'}",
                                                  f"device.options.onednn_linear={str(on).lower()}"])
        plan = make_plan(cfg, host.registry, 1)
        train = loader.load_policy(plan, host.registry, phase="train", reference=True)
        infer = loader.load_policy(plan_without_groups(cfg, host.registry), host.registry, phase="infer")
        serve = loader.load_checkpoint(tmp_path / "tiny", train.family,
                                       plan.device.cls.from_options(plan.options.get("device")))
        for model in (train.model, train.ref_model, infer.model, serve.model):
            kinds = {type(m) for m in model.modules()}
            assert (OneDNNLinear in kinds) is on and (nn.Linear in kinds) is not on
