"""The one model loader: training, SFT, evaluation and serving all load a policy here.

``load_policy(plan, registry, phase="train" | "infer", checkpoint=...)`` for the apps that have a
run config; :func:`load_checkpoint` for a bare checkpoint folder (the server). Both take the
dtype from :func:`resolve_dtype` and the attention kernel from :func:`resolve_attention`, so a
checkpoint trains, evaluates and is served in one precision with one kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.config import ConfigError, RunConfig
from core.runtime.distributed import whole_weights_loading

if TYPE_CHECKING:
    import torch

    from core.interfaces import Device, ModelFamily
    from core.plugins.plan import Plan
    from core.plugins.registry import Registry

Phase = Literal["train", "infer"]


@dataclass
class ModelBundle:
    """A loaded policy: model, processor, family, and how to get reference log-probs.

    ``ref_model`` is a frozen copy of the base (GRPO with ``beta > 0`` and full fine-tuning);
    under LoRA (``lora=True``) the reference is the policy with its adapters disabled.
    ``suppressed`` are the token ids generation must never emit (image pads ...).
    """

    family: ModelFamily
    model: Any
    processor: Any
    ref_model: Any = None
    lora: bool = False
    suppressed: list[int] = field(default_factory=list)


# ---- the rules -------------------------------------------------------------------------------
def resolve_dtype(name: str, device: Device, device_type: str | None = None) -> torch.dtype:
    """The torch dtype for ``model.dtype`` / ``--dtype`` on ``device``: ONE rule for every phase.

    ``auto`` = bfloat16 on an accelerator that supports it, else float32: bfloat16 on a CPU is
    slow, and float16 without loss scaling is unsafe to train in, so an accelerator without
    bfloat16 gets float32 for training *and* serving (the same checkpoint must not run in two
    precisions). An explicit dtype the device does not list is an error.
    """
    import torch

    kind = device_type or device.torch_device().type
    supported = device.supported_dtypes()
    if name == "auto":
        name = "bfloat16" if kind != "cpu" and "bfloat16" in supported else "float32"
    elif name not in supported and name != "float32":
        raise ConfigError(f"dtype {name} is not supported by device {device.name!r} "
                          f"(supported: {', '.join(supported)})")
    return getattr(torch, name)


def resolve_attention(requested: str | None, device: Device, dtype: torch.dtype) -> str | None:
    """``requested``, else the device's best attention kernel that runs in ``dtype``.

    Flash kernels need half precision, so float32 falls back to the next one (``sdpa``).
    """
    import torch

    if requested is not None:
        return requested
    return next((a for a in device.attention_implementations()
                 if dtype != torch.float32 or not a.startswith("flash")), None)


def resolve_family(plan: Plan, registry: Registry, path: str | Path) -> ModelFamily:
    """The configured family, or the one whose ``model_types`` has the checkpoint's type."""
    from core.plugins.plan import families_for_model_type, registry_family_for

    entry = plan.model_family
    if entry is None:
        if Path(path, "config.json").is_file():
            entry = registry_family_for(registry, path)
        else:  # a hub id: ask transformers for the model_type (cached/offline as configured)
            from transformers import AutoConfig

            mt = AutoConfig.from_pretrained(str(path)).model_type
            hits = families_for_model_type(registry, mt)
            if not hits:
                raise ConfigError(f"model.path: no installed model family handles model_type {mt!r}")
            entry = hits[0]
    return entry.cls.from_options(plan.config.model.options)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder: ``path`` itself, or the newest ``checkpoint-N`` inside an output folder.

    A newest ``checkpoint-N`` that is damaged is an error naming it, never a silent step back to an
    older one.
    """
    from core.runtime.checkpoint import check_manifest, checkpoint_folders

    p = Path(path)
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return p
    folders = checkpoint_folders(p)
    if folders:
        problem = check_manifest(folders[-1], hashes=False)
        if problem is None:
            return folders[-1]
        raise ConfigError(f"--checkpoint {p}: its newest checkpoint, {folders[-1].name}, cannot be used: {problem}. "
                          f"Name an earlier one (--checkpoint {p}/checkpoint-N) to use that instead")
    raise ConfigError(f"--checkpoint {p}: not a transformers checkpoint folder (no config.json or "
                      "adapter_config.json) and no complete checkpoint-N folder inside it")


def apply_training_mode(model: Any, family: ModelFamily, cfg: RunConfig) -> Any:
    """Freeze the vision tower, or wrap in LoRA adapters that stay off the vision tower."""
    import torch

    vision = family.vision_module_names(model)
    mode = cfg.train.mode
    if mode == "frozen_vision":
        if not vision:
            raise ConfigError(f"train.mode=frozen_vision: model family {family.name!r} names no vision modules")
        for name in vision:
            model.get_submodule(name).requires_grad_(False)
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model

        lc = cfg.train.lora
        targets = lc.target_modules
        if targets is None:
            # Every Linear of the language model; never the vision tower or the output head.
            targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                       and not any(n == v or n.startswith(v + ".") for v in vision)
                       and not n.endswith("lm_head")]
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=targets))
    if cfg.train.gradient_checkpointing:
        _enable_checkpointing(model, lora=mode == "lora")
    return model


def _enable_checkpointing(model: Any, *, lora: bool) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:  # inputs of a frozen base need grads for checkpointed adapter layers to get any
        model.enable_input_require_grads()


# ---- loading ---------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, family: ModelFamily, device: Device, *, dtype: str = "auto",
                    attn_implementation: str | None = None, torch_device: Any = None,
                    verify_hashes: bool = True) -> ModelBundle:
    """Load a transformers checkpoint folder for inference (no run config: the server's case).

    A vlmr1 checkpoint is verified first (:func:`~core.runtime.checkpoint.verify_checkpoint`: no
    unlisted file, every listed one complete, and with ``verify_hashes`` unaltered).
    """
    from core.runtime.checkpoint import verify_checkpoint

    verify_checkpoint(path, hashes=verify_hashes)
    tdev = torch_device if torch_device is not None else device.torch_device()
    tdtype = resolve_dtype(dtype, device, _device_type(tdev))
    model = family.load_model(path, dtype=tdtype,
                              attn_implementation=resolve_attention(attn_implementation, device, tdtype))
    model.to(tdev)
    model.eval()
    device.prepare_model(model)
    processor = family.load_processor(path)
    return ModelBundle(family, model, processor, suppressed=family.suppressed_token_ids(processor, model))


def load_policy(plan: Plan, registry: Registry, *, phase: Phase, checkpoint: str | Path | None = None,
                reference: bool = False, accelerator: Any = None, device: Any = None,
                load_model: bool = True, verify_hashes: bool = True, base_path: str | None = None) -> ModelBundle:
    """Load the run's policy (``model.path``, or ``checkpoint``) for training or inference.

    ``phase="train"``: in ``train.mode`` (full, frozen vision tower, LoRA); ``checkpoint`` is a
    checkpoint to resume (its LoRA adapters are reloaded trainable); with ``reference`` a frozen
    reference copy of ``model.path`` is loaded too (not under LoRA, whose reference is the policy
    with adapters disabled). ``phase="infer"``: ``checkpoint`` (a folder, or an output folder
    whose newest ``checkpoint-N`` is taken) replaces ``model.path``; a LoRA adapter checkpoint
    is applied to ``model.path`` and merged; the model is put on ``device`` in eval mode.
    ``load_model=False`` loads only the family and processor (server back ends). An inference
    ``checkpoint`` is verified against its manifest first (hashes too, unless ``verify_hashes`` is
    false). ``base_path`` replaces ``model.path`` as the base (the reference model, and the model a
    LoRA checkpoint's adapters sit on): a resumed run's is the path of the run that saved it.

    A ``model.tiny`` checkpoint is built first when missing (once, on the main process).
    """
    cfg = plan.config
    device_obj = plan.device.cls.from_options(plan.options.get("device"))
    base = base_path or cfg.model.resolved_path()
    ckpt = None
    if checkpoint is not None:
        ckpt = Path(checkpoint) if phase == "train" else resolve_checkpoint(checkpoint)
    if phase == "infer" and ckpt is not None:
        from core.runtime.checkpoint import verify_checkpoint

        verify_checkpoint(ckpt, hashes=verify_hashes)
    adapter = ckpt is not None and (cfg.train.mode == "lora" if phase == "train"
                                    else not (ckpt / "config.json").is_file())
    if cfg.model.tiny is not None and (ckpt is None or adapter or phase == "train") \
            and not Path(base, "config.json").is_file():
        _build_tiny(plan, base, accelerator)
    weights = str(base if (ckpt is None or adapter) else ckpt)
    family = resolve_family(plan, registry, weights)
    if phase == "infer" and ckpt is not None and (ckpt / "tokenizer_config.json").is_file():
        processor = family.load_processor(str(ckpt))
    else:
        processor = family.load_processor(base)
    if not load_model:
        return ModelBundle(family, None, processor)
    if device is None:
        device = accelerator.device if accelerator is not None else device_obj.torch_device()
    import torch

    dtype = resolve_dtype(cfg.model.dtype, device_obj, torch.device(device).type)
    attn = resolve_attention(cfg.model.attn_implementation, device_obj, dtype)
    model = family.load_model(weights, dtype=dtype, attn_implementation=attn)
    _keep_used_conversions(model)
    lora = phase == "train" and cfg.train.mode == "lora"
    ref = None
    if phase == "infer":
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
        model.to(device)
        model.eval()
    elif adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=True)
        if cfg.train.gradient_checkpointing:
            _enable_checkpointing(model, lora=True)
    else:
        model = apply_training_mode(model, family, cfg)
    if phase == "train" and reference and not lora:
        # Under ZeRO-3 a whole frozen copy per process: DeepSpeed never gets the reference to shard.
        with whole_weights_loading(accelerator):
            ref = family.load_model(base, dtype=dtype, attn_implementation=attn)
        ref.requires_grad_(False)
        ref.eval()
        ref.to(device)
    for m in (model, ref):  # the device's own kernels (the CPU's oneDNN linears), before accelerate wraps it
        if m is not None:
            device_obj.prepare_model(m)
    return ModelBundle(family, model, processor, ref, lora, family.suppressed_token_ids(processor, model))


def _build_tiny(plan: Plan, path: str, accelerator: Any) -> None:
    """Build the configured tiny checkpoint (validated in make_plan: ``model.tiny`` needs a family)."""
    ctx = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with ctx:
        if not Path(path, "config.json").is_file():
            import torch

            # The build seeds torch's generator with the tiny seed: without the fork the run that
            # builds the checkpoint would draw other random numbers afterwards (LoRA's initial A
            # matrices ...) than every later run with the same train.seed.
            # Under a ZeRO-3 launch transformers would build the model inside deepspeed.zero.Init,
            # whose broadcasts the other processes (waiting for the main one here) never join.
            with torch.random.fork_rng(devices=[]), _no_zero3_init():
                plan.model_family.cls.build_tiny_checkpoint(path, **plan.config.model.tiny)


@contextlib.contextmanager
def _no_zero3_init() -> Iterator[None]:
    """Build models as plain modules (not ZeRO-3 partitioned) inside, whatever the launch.

    transformers decides by a module-level weak reference to the DeepSpeed config that accelerate
    sets; its public ``unset_hf_deepspeed_config`` cannot restore it, so it is saved and put back.
    """
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _keep_used_conversions(model: Any) -> None:
    """Keep only the checkpoint-key renamings the load used, as transformers' ordinary load does.

    ``save_pretrained`` reverts them to write the checkpoint's original key names. transformers'
    ZeRO-3 load keeps every candidate renaming instead (legacy and prefix rules included), and
    reverting those writes keys such as ``model.model.layers.0...`` that no load finds: a ZeRO-3
    checkpoint would not reload. Filtering makes both loads save the same names.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if isinstance(conversions, list) and all(hasattr(c, "was_used") for c in conversions):
        model._weight_conversions = [c for c in conversions if c.was_used()]


def _device_type(dev: Any) -> str:
    import torch

    return torch.device(dev).type
