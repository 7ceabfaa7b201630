"""The supervised baseline (run it with ``python -m core.sft --config FILE [options] [key=value ...]``).

Supervised fine-tuning on the same task, prompts and chat template as GRPO (the run config's
``model`` / ``task`` sections), so "RL vs SFT" is one command each. Training runs on TRL's
``SFTTrainer`` (optimizer, schedule, logging, accelerate / multi-GPU) with a collator built from
the model family: each prompt is rendered and processed exactly as for a rollout
(``family.render_prompt`` + ``family.process``) and the target's token ids are appended after
it, as the GRPO training forward does (:func:`core.grpo.logprobs.build_train_inputs`); the loss
covers the target tokens and the closing EOS only.

The target (the assistant turn) is built from ``Sample.solution`` (see :func:`target_text`):

- a box (``reward_method`` ``iou``/``rec``): the solution box (original pixels) mapped to the
  model family's coordinate convention and rounded: Qwen2.5-VL ``absolute_resized`` =
  pixels of the resized image the model sees, Qwen2-VL / Qwen3-VL / InternVL
  ``normalized_1000`` = 0-1000, ``absolute_original`` = unchanged; written ``[x1, y1, x2, y2]``,
  or ``{"bbox_2d": [x1, y1, x2, y2]}`` when the question asks for JSON (``--box-format``). So
  SFT teaches exactly the coordinates the ``iou`` reward maps back during GRPO.
- detection (``map``, ``od_ap`` ...): ``[{"bbox_2d": [...], "label": "..."}, ...]`` with each
  box mapped likewise, or ``None`` for no objects;
- anything else (math, exact match, multiple choice ...): the solution's ``<answer>`` content,
  or the solution text.

The answer is then wrapped by ``--template``: ``auto`` = ``<think>{think}</think><answer>{answer}</answer>``
when the question asks for ``<answer>`` tags (VLM-R1's R1 prompts), else ``{answer}`` alone.

Settings come from ``train.*`` (``learning_rate``, ``per_device_batch_size`` — samples per
micro-batch here —, ``gradient_accumulation_steps``, ``max_steps``, ``seed``, ``lr_scheduler``,
``warmup_steps``, ``weight_decay``, ``max_grad_norm``, ``gradient_checkpointing``, ``mode``);
the rest are flags. The result is a standard transformers checkpoint (weights, generation
config, processor) in ``--output-dir``: ``core.train model.path=DIR`` and ``core.evaluate
--checkpoint DIR`` load it. Under ``train.mode=lora`` the adapter is merged before saving.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import ConfigError
from core.runtime.evaluator import answer_text, kind_of_reward, parse_box, parse_objects, reward_for_method

if TYPE_CHECKING:
    from PIL import Image

    from core.interfaces import ModelFamily, Sample
    from core.plugins.plan import Plan
    from core.plugins.registry import Registry
    from core.runtime.loader import ModelBundle

#: The R1 answer layout (VLM-R1's prompts ask for it); ``{think}`` is ``--think-text``.
R1_TEMPLATE = "<think>{think}</think><answer>{answer}</answer>"


# ---- targets -------------------------------------------------------------------------------
def box_from_original(family: ModelFamily, box: Sequence[float], original_size: tuple[int, int],
                      resized_size: tuple[int, int]) -> list[float]:
    """Map an original-pixel box into the family's convention: the inverse of ``box_to_original``.

    Written here per :data:`core.interfaces.BoxConvention` because the ``ModelFamily``
    interface only has the forward map; a family whose convention is ``unknown`` cannot be
    taught boxes.
    """
    ow, oh = original_size
    conv = family.box_convention
    if conv == "absolute_resized":
        rw, rh = resized_size
        return [box[0] * rw / ow, box[1] * rh / oh, box[2] * rw / ow, box[3] * rh / oh]
    if conv == "normalized_1000":
        return [box[0] * 1000 / ow, box[1] * 1000 / oh, box[2] * 1000 / ow, box[3] * 1000 / oh]
    if conv == "absolute_original":
        return [float(v) for v in box]
    raise ConfigError(f"model family {family.name!r} has box convention {conv!r}: SFT cannot write box "
                      "targets in the model's coordinates; declare the family's box_convention")


def _fmt_box(box: Sequence[float], decimals: int) -> str:
    # Half-up rounding (Python's round() goes to even, so 31.5 and 32.5 would both become 32).
    scale = 10**decimals
    vals = [math.floor(v * scale + 0.5) / scale if decimals else math.floor(v + 0.5) for v in box]
    return "[" + ", ".join(str(v) for v in vals) + "]"


def target_kind(sample: Sample, registry: Registry | None = None) -> str | None:
    """``rec``, ``detection`` or ``None`` (text): the metric kind of the reward serving the sample's method.

    The kind each reward declares (``Reward.eval_metric``) decides the target's form, so SFT
    teaches boxes exactly where evaluation reads boxes. Without a ``registry`` the installed
    plugins are asked.
    """
    if not sample.reward_method:
        return None
    if registry is None:
        registry = _installed_registry()
    name = reward_for_method(registry, sample.reward_method)
    return None if name is None else kind_of_reward(registry, name).kind


@functools.cache
def _installed_registry() -> Registry:
    from core.plugins import PluginHost

    return PluginHost().registry


def answer_for(sample: Sample, family: ModelFamily, processor: Any, images: Sequence[Image.Image], *,
               box_format: str = "auto", box_decimals: int = 0, registry: Registry | None = None) -> str:
    """The answer text for ``sample`` (before ``--template`` wrapping); see the module doc."""
    kind = target_kind(sample, registry)
    wants_json = box_format == "json" or (box_format == "auto" and "json" in sample.question.lower())
    if kind in ("rec", "detection"):
        if not images:
            raise ConfigError(f"sample {sample.id!r}: a box target needs the sample's image")
        orig = images[0].size
        resized = family.resized_image_size(processor, images[0])
    if kind == "rec":
        gold = parse_box(sample.solution)
        if gold is None:
            raise ConfigError(f"sample {sample.id!r}: solution {str(sample.solution)[:80]!r} has no box "
                              "[x1, y1, x2, y2] to teach")
        text = _fmt_box(box_from_original(family, gold, orig, resized), box_decimals)
        return '{"bbox_2d": ' + text + "}" if wants_json else text
    if kind == "detection":
        objs = parse_objects(sample.solution)
        if objs is None:
            raise ConfigError(f"sample {sample.id!r}: solution {str(sample.solution)[:80]!r} is not a JSON list "
                              "of {bbox_2d, label} objects or 'None'")
        if not objs:
            return "None"
        parts = []
        for o in objs:
            if o.box is None:
                continue
            box = _fmt_box(box_from_original(family, o.box, orig, resized), box_decimals)
            parts.append('{"bbox_2d": ' + box + ', "label": ' + json.dumps(o.label) + "}")
        return "[" + ", ".join(parts) + "]"
    if isinstance(sample.solution, str):
        return answer_text(sample.solution) or ""
    return str(sample.solution)


def target_text(sample: Sample, answer: str, template: str = "auto", think: str = "") -> str:
    """Wrap ``answer``: ``auto`` = the R1 layout when the question mentions ``<answer>``, else bare."""
    if template == "auto":
        template = R1_TEMPLATE if "<answer>" in sample.question else "{answer}"
    return template.replace("{think}", think).replace("{answer}", answer)


class SFTCollator:
    """Turns dataset indices into a training batch: prompts as for a rollout, then the target.

    Prompt inputs come from ``family.process`` (left-padded, with pixel values and the
    per-token multimodal keys); target ids (+ EOS) are right-padded after them by
    :func:`core.grpo.logprobs.build_train_inputs`, the same layout as the GRPO training
    forward, so SFT and GRPO see identical prompt tokens and positions. ``labels`` are -100
    everywhere except on target tokens.
    """

    def __init__(self, bundle: ModelBundle, samples: Sequence[Sample], *, template: str = "auto", think: str = "",
                 box_format: str = "auto", box_decimals: int = 0, registry: Registry | None = None) -> None:
        self.bundle, self.samples, self.registry = bundle, samples, registry
        self.template, self.think = template, think
        self.box_format, self.box_decimals = box_format, box_decimals
        tok = getattr(bundle.processor, "tokenizer", bundle.processor)
        self.tok = tok
        if tok.eos_token_id is None:
            raise ConfigError("the processor's tokenizer has no EOS token; SFT targets must end with one")

    def target(self, sample: Sample, images: Sequence[Image.Image]) -> str:
        """The full target text of ``sample``."""
        b = self.bundle
        ans = answer_for(sample, b.family, b.processor, images, box_format=self.box_format,
                         box_decimals=self.box_decimals, registry=self.registry)
        return target_text(sample, ans, self.template, self.think)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from core.grpo.logprobs import build_train_inputs, pad_completions
        from core.runtime.generation import make_prompt

        b = self.bundle
        samples = [self.samples[int(f["index"])] for f in features]
        prompts = [make_prompt(b, s) for s in samples]
        ids = [self.tok(self.target(s, p.images), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
               for s, p in zip(samples, prompts, strict=True)]
        p_inputs = b.family.process(b.processor, [p.text for p in prompts], [p.images for p in prompts])
        comp, mask = pad_completions(ids, self.tok.pad_token_id)
        batch = build_train_inputs(dict(p_inputs), comp, mask, b.family.per_token_keys)
        labels = torch.full_like(batch["input_ids"], -100)
        t = comp.shape[1]
        labels[:, -t:] = torch.where(mask.bool(), comp, torch.full_like(comp, -100))
        batch["labels"] = labels
        return batch


@dataclass
class SFTOptions:
    """The SFT-only settings (``python -m core.sft`` flags); the rest comes from the run config's ``train.*``."""

    output_dir: str | None = None
    split: str = "train"
    template: str = "auto"
    think_text: str = ""
    box_format: str = "auto"
    box_decimals: int = 0
    logging_steps: int = 10
    save_steps: int = 0
    show_targets: int = 0


def _sft_config(config_cls: Any, out: Path, t: Any, device: Any, args: SFTOptions, cfg: Any) -> Any:
    """TRL ``SFTConfig`` from ``train.*`` and the flags (TRL's own defaults overridden where they differ)."""
    return config_cls(
        output_dir=str(out),
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        max_steps=t.max_steps,
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=False,  # weights are loaded in the training dtype (model.dtype), as GRPO does; no autocast
        fp16=False,
        use_cpu=device.type == "cpu",
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        # Intermediate checkpoints are for evaluation (core.sft has no resume): no pickled optimizer,
        # scheduler or RNG state (optimizer.pt, rng_state.pth), as vlmr1 checkpoints hold no pickle.
        save_only_model=True,
        report_to=["tensorboard"] if cfg.logging.tensorboard else [],
        disable_tqdm=not cfg.logging.progress_bar,
        remove_unused_columns=False,  # the collator needs the "index" column
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        dataloader_num_workers=0,
    )


def _cpu_time_callback() -> Any:
    """A ``TrainerCallback`` that records this process's CPU seconds spent in training.

    Logged as ``cpu_time_s`` (cumulative since training started) in every log entry and written
    to ``cpu_time.json`` in each ``checkpoint-N`` folder, so an SFT run and a GRPO run (whose
    ``metrics.jsonl`` has per-step ``cpu_time_s``) can be compared at equal compute on a shared
    machine, where wall time depends on the other load.
    """
    import time

    from transformers import TrainerCallback

    class CPUTime(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, D102
            self.start = time.process_time()

        def elapsed(self) -> float:
            return round(time.process_time() - self.start, 3)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, D102
            if logs is not None:
                logs["cpu_time_s"] = self.elapsed()

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, D102
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                (folder / "cpu_time.json").write_text(
                    json.dumps({"step": state.global_step, "cpu_time_s": self.elapsed()}) + "\n")

    return CPUTime()


def _seal_checkpoints_callback() -> Any:
    """A ``TrainerCallback`` that makes each intermediate ``checkpoint-N`` a closed, verifiable set.

    It removes ``training_args.bin`` (a pickle nothing here reads) and writes vlmr1's
    ``manifest.json`` last, so ``core.evaluate --checkpoint`` and ``core.serve`` verify the folder
    like a ``core.train`` checkpoint instead of refusing it as a save that never finished. Must
    run after every other ``on_save`` that writes into the folder (``cpu_time.json``).
    """
    from transformers import TrainerCallback

    from core.runtime.checkpoint import write_manifest

    class Seal(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, D102
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                (folder / "training_args.bin").unlink(missing_ok=True)
                write_manifest(folder)

    return Seal()


def _step_printer() -> Any:
    """A ``TrainerCallback`` printing one line per log, ``step N/M  loss ...``, when progress bars are off.

    It replaces transformers' ``PrinterCallback``, whose bare dict says how far training is only in
    epochs; a run logged to a file (``examples/grounding_cpu``) shows its progress with this line.
    """
    from transformers import TrainerCallback

    class StepPrinter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, D102
            if state.is_local_process_zero and logs:
                parts = [f"step {state.global_step}/{state.max_steps}"]
                parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()
                          if k != "total_flos"]
                print("  ".join(parts), flush=True)

    return StepPrinter()


def run(plan: Plan, registry: Registry, args: SFTOptions) -> int:
    """Train with TRL's ``SFTTrainer`` and save a transformers checkpoint; returns a process exit code.

    The output folder is this run's alone, as for ``core.train``: locked while the run lasts, and one
    holding an earlier run's checkpoints or model is refused unless ``logging.start_over``
    (``--start-over``) moves them aside first.
    """
    import os

    from core.runtime.outdir import check_output_dir, claim_output_dir, lock_output_dir, release_output_dir

    out = sft_output_dir(plan, args)
    if args.show_targets or int(os.environ.get("RANK", "0")) != 0:  # writes nothing / the main process owns it
        return _run(plan, registry, args)
    check_output_dir(out)
    lock_output_dir(out, "core.sft", option="--output-dir")
    try:
        claim_output_dir(out, resume_from=None, start_over=plan.config.logging.start_over, option="--output-dir",
                         resumable=False)
        return _run(plan, registry, args)
    finally:
        release_output_dir(out)


def sft_output_dir(plan: Plan, args: SFTOptions) -> Path:
    """``--output-dir``, else ``<logging.output_dir>-sft``."""
    return Path(args.output_dir or f"{plan.config.logging.output_dir.rstrip('/')}-sft")


def _run(plan: Plan, registry: Registry, args: SFTOptions) -> int:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from core.runtime.data_limits import screen_loaded
    from core.runtime.loader import load_policy

    cfg = plan.config
    t = cfg.train
    task = registry.create("tasks", cfg.task.name, plan.options["task"])
    try:
        train_set = task.load(args.split)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--split {args.split!r}: {exc}") from None
    if len(train_set) == 0:
        raise ConfigError(f"task {cfg.task.name}: split {args.split!r} is empty")
    bundle = load_policy(plan, registry, phase="train")
    # The rows are screened and the first rendered as core.train does.
    train_set = screen_loaded(bundle.processor, plan, task, train_set, split=args.split, family=bundle.family)
    collator = SFTCollator(bundle, train_set, template=args.template, think=args.think_text,
                           box_format=args.box_format, box_decimals=args.box_decimals, registry=registry)
    if args.show_targets:
        from core.runtime.generation import make_prompt

        for i in range(min(args.show_targets, len(train_set))):
            s = train_set[i]
            p = make_prompt(bundle, s)
            print(json.dumps({"id": s.id, "prompt": p.text, "target": collator.target(s, p.images)}))
        return 0
    out = sft_output_dir(plan, args)
    device = plan.device.cls.from_options(plan.options.get("device")).torch_device()
    with warnings.catch_warnings():
        # transformers 5 renamed gradient_checkpointing (TRL's field) and warns on every construction.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        sft_args = _sft_config(SFTConfig, out, t, device, args, cfg)
    dataset = datasets.Dataset.from_dict({"index": list(range(len(train_set)))})
    cpu_clock = _cpu_time_callback()
    trainer = SFTTrainer(model=bundle.model, args=sft_args, train_dataset=dataset, data_collator=collator,
                         processing_class=bundle.processor, callbacks=[cpu_clock])
    if sft_args.disable_tqdm:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_step_printer())  # after cpu_clock, so the line has cpu_time_s
    trainer.add_callback(_seal_checkpoints_callback())  # last: after cpu_time.json is written
    result = trainer.train()
    cpu_seconds = cpu_clock.elapsed()
    if bundle.lora:  # merged weights: core.train / core.evaluate load the folder as a full model.path
        if trainer.is_world_process_zero():
            trainer.model.merge_and_unload().save_pretrained(out, safe_serialization=True)
            bundle.processor.save_pretrained(out)
    else:  # save_model gathers sharded (ZeRO-3 / FSDP) weights and writes the processor too
        trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle nothing reads: no pickle in outputs
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        info = {"steps": trainer.state.global_step, "train_loss": result.training_loss,
                "first_logged_loss": losses[0] if losses else math.nan,
                "last_logged_loss": losses[-1] if losses else math.nan,
                "cpu_time_s": cpu_seconds, "log_history": trainer.state.log_history, "template": args.template,
                "box_format": args.box_format, "config": cfg.model_dump(mode="json")}
        (out / "sft_state.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        loss = (f"loss {info['first_logged_loss']:.4f} -> {info['last_logged_loss']:.4f}" if losses
                else f"mean loss {result.training_loss:.4f} (fewer steps than --logging-steps)")
        print(f"SFT done: {info['steps']} steps, {loss}; checkpoint in {out}")
    return 0

