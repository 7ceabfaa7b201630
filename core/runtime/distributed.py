"""The distributed backend of a run: the one place the ``Accelerator`` is built, and what it became.

``accelerate launch --config_file examples/multinode/accelerate_zero3.yaml -m core.train ...``
asks for a backend through environment variables (``ACCELERATE_USE_DEEPSPEED``,
``ACCELERATE_USE_FSDP`` + ``FSDP_VERSION``, ``ACCELERATE_USE_MEGATRON_LM``); :func:`launch_request`
reads them, :func:`build_accelerator` builds the ``Accelerator`` so that the request is honoured on
every device type, CPU included, and :func:`backend_of` says what accelerate actually set up
(printed at start as ``backend: DeepSpeed ZeRO-3 (gloo), 2 processes`` and written to
``backend.json``). The rule: **the backend you launch is the backend you get** — a request the
trainer cannot serve is a :class:`~core.config.ConfigError` (exit 2) naming the fix, never a run
that quietly trains as plain DDP.

Why this needs care on the CPU: ``Accelerator(cpu=True)`` makes accelerate ignore DeepSpeed and
FSDP altogether (it then sets up multi-CPU DDP). DeepSpeed runs on the CPU (its CPU accelerator,
``DS_ACCELERATOR=cpu``, communicates over gloo when oneCCL is absent) only when the
``Accelerator`` is built with ``cpu=False`` and the process group's backend named (gloo) —
accelerate would otherwise ask the (absent) GPU for one. FSDP is enabled by accelerate only on
accelerator devices (multi-GPU/NPU/XPU ...), so on the CPU its FSDP2 state is set here after the
fact (:func:`_force_fsdp2`); FSDP1 is refused on every device (rollouts call ``generate`` on the
unwrapped module, which FSDP1 does not gather).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from core.config import ConfigError
from core.config.extras import require

if TYPE_CHECKING:
    import torch

    from core.interfaces import Device

#: Written once per run into the output folder by the main process.
BACKEND_FILE = "backend.json"

Requested = Literal["plain", "deepspeed", "fsdp", "megatron"]


@dataclass(frozen=True)
class LaunchRequest:
    """What ``accelerate launch`` asked for (from its environment variables).

    ``kind`` is ``plain`` for a launch without DeepSpeed/FSDP/Megatron (DDP with several processes,
    or one process); ``fsdp_version`` is set for FSDP; ``deepspeed_config_file`` for DeepSpeed with
    a JSON file; ``mixed_precision`` is the launcher's ``--mixed_precision`` (``no`` if unset).
    """

    kind: Requested = "plain"
    fsdp_version: int | None = None
    deepspeed_config_file: str | None = None
    mixed_precision: str = "no"


#: The launcher's process-layout variables (torchrun, accelerate launch, SLURM wrappers set them).
LAUNCH_INT_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launch_world_size(environ: Mapping[str, str] | None = None) -> int:
    """``WORLD_SIZE`` (1 when unset), after checking every launch variable is a sane integer.

    A non-numeric or out-of-range ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` ended in a ``ValueError``
    traceback (or a confusing refusal from accelerate); it is a :class:`ConfigError` naming the variable.
    """
    env = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for name in LAUNCH_INT_VARS:
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[name] = int(raw.strip())
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw[:40]!r} is not a whole number; it is set by the "
                              "launcher (torchrun / accelerate launch): unset it for a single-process run") from None
    world = values.get("WORLD_SIZE", 1)
    if not 1 <= world <= 1 << 20:
        raise ConfigError(f"environment variable WORLD_SIZE={world} must be between 1 and {1 << 20}")
    for name in ("RANK", "LOCAL_RANK"):
        if name in values and not 0 <= values[name] < world:
            raise ConfigError(f"environment variable {name}={values[name]} must be in 0..{world - 1} "
                              f"(WORLD_SIZE={world})")
    if "LOCAL_WORLD_SIZE" in values and not 1 <= values["LOCAL_WORLD_SIZE"] <= world:
        raise ConfigError(f"environment variable LOCAL_WORLD_SIZE={values['LOCAL_WORLD_SIZE']} must be in "
                          f"1..{world} (WORLD_SIZE={world})")
    return world


def launch_request(environ: Mapping[str, str] | None = None) -> LaunchRequest:
    """The backend ``accelerate launch`` requested, read from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ

    def flag(name: str) -> bool:
        return env.get(name, "false").strip().lower() in ("1", "true", "yes")

    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if flag("ACCELERATE_USE_DEEPSPEED"):
        cfg = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        return LaunchRequest("deepspeed", deepspeed_config_file=cfg if cfg and cfg != "none" else None,
                             mixed_precision=mp)
    if flag("ACCELERATE_USE_FSDP"):
        # accelerate's launcher writes FSDP_VERSION (1 when the config does not say).
        return LaunchRequest("fsdp", fsdp_version=int(env.get("FSDP_VERSION", "1") or 1), mixed_precision=mp)
    if flag("ACCELERATE_USE_MEGATRON_LM"):
        return LaunchRequest("megatron", mixed_precision=mp)
    return LaunchRequest("plain", mixed_precision=mp)


@dataclass(frozen=True)
class Backend:
    """The backend accelerate set up for this run (what :func:`backend_of` reads off the accelerator).

    ``name``: ``deepspeed``, ``fsdp``, ``ddp`` or ``single``; ``comm``: the ``torch.distributed``
    backend (``gloo``, ``nccl``, ``hccl``; ``None`` for one process); ``zero_stage`` and the
    offload devices for DeepSpeed; ``fsdp_version`` for FSDP; ``mixed_precision`` what the
    backend computes in (``no``, ``bf16``, ``fp16``; for DeepSpeed its JSON's ``bf16``/``fp16``).
    """

    name: Literal["deepspeed", "fsdp", "ddp", "single"]
    num_processes: int
    device: str
    comm: str | None = None
    zero_stage: int | None = None
    offload_optimizer: str | None = None
    offload_param: str | None = None
    fsdp_version: int | None = None
    mixed_precision: str = "no"

    def describe(self) -> str:
        """One line, e.g. ``DeepSpeed ZeRO-3 (gloo), 2 processes`` or ``single process (cpu)``."""
        if self.name == "single":
            return f"single process ({self.device})"
        if self.name == "deepspeed":
            what = f"DeepSpeed ZeRO-{self.zero_stage}"
            opt, par = self.offload_optimizer, self.offload_param
            if opt and opt == par:
                what += f" with optimizer and params offloaded to {opt}"
            elif opt or par:
                what += " with " + ", ".join(f"{k} offloaded to {v}" for k, v in (("optimizer", opt), ("params", par))
                                             if v)
        elif self.name == "fsdp":
            what = f"FSDP{self.fsdp_version or ''}"
        else:
            what = "DDP"
        procs = f"{self.num_processes} process{'es' if self.num_processes != 1 else ''}"
        return f"{what} ({self.comm or self.device}), {procs}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field plus ``description`` (for ``backend.json`` and the checkpoint state)."""
        return {**asdict(self), "description": self.describe()}


def backend_of(accelerator: Any) -> Backend:
    """What ``accelerator`` (an ``accelerate.Accelerator``) set up: name, processes, comm, ZeRO stage ..."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    state = accelerator.state
    kind = accelerator.distributed_type
    n = accelerator.num_processes
    device = accelerator.device.type
    comm = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    if kind == DistributedType.DEEPSPEED:
        plugin = state.deepspeed_plugin
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        mp = "bf16" if _enabled(plugin.deepspeed_config, "bf16") else \
            "fp16" if _enabled(plugin.deepspeed_config, "fp16") else "no"
        return Backend("deepspeed", n, device, comm, zero_stage=int(zero.get("stage", plugin.zero_stage)),
                       offload_optimizer=_offload(zero, "offload_optimizer"),
                       offload_param=_offload(zero, "offload_param"), mixed_precision=mp)
    mp = str(state.mixed_precision)
    if kind == DistributedType.FSDP:
        return Backend("fsdp", n, device, comm, fsdp_version=int(state.fsdp_plugin.fsdp_version), mixed_precision=mp)
    if kind == DistributedType.NO or n == 1:
        return Backend("single", n, device, comm, mixed_precision=mp)
    return Backend("ddp", n, device, comm, mixed_precision=mp)


def check_request(request: LaunchRequest, device_type: str) -> None:
    """Refuse, before anything is built, a launch the trainer cannot serve (a :class:`ConfigError`).

    FSDP1 (any device), Megatron-LM (not wired), and DeepSpeed without the package.
    """
    if request.kind == "megatron":
        raise ConfigError("accelerate launch asked for Megatron-LM, which vlmr1 does not support; use DeepSpeed "
                          "(examples/multinode/accelerate_zero3.yaml) or FSDP2 (accelerate_fsdp.yaml)")
    if request.kind == "fsdp":
        if request.fsdp_version != 2:
            raise ConfigError(
                f"accelerate launch asked for FSDP{request.fsdp_version or 1}; vlmr1 supports FSDP2 only (rollouts "
                "call generate on the unwrapped model, which FSDP1 does not gather): set fsdp_version: 2 in the "
                "accelerate config (examples/multinode/accelerate_fsdp.yaml)")
    if request.kind == "deepspeed":
        require("deepspeed", "deepspeed", "accelerate launch with DeepSpeed")  # one line: the pip command


def build_accelerator(device: Device, *, dtype: torch.dtype | None = None, timeout_s: float | None = None,
                      environ: Mapping[str, str] | None = None) -> Any:
    """The run's ``Accelerator``, honouring the launcher's DeepSpeed/FSDP request on ``device``.

    ``dtype`` is the model's training dtype: a DeepSpeed JSON's ``bf16``/``fp16`` ``"auto"`` is
    filled from it (DeepSpeed casts the model to its precision, so the two must agree; an explicit
    value that disagrees is refused). ``timeout_s`` bounds how long a collective waits for the
    other processes (``None``: accelerate's default, 30 min for gloo). ``environ`` replaces
    ``os.environ`` for reading the request (tests). Raises :class:`ConfigError` for a launch the
    trainer cannot serve, and when accelerate set up another backend than the one launched.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    world = launch_world_size(environ)  # a non-numeric WORLD_SIZE/RANK is named before accelerate reads it
    request = launch_request(environ)
    device_type = device.torch_device().type
    check_request(request, device_type)
    if request.kind == "fsdp" and world < 2:  # accelerate would set up no backend (an unsharded run)
        raise ConfigError("accelerate launch asked for FSDP with one process: FSDP shards over processes, launch "
                          "with --num_processes 2 or more (or drop the FSDP config for a one-process run)")
    handlers: list[Any] = []
    pg: dict[str, Any] = {}
    if timeout_s is not None:
        pg["timeout"] = timedelta(seconds=timeout_s)
    plugin = None
    cpu = device_type == "cpu"
    fsdp_on_cpu = request.kind == "fsdp" and cpu
    if fsdp_on_cpu:
        pg["backend"] = device.distributed_backend  # gloo: FSDP2's collectives on CPU tensors
    if request.kind == "deepspeed":
        if cpu:
            # DeepSpeed picks its accelerator at import: the CPU one, whose collectives are gloo
            # (without oneCCL); accelerate must then be told gloo, or it asks for a GPU backend.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
            pg["backend"] = device.distributed_backend
            cpu = False  # cpu=True would make accelerate ignore DeepSpeed (silent DDP)
        plugin = deepspeed_plugin(request, dtype)
    if pg:
        handlers.append(InitProcessGroupKwargs(**pg))
    try:
        acc = Accelerator(cpu=cpu, deepspeed_plugin=plugin, kwargs_handlers=handlers or None)
    except (ValueError, ImportError) as exc:  # accelerate's own refusals (a bad config combination ...)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"accelerate refused the launch ({request.kind}): {exc}") from None
    if fsdp_on_cpu:
        _force_fsdp2(acc)
    want = {"deepspeed": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP}.get(request.kind)
    if want is not None and acc.distributed_type != want:
        raise ConfigError(f"accelerate launch asked for {request.kind} but accelerate set up "
                          f"{acc.distributed_type.value} on {device_type}; refusing to train with another backend")
    return acc


def _force_fsdp2(acc: Any) -> None:
    """Turn a multi-CPU ``Accelerator`` into an FSDP2 one (accelerate enables FSDP only on accelerator devices).

    Why this and not torch's ``fully_shard`` by hand: accelerate's FSDP2 path (``prepare``'s
    wrapping policy, the optimizer's switch to the sharded parameters, ``get_state_dict``'s full
    gather, ``clip_grad_norm_`` over DTensors) is what runs on GPUs; forcing the two fields its
    ``AcceleratorState`` would have set (``distributed_type``, ``fsdp_plugin``) makes the CPU run
    the same code instead of a second wrapping of ours. Torch's FSDP2 itself runs on CPU tensors
    over gloo. The plugin is read from the launch variables, as accelerate does.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = acc.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # one process (nothing to shard), or accelerate did set something else: build_accelerator refuses
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # Also in the process-wide state: every later AcceleratorState() (accelerate's and
    # transformers' helpers make them) copies distributed_type back from it.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_backend(backend: Backend) -> None:
    """Refuse what accelerate set up but the trainer does not serve: DeepSpeed ZeRO stage 0.

    Stage 0 is data parallelism through DeepSpeed's engine with a whole optimizer state per
    process, a path nobody has run here (its optimizer is not ZeRO's, so the per-process
    checkpoint shards do not apply); plain DDP (``--multi_gpu``) does the same, tested.
    """
    if backend.name == "deepspeed" and not backend.zero_stage:
        raise ConfigError("the DeepSpeed config asks for ZeRO stage 0, which vlmr1 does not support: use stage 2 "
                          "or 3 (examples/multinode/accelerate_zero2.yaml, accelerate_zero3.yaml), or plain DDP "
                          "(accelerate launch --multi_gpu)")


def deepspeed_plugin(request: LaunchRequest, dtype: torch.dtype | None) -> Any:
    """The ``DeepSpeedPlugin`` (accelerate's) for ``request`` with ``bf16``/``fp16`` ``auto`` filled from ``dtype``.

    Built here rather than by accelerate so the precision follows the model: accelerate fills
    ``auto`` from ``--mixed_precision`` (``no`` unless given), which would run a bfloat16 model
    through DeepSpeed's fp32 path. A JSON value, or a ``--mixed_precision``, that disagrees with
    ``model.dtype`` is refused.
    """
    import torch
    from accelerate.utils import DeepSpeedPlugin

    try:
        plugin = DeepSpeedPlugin()  # reads ACCELERATE_DEEPSPEED_CONFIG_FILE and the other launch variables
    except ValueError as exc:  # e.g. mixed_precision beside deepspeed_config_file in the accelerate config
        src = f" ({request.deepspeed_config_file})" if request.deepspeed_config_file else ""
        hint = (" Put the precision in the DeepSpeed JSON (\"bf16\": {\"enabled\": \"auto\"} follows model.dtype) "
                "and remove mixed_precision from the accelerate config." if "deepspeed_config_file" in str(exc) else "")
        raise ConfigError(f"the DeepSpeed launch configuration{src} is inconsistent: {' '.join(str(exc).split())}"
                          f"{hint}") from None
    if dtype is None:
        return plugin
    ds = plugin.deepspeed_config
    model_mp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    if request.mixed_precision not in ("no", model_mp):
        raise ConfigError(f"--mixed_precision {request.mixed_precision} disagrees with the model's dtype "
                          f"({str(dtype).removeprefix('torch.')}, from model.dtype): set model.dtype, or drop "
                          "--mixed_precision (under DeepSpeed the model's dtype decides)")
    for key in ("bf16", "fp16"):
        block = ds.setdefault(key, {})
        want = model_mp == key
        value = block.get("enabled", "auto")
        if value == "auto":
            block["enabled"] = want
        elif _truthy(value) != want:
            raise ConfigError(
                f"the DeepSpeed config{f' {request.deepspeed_config_file}' if request.deepspeed_config_file else ''} "
                f"sets {key}.enabled={value} but the model trains in {str(dtype).removeprefix('torch.')} "
                f"(model.dtype): DeepSpeed would cast it; set {key}.enabled to \"auto\" or change model.dtype")
    return plugin


def fill_deepspeed_config(ds: dict[str, Any], model: Any, *, micro_batch_size: int, num_processes: int,
                          max_grad_norm: float | None) -> None:
    """Fill a DeepSpeed config's ``auto`` entries that accelerate cannot fill for a VLM trainer, in place.

    The batch fields (there is no dataloader for accelerate to read them from; one micro-batch
    per optimizer step), ``gradient_clipping`` (``train.max_grad_norm``; 0 = off), and the
    bucket sizes accelerate derives from ``model.config.hidden_size`` — which a VLM's top-level
    config lacks (Qwen2.5-VL keeps it in ``text_config``), so accelerate's own fill fails.
    Values the JSON sets explicitly are kept.
    """
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch_size * num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = max_grad_norm or 0.0
    zero = ds.setdefault("zero_optimization", {})
    auto = [k for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
            if zero.get(k) == "auto"]
    if not auto:
        return
    hidden = _hidden_size(model)
    sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}  # accelerate's own rule for text models
    for key in auto:
        zero[key] = sizes[key]


def _hidden_size(model: Any) -> int:
    """The language model's hidden size (a VLM's top-level config may not have one)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("DeepSpeed: the model has no config to size the `auto` buckets from; set "
                          "zero_optimization.reduce_bucket_size (and the stage3_* sizes) to numbers in the JSON")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (text, config):
        size = getattr(cfg, "hidden_size", None)
        if isinstance(size, int):
            return size
        sizes = getattr(cfg, "hidden_sizes", None)
        if sizes:
            return int(max(sizes))
    raise ConfigError(f"DeepSpeed: no hidden_size in {type(config).__name__} to size the `auto` buckets from; set "
                      "zero_optimization.reduce_bucket_size (and the stage3_* sizes) to numbers in the JSON")


class ZeroOptimizerState:
    """A DeepSpeed ZeRO optimizer's per-process state as plain data, for the pickle-free checkpoint.

    ``state_dict()`` is this process's shard (AdamW moments and fp32 master partition of the
    parameters it owns, paddings, stage): the checkpoint writes one per process
    (``optimizer_rank<r>``). DeepSpeed's own dict carries a ``LossScaler`` object, which cannot
    be written as data (the ``TypeError ... LossScaler`` a ZeRO save used to stop with): its
    attributes are kept as ``loss_scaler_state`` instead, and the parameter-name fragment map
    (only used by DeepSpeed's universal checkpoints, rebuilt by the live optimizer) is dropped.
    ``load_state_dict`` hands the shard back to DeepSpeed, with the fp32 master weights taken
    from it (exact, also when the model trains in bfloat16).
    """

    def __init__(self, optimizer: Any, rank: int, num_processes: int) -> None:
        self.optimizer, self.rank, self.num_processes = optimizer, rank, num_processes

    def _zero(self) -> Any:
        # accelerate wraps DeepSpeed's ZeRO optimizer (DeepSpeedOptimizerWrapper.optimizer).
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        sd = dict(self._zero().state_dict())
        scaler = sd.pop("loss_scaler", None)
        sd.pop("param_slice_mappings", None)
        if scaler is not None:
            sd["loss_scaler_state"] = {k: v for k, v in vars(scaler).items()
                                       if v is None or isinstance(v, bool | int | float | str)}
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        zero = self._zero()
        sd = dict(state)
        live = zero.loss_scaler
        for key, value in (sd.pop("loss_scaler_state", None) or {}).items():
            if hasattr(live, key):
                setattr(live, key, value)
        sd["loss_scaler"] = live
        # DeepSpeed takes one dict per data-parallel rank and reads its own; the others stay unread.
        shards: list[Any] = [None] * self.num_processes
        shards[self.rank] = sd
        zero.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)


class Fsdp2OptimizerState:
    """An FSDP2 optimizer's state as this process's shard, for the per-process pickle-free checkpoint.

    Under FSDP2 the parameters, and so AdamW's moments, are ``DTensor``s sharded over the
    processes; a ``DTensor`` cannot be written to safetensors (its storage is not the shard's).
    ``state_dict()`` keeps each one's local shard (written as ``optimizer_rank<r>``, as under
    ZeRO; the same sharding on the same number of processes is checked at resume), and
    ``load_state_dict`` rebuilds the ``DTensor``s on the live parameters' mesh and placements.
    Nothing is gathered: each process saves and restores only what it holds.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        state = {i: {k: _local(v) if hasattr(v, "to_local") else v for k, v in st.items()}
                 for i, st in sd["state"].items()}
        return {**sd, "state": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor

        # torch numbers the parameters over the param groups in order (what state_dict's keys are).
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        restored: dict[Any, Any] = {}
        for key, st in state["state"].items():
            p = params[int(key)]
            restored[key] = {k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                                   stride=p.stride())
                             if isinstance(p, DTensor) and hasattr(v, "shape") and v.dim() == p.dim() else v
                             for k, v in st.items()}
        self.optimizer.load_state_dict({**state, "state": restored})


def zero3_plugin(accelerator: Any) -> Any:
    """The ``DeepSpeedPlugin`` (accelerate's) when ``accelerator`` runs DeepSpeed ZeRO-3, else ``None``."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin if plugin is not None and plugin.zero_stage == 3 else None


@contextlib.contextmanager
def whole_weights_loading(accelerator: Any) -> Iterator[None]:
    """A context in which ``from_pretrained`` loads whole weights, also under DeepSpeed ZeRO-3.

    Under ZeRO-3 accelerate registers its DeepSpeed config with transformers, which then loads
    every model partitioned (``zero.Init``). A model never given to DeepSpeed (the reference
    model) would then have no one to gather its weights (``'weight' must be 2-D``): loaded here it
    is whole (memory: one more model per process). The registration is restored afterwards.
    """
    plugin = zero3_plugin(accelerator)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def check_sharded_generation(backend: Backend, *, gather: bool, per_rank: int, group_size: int, resample: bool,
                             eval_samples: int) -> None:
    """Refuse, under ZeRO-3 with ``train.gather_for_generation: false``, settings that make ranks generate unevenly.

    Without the gather every generated token all-gathers each layer: a collective all processes
    must join. transformers keeps the decoding loops of one ``generate`` call in step
    (``synced_gpus``), so completions may end at different lengths, but every process must make
    the same number of calls. That fails when a group straddles two ranks (rank-dependent calls),
    with dynamic sampling (only the ranks holding a zero-variance group regenerate) and with
    evaluation shards of unequal size; each would deadlock (NCCL) or abort (gloo) mid-run.
    """
    if not gather and backend.name == "fsdp" and backend.num_processes > 1:
        # Unlike ZeRO-3's hooks, FSDP2's gather only inside a wrapped module's forward: greedy
        # evaluation runs the vision encoder outside it (mixed Tensor/DTensor error), and no
        # synced_gpus keeps the ranks' decoding loops (each a round of all-gathers) in step.
        raise ConfigError("train.gather_for_generation=false is not supported under FSDP2 (generation outside the "
                          "wrapped forward would see sharded weights, and ranks generating unequal amounts would "
                          "stop matching collectives): set train.gather_for_generation=true (the default: the whole "
                          "model on every process while generating)")
    if gather or backend.name != "deepspeed" or backend.zero_stage != 3 or backend.num_processes < 2:
        return
    world = backend.num_processes
    why = []
    if per_rank % group_size:
        why.append(f"each process holds {per_rank} completions, not a multiple of grpo.num_generations={group_size} "
                   "(a group split over two processes makes their generate calls differ)")
    if resample:
        why.append("grpo.zero_variance_groups=resample (only the processes holding a resampled group generate again)")
    if eval_samples % world:
        why.append(f"{eval_samples} evaluation samples do not split evenly over {world} processes (set "
                   f"eval.num_samples to a multiple of {world})")
    if why:
        raise ConfigError("train.gather_for_generation=false under DeepSpeed ZeRO-3 needs every process to make the "
                          "same generate calls, but " + "; and ".join(why) + ". Set train.gather_for_generation=true "
                          "(the default: the whole model on every process while generating) or change these settings")


@contextlib.contextmanager
def whole_weights_for_generation(accelerator: Any, model: Any, *, gather: bool = True) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, gather the policy's weights once for a whole rollout (or evaluation).

    ZeRO-3 keeps each weight split over the processes and all-gathers a layer's shards in the
    pre-forward hook of every forward, i.e. for every generated token. That is slow, and a
    collective every process must join: when processes generate different amounts (completions
    ending at different lengths, uneven evaluation shards, resampled groups) their collectives
    stop matching and the run deadlocks (NCCL) or aborts (gloo). Inside this context the whole
    model is on every process and DeepSpeed's hooks are off, so generation runs no collective at
    all (transformers is told too: under ZeRO-3 its ``generate`` would otherwise keep the ranks'
    decoding loops in step with an all-reduce per token, ``synced_gpus``); the cost is the full
    model's memory on every process while it lasts. Elsewhere (ZeRO-2, DDP, one process), and with
    ``gather=False`` (``train.gather_for_generation``; see :func:`check_sharded_generation`), it
    does nothing.
    """
    if gather and getattr(accelerator, "is_fsdp2", False):
        with _fsdp2_unsharded(model):
            yield
        return
    plugin = zero3_plugin(accelerator)
    if plugin is None or not gather:
        yield
        return
    import deepspeed
    from transformers.integrations import unset_hf_deepspeed_config

    zero = model.optimizer
    offload = getattr(zero, "parameter_offload", zero)  # DeepSpeed's ZeRO-3 hook owner
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        # Also the root module's start-of-forward hook: until DeepSpeed has recorded a complete
        # fetch trace it checks the trace against the other ranks (a broadcast) at every forward.
        root = offload.module
        start_hook = root._forward_pre_hooks.get(offload.fwd_pre_hook.id)
        for hook in [offload.fwd_pre_hook, *offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        for p in root.parameters():
            p.ds_active_sub_modules.clear()  # no sub-module holds a gathered parameter any more
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()
            coordinator = getattr(offload, "param_coordinator", None)
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # the recorded fetch order no longer holds
            if start_hook is not None:  # first, as DeepSpeed registers it (setup_zero_stage3_hooks)
                offload.fwd_pre_hook = root.register_forward_pre_hook(start_hook)
            offload._register_deepspeed_module(root)


def full_state_dict(accelerator: Any, model: Any) -> dict[str, Any]:
    """The prepared ``model``'s whole weights for ``save_pretrained`` (call on every process: it gathers).

    ``accelerator.get_state_dict`` everywhere but FSDP2, where accelerate's full state dict
    (torch's ``get_model_state_dict`` with ``cpu_offload``) leaves CPU-resident ``DTensor``
    shards ungathered, which safetensors then cannot write ("invalid python storage"): each
    sharded tensor is gathered here with ``full_tensor`` instead, in the same order on every process.
    """
    if not getattr(accelerator, "is_fsdp2", False):
        return accelerator.get_state_dict(model)
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in accelerator.unwrap_model(model).state_dict().items()}


@contextlib.contextmanager
def _fsdp2_unsharded(model: Any) -> Iterator[None]:
    """FSDP2's counterpart of the ZeRO-3 gather: every ``fully_shard``-ed module unsharded, and kept so.

    ``unshard()`` all-gathers each module's parameters (the same modules in the same order on
    every process) and swaps the whole tensors in as its parameters, so code outside a wrapped
    forward (``generate`` calling the vision encoder) sees plain tensors. Resharding after each
    forward is switched off meanwhile: FSDP2's pre-forward ``unshard`` is then a no-op, and
    generation runs no collective however many tokens each process decodes. The modules'
    reshard settings (FSDP2 keeps the root's off) are put back as they were, then all reshard.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if isinstance(model, FSDPModule):
        # FSDP2 sets itself up (which module is the root) at the root's first forward; an eval
        # before any training forward would otherwise let an inner module (the vision tower,
        # called outside the root's forward) take itself for the root. Idempotent.
        model._get_fsdp_state()._lazy_init()
    saved = []
    for m in modules:
        m.unshard()
        # set_reshard_after_forward writes exactly these two fields; kept to restore them as they were
        state = m._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward,
                      [(g, g.post_forward_mesh_info) for g in state._fsdp_param_groups]))
        m.set_reshard_after_forward(False, recurse=False)
    # transformers' generate keeps the ranks' decoding loops in step (synced_gpus: an all-reduce per
    # token) for any module torch marks as FSDP-managed; with nothing left to gather that only makes
    # ranks with unequal work wait on each other (or time out), so the mark is lifted meanwhile.
    marked = [m for m in model.modules() if getattr(m, "_is_fsdp_managed_module", False)]
    for m in marked:
        m._is_fsdp_managed_module = False
    try:
        yield
    finally:
        for m in marked:
            m._is_fsdp_managed_module = True
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info
        for m in modules:
            m.reshard()


class MemoryAccounting:
    """Bytes of the policy's parameters, gradients and optimizer state this process holds (exact, not RSS).

    On a small model a process's resident memory is mostly libraries, so ZeRO's savings are
    counted instead: ``params_bytes`` — the parameters held locally (a ZeRO-3 parameter's
    partition ``ds_tensor`` plus whatever is gathered at the time, i.e. the persistent small ones;
    an FSDP2 ``DTensor``'s local shard); ``grads_bytes`` — the gradients the optimizer steps with
    (the whole gradient under DDP, the rank's reduced partition under ZeRO-2/3; DDP's own
    communication buckets are not counted); ``optimizer_state_bytes`` — the optimizer's state
    tensors (AdamW's moments and step) plus master weights that are separate tensors from the
    model's (ZeRO's fp32 partitions, unless they share the model's storage).

    Built on the torch optimizer given to ``accelerator.prepare`` (DeepSpeed steps that same
    object on its flat partitions); a step pre-hook sees the gradients, which are freed after the
    step. Call :meth:`take` once after the first update, on every process.
    """

    def __init__(self, model: Any, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer
        self._grads: dict[int, int] = {}
        self._hook = optimizer.register_step_pre_hook(self._see_grads)

    def _see_grads(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # ZeRO steps once per (sub-)group with only that group's partition in param_groups: collect all.
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._grads[id(p)] = _nbytes(_local(p.grad))

    def take(self) -> dict[str, int]:
        """The counts (bytes) for this process; stops watching the optimizer."""
        self._hook.remove()
        params, storages = 0, set()
        for p in self.model.parameters():
            for t in (_local(p), getattr(p, "ds_tensor", None)):
                if t is not None and t.numel():
                    params += _nbytes(t)
                    storages.add(t.untyped_storage().data_ptr())
        state = 0
        for p, st in self.optimizer.state.items():
            p = _local(p)  # FSDP2: DTensors, whose local shard is what this process holds
            if p.untyped_storage().data_ptr() not in storages:  # a master copy, not the model's weights
                state += _nbytes(p)
            state += sum(_nbytes(_local(v)) for v in st.values() if hasattr(v, "untyped_storage"))
        return {"params_bytes": params, "grads_bytes": sum(self._grads.values()), "optimizer_state_bytes": state}


def _nbytes(t: Any) -> int:
    return int(t.numel()) * int(t.element_size())


def _local(p: Any) -> Any:
    """The part of tensor ``p`` stored in this process (an FSDP2 DTensor's shard; else ``p`` itself)."""
    return p.to_local() if hasattr(p, "to_local") else getattr(p, "data", p)


def write_backend(output_dir: Any, backend: Backend, memory_per_rank: list[dict[str, int]] | None = None) -> None:
    """Write ``backend.json`` (the main process, at start; again with ``memory_per_rank`` after the first step)."""
    import json
    from pathlib import Path

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = backend.as_dict()
    if memory_per_rank is not None:
        record["memory_per_rank"] = memory_per_rank
    (out / BACKEND_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _enabled(ds: Mapping[str, Any], key: str) -> bool:
    return _truthy(ds.get(key, {}).get("enabled", False))


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _offload(zero: Mapping[str, Any], key: str) -> str | None:
    dev = (zero.get(key) or {}).get("device")
    return None if dev in (None, "none") else str(dev)
