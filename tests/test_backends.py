"""The backend you launch is the backend you get (``core.runtime.distributed``); no DeepSpeed needed here.

    pytest -q tests/test_backends.py

What ``accelerate launch`` asks for is read from the variables its launcher sets, and each shipped
launch file in ``examples/multinode/`` is run through accelerate's own launch-argument parsing and
``DeepSpeedPlugin`` (where accelerate raised its ``ValueError`` for ``mixed_precision`` beside
``deepspeed_config_file``). Launches the trainer cannot serve stop with a ``ConfigError`` (exit 2):
FSDP1, FSDP with one process (nothing to shard over), Megatron-LM, DeepSpeed when the
package is missing, and a DeepSpeed precision that disagrees with the model's dtype. The real
2-process DeepSpeed runs are in ``tests/test_multiprocess.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from core.config import ConfigError
from core.runtime.distributed import (
    Backend,
    LaunchRequest,
    backend_of,
    build_accelerator,
    check_backend,
    check_request,
    check_sharded_generation,
    deepspeed_plugin,
    fill_deepspeed_config,
    launch_request,
)
from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
MULTINODE = ROOT / "examples" / "multinode"
QUICKSTART = ROOT / "examples" / "quickstart" / "config.yaml"


# ---- what accelerate launch asked for --------------------------------------------------------
@pytest.mark.parametrize(("env", "want"), [
    ({}, LaunchRequest("plain")),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, LaunchRequest("plain", mixed_precision="bf16")),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"},
     LaunchRequest("deepspeed", deepspeed_config_file="ds.json")),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, LaunchRequest("fsdp", fsdp_version=2)),
    ({"ACCELERATE_USE_FSDP": "true"}, LaunchRequest("fsdp", fsdp_version=1)),  # accelerate's default
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, LaunchRequest("megatron")),
])
def test_launch_request_reads_the_launcher_variables(env, want):
    assert launch_request(env) == want


@pytest.mark.parametrize(("request_", "device", "message"), [
    (LaunchRequest("fsdp", fsdp_version=1), "cuda", "supports FSDP2 only"),
    (LaunchRequest("fsdp", fsdp_version=1), "cpu", "supports FSDP2 only"),
    (LaunchRequest("megatron"), "cuda", "Megatron-LM"),
])
def test_launches_the_trainer_cannot_serve_are_refused(request_, device, message):
    with pytest.raises(ConfigError, match=message):
        check_request(request_, device)


def test_launches_the_trainer_serves_pass():
    check_request(LaunchRequest("plain"), "cpu")
    check_request(LaunchRequest("fsdp", fsdp_version=2), "cuda")
    check_request(LaunchRequest("fsdp", fsdp_version=2), "cpu")  # forced on (tests/test_fsdp2.py runs it)


def test_deepspeed_missing_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # find_spec now reports it missing
    cpu = SimpleNamespace(torch_device=lambda: torch.device("cpu"), distributed_backend="gloo")
    with pytest.raises(ConfigError) as err:  # refused before any Accelerator is built
        build_accelerator(cpu, environ={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert "pip install 'vlmr1[deepspeed]'" in str(err.value) and "\n" not in str(err.value)


def test_fsdp_launch_of_one_cpu_process_exits_2_with_one_error_line(tmp_path):
    # What `accelerate launch --config_file accelerate_fsdp.yaml --num_processes 1` gives the process:
    # nothing to shard over, accelerate sets up no backend, and the run is refused rather than unsharded.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    proc = run_command([sys.executable, "-m", "core.train", "--config", str(QUICKSTART), "device.name=cpu",
                        f"logging.output_dir={tmp_path / 'out'}", f"model.path={tmp_path / 'tiny'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "error: accelerate launch asked for FSDP with one process: FSDP shards over processes, launch with " \
           "--num_processes 2 or more" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "tiny").exists(), "refused before any model was built or loaded"


# ---- what accelerate set up ------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "line"), [
    (Backend("deepspeed", 2, "cpu", "gloo", zero_stage=3), "DeepSpeed ZeRO-3 (gloo), 2 processes"),
    (Backend("deepspeed", 8, "cuda", "nccl", zero_stage=3, offload_optimizer="cpu", offload_param="cpu"),
     "DeepSpeed ZeRO-3 with optimizer and params offloaded to cpu (nccl), 8 processes"),
    (Backend("deepspeed", 2, "cuda", "nccl", zero_stage=2, offload_optimizer="cpu"),
     "DeepSpeed ZeRO-2 with optimizer offloaded to cpu (nccl), 2 processes"),
    (Backend("deepspeed", 1, "cpu", "gloo", zero_stage=2), "DeepSpeed ZeRO-2 (gloo), 1 process"),
    (Backend("fsdp", 8, "cuda", "nccl", fsdp_version=2), "FSDP2 (nccl), 8 processes"),
    (Backend("ddp", 2, "cpu", "gloo"), "DDP (gloo), 2 processes"),
    (Backend("single", 1, "cpu"), "single process (cpu)"),
])
def test_backend_lines(backend, line):
    assert backend.describe() == line
    record = backend.as_dict()
    assert record["description"] == line and json.loads(json.dumps(record)) == record


def _fake_accelerator(kind: DistributedType, n: int, **state) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=kind, num_processes=n, device=torch.device("cpu"),
                           state=SimpleNamespace(mixed_precision="no", **state))


def test_backend_of_reads_accelerates_state():
    zero = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "none"}}
    ds = {"zero_optimization": zero, "bf16": {"enabled": True}, "fp16": {"enabled": False}}
    got = backend_of(_fake_accelerator(DistributedType.DEEPSPEED, 2,
                                       deepspeed_plugin=SimpleNamespace(deepspeed_config=ds, zero_stage=3)))
    assert (got.name, got.zero_stage, got.offload_optimizer, got.offload_param, got.mixed_precision) == \
        ("deepspeed", 3, "cpu", None, "bf16")
    fsdp = backend_of(_fake_accelerator(DistributedType.FSDP, 4, fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    assert (fsdp.name, fsdp.fsdp_version, fsdp.num_processes) == ("fsdp", 2, 4)
    assert backend_of(_fake_accelerator(DistributedType.MULTI_CPU, 2)).name == "ddp"
    assert backend_of(_fake_accelerator(DistributedType.NO, 1)).name == "single"


def test_zero_stage_0_is_refused():
    check_backend(Backend("deepspeed", 2, "cpu", "gloo", zero_stage=2))
    with pytest.raises(ConfigError, match="ZeRO stage 0"):
        check_backend(Backend("deepspeed", 2, "cpu", "gloo", zero_stage=0))


def test_a_plain_cpu_process_is_a_single_process():
    cpu = SimpleNamespace(torch_device=lambda: torch.device("cpu"), distributed_backend="gloo")
    acc = build_accelerator(cpu, environ={})
    assert backend_of(acc).describe() == "single process (cpu)"


# ---- the shipped launch files, through accelerate's own parsing ------------------------------
def launch_env(config: Path, *flags: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file CONFIG FLAGS...`` gives each process.

    accelerate's argument parsing and ``prepare_*_env`` do the work; the two lines that compute
    ``deepspeed_fields_from_accelerate_config`` are copied from ``launch_command`` (they are
    inline there), since that field is what makes ``DeepSpeedPlugin`` refuse a conflict.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", *flags,
                                               "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        fields += ["mixed_precision"] if mp_from_config else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


LAUNCH_FILES = {
    "accelerate_ddp.yaml": ("plain", None, None),
    "accelerate_zero2.yaml": ("deepspeed", 2, None),
    "accelerate_zero3.yaml": ("deepspeed", 3, None),
    "accelerate_zero3_offload.yaml": ("deepspeed", 3, "cpu"),
    "accelerate_fsdp.yaml": ("fsdp", None, None),
}


def test_every_shipped_launch_file_is_checked():
    assert sorted(p.name for p in MULTINODE.glob("accelerate_*.yaml")) == sorted(LAUNCH_FILES)


@pytest.mark.parametrize("flags", [(), ("--mixed_precision", "no")], ids=["as-shipped", "mixed-precision-no"])
@pytest.mark.parametrize("name", sorted(LAUNCH_FILES))
def test_shipped_launch_file_has_no_conflict(name, flags, monkeypatch):
    kind, stage, offload = LAUNCH_FILES[name]
    monkeypatch.chdir(ROOT)  # the configs name their DeepSpeed files relative to the repository root
    env = launch_env(MULTINODE / name, *flags)
    request = launch_request(env)
    assert request.kind == kind
    if kind == "fsdp":
        assert request.fsdp_version == 2
        check_request(request, "cuda")
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # so checkpoints are full weights
    if kind != "deepspeed":
        return
    for key, value in env.items():  # DeepSpeedPlugin reads the launch variables from os.environ
        monkeypatch.setenv(key, value)
    for dtype, bf16 in ((torch.bfloat16, True), (torch.float32, False)):
        plugin = deepspeed_plugin(request, dtype)  # the conflict was accelerate's ValueError here
        ds = plugin.deepspeed_config
        assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is False, "precision follows model.dtype"
        assert ds["zero_optimization"]["stage"] == stage
        assert (ds["zero_optimization"].get("offload_optimizer") or {}).get("device") == offload
        if stage == 3:  # else accelerator.get_state_dict cannot gather full weights for save_pretrained
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_mixed_precision_beside_the_deepspeed_file_is_refused_clearly(tmp_path, monkeypatch):
    # The shipped files used to say `mixed_precision: bf16` beside `deepspeed_config_file`.
    bad = tmp_path / "zero3.yaml"
    text = (MULTINODE / "accelerate_zero3.yaml").read_text()
    bad.write_text(text + "mixed_precision: bf16\n")
    monkeypatch.chdir(ROOT)
    env = launch_env(bad)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="is inconsistent: When using `deepspeed_config_file`"):
        deepspeed_plugin(launch_request(env), torch.bfloat16)


def test_deepspeed_precision_that_disagrees_with_the_model_is_refused(tmp_path, monkeypatch):
    ds = json.loads((MULTINODE / "ds_zero2.json").read_text())
    ds["bf16"] = {"enabled": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(ConfigError, match="sets bf16.enabled=True but the model trains in float32"):
        deepspeed_plugin(launch_request(), torch.float32)
    assert deepspeed_plugin(launch_request(), torch.bfloat16).deepspeed_config["bf16"]["enabled"] is True
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="--mixed_precision fp16 disagrees with the model's dtype"):
        deepspeed_plugin(launch_request(), torch.bfloat16)


def test_auto_bucket_sizes_come_from_the_language_model_of_a_vlm():
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(text_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                           "num_key_value_heads": 2, "intermediate_size": 128})
    ds = json.loads((MULTINODE / "ds_zero3.json").read_text())
    fill_deepspeed_config(ds, SimpleNamespace(config=config), micro_batch_size=6, num_processes=2, max_grad_norm=1.0)
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (64 * 64, int(0.9 * 64 * 64), 640)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_accumulation_steps"],
            ds["gradient_clipping"]) == (6, 12, 1, 1.0)
    with pytest.raises(ConfigError, match="no config to size the `auto` buckets"):
        fill_deepspeed_config(json.loads((MULTINODE / "ds_zero2.json").read_text()), object(), micro_batch_size=1,
                              num_processes=1, max_grad_norm=None)


# ---- resume: an optimizer state resumes only under the layout it was saved with --------------
def _zero_meta(n: int, stage: int) -> dict:
    """A ZeRO checkpoint's trainer_state.json fields about its optimizer layout."""
    return {"optimizer_per_rank": True, "num_processes": n,
            "backend": Backend("deepspeed", n, "cpu", "gloo", zero_stage=stage).as_dict()}


@pytest.mark.parametrize(("saved", "now", "ok"), [
    ({"optimizer_per_rank": False, "num_processes": 2}, Backend("ddp", 2, "cpu", "gloo"), True),
    (_zero_meta(2, 2), Backend("deepspeed", 2, "cpu", "gloo", zero_stage=2), True),
    ({"optimizer_per_rank": False, "num_processes": 2}, Backend("deepspeed", 2, "cpu", "gloo", zero_stage=2), False),
    (_zero_meta(2, 2), Backend("ddp", 2, "cpu", "gloo"), False),
    (_zero_meta(2, 2), Backend("deepspeed", 2, "cpu", "gloo", zero_stage=3), False),
    (_zero_meta(4, 3), Backend("deepspeed", 2, "cpu", "gloo", zero_stage=3), False),  # also under --resume-force
])
def test_resume_refuses_an_optimizer_state_of_another_layout(saved, now, ok):
    from core.grpo.trainer import GRPOTrainer
    from core.runtime.checkpoint import CheckpointError

    trainer = SimpleNamespace(optimizer_per_rank=now.name == "deepspeed", backend=now, world=now.num_processes,
                              resume_from="runs/x/checkpoint-1")
    if ok:
        GRPOTrainer._check_optimizer_layout(trainer, saved)
    else:
        with pytest.raises(CheckpointError, match="its optimizer state does not fit"):
            GRPOTrainer._check_optimizer_layout(trainer, saved)


# ---- ZeRO-3 with train.gather_for_generation=false: only settings where every rank generates alike ---------
ZERO3_2 = Backend("deepspeed", 2, "cpu", "gloo", zero_stage=3)
EVEN = {"per_rank": 8, "group_size": 4, "resample": False, "eval_samples": 4}


@pytest.mark.parametrize(("change", "named"), [
    ({"per_rank": 6}, "not a multiple of grpo.num_generations=4"),  # a group split over two ranks
    ({"resample": True}, "grpo.zero_variance_groups=resample"),
    ({"eval_samples": 3}, "3 evaluation samples do not split evenly over 2 processes"),
])
def test_sharded_generation_refuses_uneven_settings(change, named):
    check_sharded_generation(ZERO3_2, gather=False, **EVEN)  # even: accepted
    with pytest.raises(ConfigError, match="train.gather_for_generation=false under DeepSpeed ZeRO-3") as err:
        check_sharded_generation(ZERO3_2, gather=False, **{**EVEN, **change})
    assert named in str(err.value)
    # gathering (the default), ZeRO-2 and DDP never collect during generation: nothing to refuse
    check_sharded_generation(ZERO3_2, gather=True, **{**EVEN, **change})
    for other in (Backend("deepspeed", 2, "cpu", "gloo", zero_stage=2), Backend("ddp", 2, "cpu", "gloo")):
        check_sharded_generation(other, gather=False, **{**EVEN, **change})


def test_fsdp2_refuses_generation_without_the_gather():
    # FSDP2 gathers only inside a wrapped forward: greedy eval's vision encoder would see shards.
    fsdp2 = Backend("fsdp", 2, "cpu", "gloo", fsdp_version=2)
    with pytest.raises(ConfigError, match="train.gather_for_generation=false is not supported under FSDP2"):
        check_sharded_generation(fsdp2, gather=False, **EVEN)
    check_sharded_generation(fsdp2, gather=True, **{**EVEN, "eval_samples": 3})
