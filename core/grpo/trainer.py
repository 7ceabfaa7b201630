"""The GRPO training loop.

One step: sample ``P`` prompts (the same on every rank) -> each rank takes its contiguous slice
of the ``P * G`` (prompt, copy) slots -> rollout (each prompt's images loaded and encoded
once per group) -> rewards (weighted sum) -> rewards gathered from all ranks so group
statistics are exact whichever rank holds a completion -> advantages -> ``mu`` optimiser
updates over the same rollout, each accumulating over micro-batches -> metrics,
completions, checkpoint.

Everything distributed goes through accelerate, so the same loop runs as one CPU process
or under ``accelerate launch`` on many GPUs or nodes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.config import ConfigError, RunConfig, to_yaml
from core.grpo.data import BadSampleSkipper, GroupSampler, local_slots
from core.grpo.loss import group_advantages
from core.grpo.update import policy_update
from core.interfaces import (
    Completion,
    ModelFamily,
    PromptInput,
    RewardBatch,
    RewardContext,
    RewardItem,
    RolloutContext,
    RolloutEngine,
    Sample,
    SamplingParams,
)
from core.plugins.plan import Plan, families_for_model_type, registry_family_for
from core.plugins.registry import Registry
from core.runtime.checkpoint import load_trainer_state, resolve_resume, save_checkpoint, set_rng_state
from core.runtime.reward_runner import RewardRunner, RewardSpec
from core.runtime.runlog import MetricsWriter, plot_rewards


# ---- model set-up ----------------------------------------------------------------------
@dataclass
class ModelBundle:
    """The policy, its processor and family, and how to get reference log-probs."""

    family: ModelFamily
    model: Any
    processor: Any
    ref_model: Any = None
    lora: bool = False
    suppressed: list[int] = field(default_factory=list)


def resolve_family(plan: Plan, registry: Registry, path: str) -> ModelFamily:
    """The configured family, or the one whose ``model_types`` has the checkpoint's type."""
    cfg = plan.config
    entry = plan.model_family
    if entry is None:
        if Path(path, "config.json").is_file():
            entry = registry_family_for(registry, path)
        else:  # a hub id: ask transformers for the model_type (cached/offline as configured)
            from transformers import AutoConfig

            mt = AutoConfig.from_pretrained(path).model_type
            hits = families_for_model_type(registry, mt)
            if not hits:
                raise ConfigError(f"model.path: no installed model family handles model_type {mt!r}")
            entry = hits[0]
    return entry.cls.from_options(cfg.model.options)


def torch_dtype(name: str, device: Any, device_type: str) -> torch.dtype:
    """``auto`` = bfloat16 on accelerators that support it, float32 on CPU."""
    if name == "auto":
        name = "bfloat16" if device_type != "cpu" and "bfloat16" in device.supported_dtypes() else "float32"
    return getattr(torch, name)


def apply_training_mode(model: Any, family: ModelFamily, cfg: RunConfig) -> Any:
    """Freeze the vision tower, or wrap in LoRA adapters that stay off the vision tower."""
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
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            model.enable_input_require_grads()
    return model


def load_models(plan: Plan, registry: Registry, accelerator: Any, device: Any, resume_from: Path | None) -> ModelBundle:
    """Build (if tiny), load and prepare the policy and, if ``beta > 0``, the reference."""
    cfg = plan.config
    path = cfg.model.resolved_path()
    if cfg.model.tiny is not None and not Path(path, "config.json").is_file():
        fam_cls = plan.model_family.cls  # validated in make_plan: tiny needs a family
        with accelerator.main_process_first():
            if not Path(path, "config.json").is_file():
                fam_cls.build_tiny_checkpoint(path, **cfg.model.tiny)
    family = resolve_family(plan, registry, path)
    dtype = torch_dtype(cfg.model.dtype, device, accelerator.device.type)
    lora = cfg.train.mode == "lora"
    policy_path = resume_from if (resume_from is not None and not lora) else path
    model = family.load_model(policy_path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    processor = family.load_processor(path)
    if lora and resume_from is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    else:
        model = apply_training_mode(model, family, cfg)
    ref = None
    if cfg.grpo.beta > 0 and not lora:  # under LoRA the reference is the adapter-disabled policy
        ref = family.load_model(path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
        ref.requires_grad_(False)
        ref.eval()
        ref.to(accelerator.device)
    return ModelBundle(family, model, processor, ref, lora, family.suppressed_token_ids(processor, model))


# ---- one step --------------------------------------------------------------------------
@dataclass
class Rollout:
    """One rank's completions for a step, with everything the update needs."""

    samples: list[Sample]
    prompts: list[PromptInput]
    completions: list[Completion]
    items: list[RewardItem]


def make_prompt(bundle: ModelBundle, sample: Sample) -> PromptInput:
    """Render a sample's messages and load its images (once per group)."""
    images = sample.load_images()
    return PromptInput(sample.messages, bundle.family.render_prompt(bundle.processor, sample.messages), images)


def reward_item(bundle: ModelBundle, sample: Sample, prompt: PromptInput, comp: Completion) -> RewardItem:
    """A completion with the sample's solution, sizes and the family's box transform."""
    fam, proc = bundle.family, bundle.processor
    orig = [im.size for im in prompt.images]
    resized = [fam.resized_image_size(proc, im) for im in prompt.images]

    def to_original(box: Sequence[float], i: int = 0) -> list[float]:
        return fam.box_to_original(box, orig[i], resized[i])

    return RewardItem(completion=comp.text, solution=sample.solution, prompt=sample.question,
                      reward_method=sample.reward_method, image_sizes=orig, box_to_original=to_original,
                      box_convention=fam.box_convention, meta=sample.meta, completion_length=len(comp.ids),
                      truncated=comp.truncated)


def generate_groups(bundle: ModelBundle, engine: RolloutEngine, samples: list[Sample], counts: list[int],
                    sampling: SamplingParams, seeds: list[int] | None = None,
                    offsets: list[int] | None = None) -> Rollout:
    """Generate ``counts[i]`` completions for ``samples[i]``; each prompt is processed once.

    With ``seeds`` and ``offsets`` (the first copy of the group this rank holds), a partial group
    at a rank boundary is generated whole (``sampling.n`` rows from the group's seed) and cut to
    copies ``offsets[i] : offsets[i] + counts[i]``: the two ranks sharing a group then hold
    different copies, and exactly the ones a single process would have sampled.
    """
    prompts = [make_prompt(bundle, s) for s in samples]
    for p, seed in zip(prompts, seeds or [None] * len(prompts), strict=True):
        p.seed = seed
    whole = seeds is not None and offsets is not None
    gen_n = [sampling.n if whole and c < sampling.n else c for c in counts]
    out: list[list[Completion]] = [[] for _ in samples]
    for n in sorted(set(gen_n)):  # partial groups at rank boundaries get their own call
        idx = [i for i, c in enumerate(gen_n) if c == n]
        sp = SamplingParams(**{**sampling.__dict__, "n": n})
        for i, comps in zip(idx, engine.generate([prompts[i] for i in idx], sp), strict=True):
            first = offsets[i] if whole and n != counts[i] else 0  # type: ignore[index]
            out[i] = comps[first:first + counts[i]]
    flat_s, flat_p, flat_c, items = [], [], [], []
    for s, p, comps in zip(samples, prompts, out, strict=True):
        for c in comps:
            flat_s.append(s)
            flat_p.append(p)
            flat_c.append(c)
            items.append(reward_item(bundle, s, p, c))
    return Rollout(flat_s, flat_p, flat_c, items)


def runs_of(slots: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """Collapse consecutive slots of one group into ``(group ids, counts, first copy index)``."""
    ids: list[int] = []
    counts: list[int] = []
    firsts: list[int] = []
    for p, j in slots:
        if ids and ids[-1] == p:
            counts[-1] += 1
        else:
            ids.append(p)
            counts.append(1)
            firsts.append(j)
    return ids, counts, firsts


def completion_record(step: int, sample: Sample, item: RewardItem, reward: float, advantage: float,
                      rewards: dict[str, float | None]) -> dict[str, Any]:
    """One ``completions.jsonl`` line: what the model saw (its images) and which reward method scored it."""
    images = [str(x) if isinstance(x, (str, os.PathLike)) else None for x in sample.images]
    return {"step": step, "id": sample.id, "prompt": item.prompt, "images": images, "num_images": len(images),
            "reward_method": item.reward_method, "completion": item.completion, "solution": item.solution,
            "reward": reward, "advantage": advantage, "rewards": rewards}


# ---- evaluation ------------------------------------------------------------------------
def evaluate_greedy(bundle: ModelBundle, engine: RolloutEngine, samples: Sequence[Sample], runner: RewardRunner,
                    max_new_tokens: int, threshold: float, batch_size: int, accelerator: Any) -> dict[str, float]:
    """Greedy accuracy (score of the eval reward >= threshold) and mean reward, sharded over ranks.

    ``reward_errors`` / ``reward_timeouts`` count samples whose reward failed (scored 0), so an
    outage of the reward is not mistaken for a model that answers wrong.
    """
    from accelerate.utils import gather_object

    mine = list(samples)[accelerator.process_index::accelerator.num_processes]
    scores: list[float] = []
    fails: list[int] = []  # per sample: 0 ok, 1 error, 2 timeout
    sampling = SamplingParams(n=1, max_new_tokens=max_new_tokens, do_sample=False)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        ro = generate_groups(bundle, engine, chunk, [1] * len(chunk), sampling)
        res = runner(RewardBatch(ro.items))
        scores.extend(float(x) if math.isfinite(float(x)) else 0.0 for x in res.total.tolist())
        fails.extend(2 if t else int(f) for f, t in zip(res.failed.any(dim=1).tolist(),
                                                         res.timed_out.any(dim=1).tolist(), strict=True))
    allscores = gather_object(scores) if accelerator.num_processes > 1 else scores
    allfails = gather_object(fails) if accelerator.num_processes > 1 else fails
    n = max(len(allscores), 1)
    return {"accuracy": sum(s >= threshold for s in allscores) / n, "mean_reward": sum(allscores) / n,
            "num_samples": len(allscores), "reward_errors": sum(f > 0 for f in allfails),
            "reward_timeouts": sum(f == 2 for f in allfails)}


def eval_line(label: str, res: dict[str, Any], reward_name: str) -> str:
    """The printed eval line; reward failures are always shown (0 when none)."""
    n = res["num_samples"]
    line = (f"eval {label}: accuracy {res['accuracy']:.3f} (mean {reward_name} {res['mean_reward']:.3f}, n={n}; "
            f"reward errors {res.get('reward_errors', 0)}/{n}, timeouts {res.get('reward_timeouts', 0)})")
    if res.get("reward_errors"):
        line += " -- WARNING: failed samples count as wrong; the accuracy is a lower bound"
    return line


# ---- the loop --------------------------------------------------------------------------
def run(plan: Plan, registry: Registry) -> int:
    """Train according to ``plan``; returns a process exit code."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    cfg = plan.config
    device_obj = plan.device.cls.from_options(plan.options.get("device"))
    accelerator = Accelerator(cpu=device_obj.torch_device().type == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    out_dir = Path(cfg.logging.output_dir)
    G = cfg.grpo.num_generations
    batch = cfg.batch_plan(world)
    per_rank = cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps
    mb_size = cfg.train.per_device_batch_size
    device_obj.seed(cfg.train.seed)

    # Data first: a bad row (core.interfaces.DataError, naming file and line) stops the run
    # before any weights are loaded.
    task = registry.create("tasks", cfg.task.name, plan.options["task"])
    train_set = task.load("train")
    if len(train_set) == 0:
        raise ConfigError(f"task {cfg.task.name!r}: the training split is empty (every row skipped or no rows)")
    eval_set: Sequence[Sample] = []
    if cfg.eval.enabled:
        if "eval" in task.splits():
            eval_set = task.load("eval")
        else:
            accelerator.print(f"note: task {cfg.task.name!r} has no eval split; skipping evaluation")
    with accelerator.main_process_first():  # the main process repairs an interrupted save first
        resume_from = resolve_resume(cfg, out_dir, world, log=accelerator.print)
    bundle = load_models(plan, registry, accelerator, device_obj, resume_from)
    trainable = [p for p in bundle.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    total_updates = cfg.train.max_steps * cfg.grpo.num_iterations
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=total_updates)
    # The scheduler is stepped by hand once per update: accelerate's wrapper would step it once
    # per process, which is right only for data-parallel dataloaders it shards itself.
    _configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(bundle.model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    bundle.model = model

    rctx = RewardContext(registry=registry, config=cfg)
    specs = []
    for rc, opts in zip(cfg.rewards, [plan.options[f"rewards.{i}"] for i in range(len(cfg.rewards))], strict=True):
        r = registry.create("rewards", rc.name, opts)
        r.setup(rctx)
        specs.append(RewardSpec(rc.name, r, rc.weight, rc.timeout_s, rc.on_error, rc.max_error_frac,
                                rc.max_error_steps))
    runner = RewardRunner(specs)
    eval_name = cfg.eval.reward or cfg.rewards[0].name
    eval_spec = next((s for s in specs if s.name == eval_name), None)
    if eval_spec is None:
        raise ConfigError(f"eval.reward: {eval_name!r} is not one of the configured rewards")
    eval_runner = RewardRunner([RewardSpec(eval_spec.name, eval_spec.reward, 1.0, eval_spec.timeout_s, "zero")])

    engine = registry.create("rollouts", cfg.rollout.name, plan.options["rollout"])
    engine.setup(RolloutContext(unwrapped, bundle.processor, bundle.family, accelerator.device, bundle.suppressed))
    sampling = SamplingParams(n=G, max_new_tokens=cfg.grpo.max_completion_length, temperature=cfg.grpo.temperature,
                              top_p=cfg.grpo.top_p, top_k=cfg.grpo.top_k,
                              repetition_penalty=cfg.grpo.repetition_penalty)
    sampler = GroupSampler(len(train_set), batch["prompts_per_step"], cfg.train.seed, cfg.train.shuffle)
    skip_bad = task.skips_bad_samples()
    skipper = BadSampleSkipper(train_set, sampler, skip_bad, accelerator.print)
    if skip_bad and eval_set:  # the first eval.num_samples samples whose images decode
        check = BadSampleSkipper(eval_set, None, True, accelerator.print)
        usable: list[Sample] = []
        for i in range(len(eval_set)):
            if len(usable) == cfg.eval.num_samples:
                break
            if check.usable(i):
                usable.append(eval_set[i])
        eval_set = usable
    writer = MetricsWriter(out_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                           is_main=accelerator.is_main_process, run_config=cfg.model_dump(mode="json"))

    start_step = 0
    eval_result: dict[str, Any] = {}
    if resume_from is not None:
        blob, meta = load_trainer_state(resume_from, verify=False)  # verified above
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        start_step = int(meta["step"])
        eval_result = meta.get("eval", {})
        writer.truncate_after(start_step)
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    elif (out_dir / "metrics.jsonl").exists():
        # A fresh run into a used folder: its logs must not continue the earlier run's.
        writer.truncate_after(0)
        accelerator.print(f"note: fresh run (no resume) in {out_dir}: earlier metrics.jsonl/completions.jsonl replaced")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    eval_n = min(cfg.eval.num_samples, len(eval_set))
    eval_tokens = cfg.eval.max_new_tokens or cfg.grpo.max_completion_length

    def do_eval() -> dict[str, float]:
        res = evaluate_greedy(bundle, engine, list(eval_set)[:eval_n], eval_runner, eval_tokens,
                              cfg.eval.threshold, cfg.eval.batch_size, accelerator)
        return res

    if eval_n and "before" not in eval_result:
        eval_result["before"] = do_eval()
        accelerator.print(eval_line("before training", eval_result["before"], eval_name))

    def save(step: int) -> None:
        def save_model(folder: Path) -> None:
            state = accelerator.get_state_dict(model)
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state, safe_serialization=True)
                bundle.processor.save_pretrained(folder)

        save_checkpoint(out_dir, step, save_model=save_model, optimizer=optimizer, scheduler=scheduler,
                        state={"data_position": step * batch["prompts_per_step"], "eval": eval_result,
                               "config": cfg.model_dump(mode="json"), "num_processes": world},
                        keep_last=cfg.checkpoint.keep_last, is_main=accelerator.is_main_process)
        accelerator.wait_for_everyone()

    bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not (accelerator.is_main_process
                                                                          and cfg.logging.progress_bar),
               desc="GRPO", dynamic_ncols=True)
    for step in range(start_step, cfg.train.max_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        # Seeded per (step, rank): sampling is reproducible across resume and differs per rank.
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + rank)
        ro, res, all_total, all_per, dyn = _rollout_step(cfg, accelerator, bundle, engine, runner, sampler,
                                                        train_set, sampling, step, per_rank, skipper)
        adv_all, group_std = group_advantages(all_total, G, cfg.grpo.scale_rewards, cfg.grpo.advantage_eps,
                                             cfg.grpo.advantage_baseline)
        adv = adv_all[rank * per_rank:(rank + 1) * per_rank]
        keep = None
        if cfg.grpo.zero_variance_groups != "keep":
            keep = (group_std >= 1e-6).repeat_interleave(G)[rank * per_rank:(rank + 1) * per_rank]
            dyn["dynamic/dropped_groups"] = float((group_std < 1e-6).sum())

        metrics, losses = policy_update(cfg, accelerator, model, bundle, optimizer, scheduler, trainable, ro, adv,
                                        mb_size, keep)
        # Engines that hold their own copy of the weights (vLLM, inference servers) refresh it here.
        engine.sync_weights(accelerator.unwrap_model(model))
        metrics.update(dyn)
        engine_metrics = getattr(engine, "metrics", None)
        if callable(engine_metrics):
            metrics.update(engine_metrics())
        step_time = time.perf_counter() - t0
        lengths = accelerator.gather(torch.tensor([float(len(c.ids)) for c in ro.completions],
                                                  device=accelerator.device)).cpu()
        truncs = accelerator.gather(torch.tensor([float(c.truncated) for c in ro.completions],
                                                 device=accelerator.device)).cpu()
        m: dict[str, Any] = {
            "reward": float(all_total.nanmean()),
            "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float((group_std < 1e-6).float().mean()),
            **{f"rewards/{s.name}": _nanmean(all_per[:, j]) for j, s in enumerate(specs)},
            **{k: v for k, v in res.metrics.items() if k.endswith(("_errors", "_timeouts"))},
            **metrics,
            "loss": float(sum(losses) / max(len(losses), 1)),
            "lr": float(scheduler.get_last_lr()[0]),
            "completion_length": float(lengths.mean()),
            "truncated_frac": float(truncs.mean()),
            "step_time_s": step_time,
            # CPU seconds of this process (all threads): equal-compute comparisons on a shared machine.
            "cpu_time_s": time.process_time() - c0,
            **device_obj.memory_stats(),
        }
        writer.log(step + 1, m)
        every = cfg.logging.log_completions_every
        if every and ((step + 1) % every == 0 or step == 0):
            recs = [completion_record(step + 1, ro.samples[i], it, float(res.total[i]), float(adv[i]),
                                      {s.name: _f(res.per_reward[i, j]) for j, s in enumerate(specs)})
                    for i, it in enumerate(ro.items)]
            recs = gather_object(recs) if world > 1 else recs
            writer.log_completions(recs)
        bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m.get('kl', 0.0):.4f}")
        bar.update(1)
        done = step + 1
        if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0 and done < cfg.train.max_steps:
            save(done)
    bar.close()

    if eval_n:
        eval_result["after"] = do_eval()
        accelerator.print(eval_line("after training", eval_result["after"], eval_name))
    if cfg.checkpoint.save_final:
        save(cfg.train.max_steps)
    if accelerator.is_main_process:
        if eval_result:
            (out_dir / "eval.json").write_text(json.dumps(eval_result, indent=2))
        if cfg.logging.plot:
            plot_rewards(out_dir)
        task_stats = task.stats()
        if task_stats:
            accelerator.print(f"data: {task_stats}")
        accelerator.print(f"outputs in {out_dir}")
    writer.close()
    runner.close()
    eval_runner.close()
    for obj in [engine, *(s.reward for s in specs)]:
        closer = getattr(obj, "close", None)
        if callable(closer):
            closer()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _rollout_step(cfg: RunConfig, accelerator: Any, bundle: ModelBundle, engine: RolloutEngine,
                  runner: RewardRunner, sampler: GroupSampler, train_set: Sequence[Sample], sampling: SamplingParams,
                  step: int, per_rank: int, skipper: BadSampleSkipper | None = None,
                  ) -> tuple[Rollout, Any, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Generate and score this rank's slots; with dynamic sampling, regenerate zero-variance groups.

    The slot layout never changes between rounds, only which prompt a group holds, so every
    rank keeps its share and all ranks take the same decisions from the gathered rewards.
    """
    G = cfg.grpo.num_generations
    rank = accelerator.process_index
    prompt_ids = sampler.prompts(step)
    swaps = skipper.fix(prompt_ids, step) if skipper is not None else 0
    slots = local_slots(len(prompt_ids), G, rank, per_rank)
    ro: Rollout | None = None
    res = None
    pending = set(range(len(prompt_ids)))
    rounds = cfg.grpo.resample_budget if cfg.grpo.zero_variance_groups == "resample" else 0
    dyn: dict[str, float] = {}
    resampled = 0
    for rnd in range(rounds + 1):
        idx = [i for i, (k, _) in enumerate(slots) if k in pending]
        if idx:
            groups, counts, firsts = runs_of([slots[i] for i in idx])
            seeds = [((cfg.train.seed * 1_000_003 + step) * 101 + rnd) * 10_007 + k for k in groups]
            part = generate_groups(bundle, engine, [train_set[prompt_ids[k]] for k in groups], counts, sampling,
                                   seeds, firsts)
            part_res = runner(RewardBatch(part.items))
            if ro is None:
                ro, res = part, part_res
            else:  # splice the regenerated slots in place
                for j, i in enumerate(idx):
                    ro.samples[i], ro.prompts[i] = part.samples[j], part.prompts[j]
                    ro.completions[i], ro.items[i] = part.completions[j], part.items[j]
                    res.per_reward[i] = part_res.per_reward[j]
                    res.total[i] = part_res.total[j]
                for key, val in part_res.metrics.items():
                    if key.endswith(("_errors", "_timeouts")):
                        res.metrics[key] = res.metrics.get(key, 0.0) + val
        # Group statistics need every completion of a group: gather all ranks' rewards.
        all_total = accelerator.gather(res.total.to(accelerator.device)).cpu()
        all_per = accelerator.gather(res.per_reward.to(accelerator.device)).cpu()
        std = all_total.view(-1, G).std(dim=1)
        zero = [k for k in range(len(prompt_ids)) if float(std[k]) < 1e-6]
        if rnd == 0 and cfg.grpo.zero_variance_groups != "keep":
            dyn["dynamic/zero_std_groups_sampled"] = float(len(zero))
        if rnd == rounds or not zero:
            break
        for k in zero:
            prompt_ids[k] = sampler.extra(step, rnd, k)
        if skipper is not None:
            swaps += skipper.fix(prompt_ids, step, zero)
        pending = set(zero)
        resampled += len(zero)
    if cfg.grpo.zero_variance_groups == "resample":
        dyn["dynamic/resampled_groups"] = float(resampled)
    if skipper is not None and skipper.enabled:
        dyn["data/skipped_samples"] = float(swaps)
    assert ro is not None and res is not None
    return ro, res, all_total, all_per, dyn


def _configure_deepspeed(accelerator: Any, cfg: RunConfig) -> None:
    """Fill the DeepSpeed config's batch fields from the run config (untested: no GPU here).

    There is no dataloader for accelerate to read ``train_micro_batch_size_per_gpu`` from.
    Every ``accelerator.backward`` steps the DeepSpeed engine, so each optimizer update must be
    one micro-batch: ``train.gradient_accumulation_steps`` > 1 is refused rather than mis-stepped.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if cfg.train.gradient_accumulation_steps != 1:
        raise ConfigError("train.gradient_accumulation_steps must be 1 under DeepSpeed (each backward steps the "
                          "DeepSpeed engine); raise train.per_device_batch_size or the number of processes instead")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.train.per_device_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.train.per_device_batch_size * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.train.max_grad_norm or 0.0


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")


def _f(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v
