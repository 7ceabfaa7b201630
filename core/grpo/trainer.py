"""The GRPO training loop: ``python -m core.train [--config FILE]`` runs :func:`run`.

:meth:`GRPOTrainer.fit` reads as a table of contents: one :class:`~core.grpo.batch.StepBatch` per
optimizer step flows through named, timed phases (``timing/<phase>_s`` in ``metrics.jsonl``):

1. ``rollout``    P prompts (the same on every rank); each rank takes its contiguous slice of
                  the ``P * G`` (prompt, copy) slots; each prompt's images are loaded and
                  encoded once per group;
2. ``rewards``    weighted sum under time limits (:mod:`core.runtime.reward_runner`), gathered
                  from all ranks so group statistics are exact whichever rank holds a row
                  (with dynamic sampling, 1-2 repeat for zero-variance groups);
3. ``advantages`` group (or batch) baseline and scale (:func:`core.grpo.loss.group_advantages`);
4. ``update``     ``mu`` optimiser updates over the same rollout (:mod:`core.grpo.update`);
5. ``sync``       engines holding their own weights (vLLM, servers) refresh them;
6. ``log``        ``metrics.jsonl``, TensorBoard, ``completions.jsonl``;
7. ``save``       a crash-safe checkpoint every ``checkpoint.save_every`` steps;

and ``eval`` (:mod:`core.runtime.evaluator`, the same evaluator as ``core.evaluate``) before and
after training. Everything distributed goes through accelerate, so the same loop runs as one
CPU process or under ``accelerate launch`` on many GPUs or nodes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.config import ConfigError, to_yaml
from core.grpo.base_kl import KLToBase
from core.grpo.batch import StepBatch
from core.grpo.data import BadSampleSkipper, GroupSampler, local_slots
from core.grpo.loss import group_advantages
from core.grpo.update import Policy, policy_update
from core.interfaces import RewardBatch, RolloutContext, Sample, SamplingParams
from core.plugins.plan import Plan
from core.plugins.registry import Registry
from core.runtime.checkpoint import (
    CheckpointError,
    load_trainer_state,
    resolve_resume,
    same_model_files,
    save_checkpoint,
    saved_model_path,
    set_rng_state,
)
from core.runtime.data_limits import screen_splits
from core.runtime.distributed import (
    Fsdp2OptimizerState,
    MemoryAccounting,
    ZeroOptimizerState,
    backend_of,
    build_accelerator,
    check_backend,
    check_sharded_generation,
    fill_deepspeed_config,
    full_state_dict,
    whole_weights_for_generation,
    write_backend,
)
from core.runtime.evaluator import eval_line, evaluate, training_result
from core.runtime.generation import completion_record, generate_groups, runs_of
from core.runtime.loader import ModelBundle, load_policy, resolve_dtype
from core.runtime.outdir import claim_output_dir, lock_output_dir, release_output_dir
from core.runtime.reward_runner import build_reward_runner
from core.runtime.runlog import MetricsWriter, plot_rewards


def run(plan: Plan, registry: Registry) -> int:
    """Train according to ``plan``; returns a process exit code."""
    try:
        return GRPOTrainer(plan, registry).fit()
    finally:  # also when set-up failed after taking the output folder's lock
        release_output_dir(plan.config.logging.output_dir)


class GRPOTrainer:
    """Set-up in ``__init__`` (data first, then models, optimizer, rewards, engine); :meth:`fit` trains."""

    def __init__(self, plan: Plan, registry: Registry) -> None:
        from transformers import get_scheduler

        self.plan, self.registry = plan, registry
        cfg = self.cfg = plan.config
        self.device = plan.device.cls.from_options(plan.options.get("device"))
        # The backend `accelerate launch` asked for (DeepSpeed, FSDP2, DDP), or a ConfigError: never
        # a quiet fallback to DDP. The model's dtype decides DeepSpeed's precision.
        self.dtype = dtype = resolve_dtype(cfg.model.dtype, self.device, self.device.torch_device().type)
        self.accelerator = acc = build_accelerator(self.device, dtype=dtype, timeout_s=cfg.train.distributed_timeout_s)
        self.backend = backend_of(acc)
        check_backend(self.backend)
        acc.print(f"backend: {self.backend.describe()}")
        self.rank, self.world = acc.process_index, acc.num_processes
        self.out_dir = Path(cfg.logging.output_dir)
        self.G = cfg.grpo.num_generations
        self.prompts_per_step = cfg.batch_plan(self.world)["prompts_per_step"]
        self.per_rank = cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps
        self.device.seed(cfg.train.seed)

        # Data first: a bad row (DataError, naming file and line) stops the run before weights load.
        self.task = registry.create("tasks", cfg.task.name, plan.options["task"])
        self.train_set = self.task.load("train")
        if len(self.train_set) == 0:
            raise ConfigError(f"task {cfg.task.name!r}: the training split is empty (every row skipped or no rows)")
        self.eval_set: Sequence[Sample] = []
        if cfg.eval.enabled:
            if "eval" in self.task.splits():
                self.eval_set = self.task.load("eval")
            else:
                acc.print(f"note: task {cfg.task.name!r} has no eval split; skipping evaluation")
        with acc.main_process_first():  # the main process locks the folder and repairs an interrupted save first
            if acc.is_main_process:  # one run per output folder (released in finish, or by run on failure)
                lock_output_dir(self.out_dir, "core.train")
            self.resume_from = resolve_resume(cfg, self.out_dir, self.world, log=acc.print, dtype=dtype)
            # A fresh run refuses a folder holding another run's checkpoints (or moves them aside with
            # --start-over); the run id marks this run's checkpoints, the only ones its pruning deletes.
            self.run_id = "" if not acc.is_main_process else claim_output_dir(
                self.out_dir, resume_from=self.resume_from, start_over=cfg.logging.start_over, log=acc.print)
        # Prompt text vs the tokenizer (special tokens, data.max_prompt_tokens): loads no weights.
        self.train_set, self.eval_set, _ = screen_splits(plan, registry, self.task, self.train_set, self.eval_set,
                                                         accelerator=acc, log=acc.print)
        self.gather = cfg.train.gather_for_generation
        self._check_sharded_generation(min(len(self.eval_set), cfg.eval.num_samples))  # before weights load

        self.bundle = self.load_models()
        trainable = [p for p in self.bundle.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
        # Stepped by hand once per update: accelerate's wrapper would step it once per process,
        # which is right only for data-parallel dataloaders it shards itself.
        scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                                  num_training_steps=cfg.train.max_steps * cfg.grpo.num_iterations)
        _configure_deepspeed(acc, cfg, self.bundle.model)
        adamw = optimizer
        model, optimizer = acc.prepare(self.bundle.model, optimizer)
        self.bundle.model = model
        # Per-process bytes of weights, gradients and optimizer state, counted at the first update.
        self.memory: MemoryAccounting | None = MemoryAccounting(acc.unwrap_model(model), adamw)
        # prepare may replace parameters (FSDP2 shards them into new DTensor parameters): clip those.
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.policy = Policy(cfg, acc, model, self.bundle, optimizer, scheduler, trainable,
                             cfg.train.per_device_batch_size)
        # ZeRO and FSDP2 shard the optimizer state over the processes: each saves and restores its own shard.
        self.optimizer_per_rank = self.backend.name in ("deepspeed", "fsdp")
        self.optimizer_state: Any = ZeroOptimizerState(optimizer, self.rank, self.world) \
            if self.backend.name == "deepspeed" else Fsdp2OptimizerState(optimizer) \
            if self.backend.name == "fsdp" else optimizer

        self.rewards = build_reward_runner(plan, registry)
        self.engine = registry.create("rollouts", cfg.rollout.name, plan.options["rollout"])
        self.engine.setup(RolloutContext(acc.unwrap_model(model), self.bundle.processor, self.bundle.family,
                                         acc.device, self.bundle.suppressed))
        # TRL corrects vLLM's rollouts only: an engine sampling from the policy itself has no mismatch to fix.
        is_corr = cfg.grpo.rollout_is_correction
        if is_corr is None:
            is_corr = not self.engine.samples_from_policy and not self.engine.guided()
            if not self.engine.samples_from_policy and self.engine.guided():
                acc.print("note: grpo.rollout_is_correction off: the rollout engine samples guided choices "
                          "(set it to true to correct anyway)")
        self.policy.rollout_correction = is_corr
        self.sampling = SamplingParams(n=self.G, max_new_tokens=cfg.grpo.max_completion_length,
                                       temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p, top_k=cfg.grpo.top_k,
                                       repetition_penalty=cfg.grpo.repetition_penalty)
        self.sampler = GroupSampler(len(self.train_set), self.prompts_per_step, cfg.train.seed, cfg.train.shuffle)
        self.skipper = BadSampleSkipper(self.train_set, self.sampler, self.task.skips_bad_samples(), acc.print)
        self.eval_set = self._usable_eval_samples()
        self._check_sharded_generation(len(self.eval_set))  # fewer if the task skipped undecodable images
        self.writer = self.make_writer()
        self.eval_result: dict[str, Any] = {}

    # ---- set-up pieces (subclasses such as the benchmark override these) ---------------------
    def load_models(self) -> ModelBundle:
        """The policy (from the checkpoint when resuming) and, with ``beta > 0``, the reference.

        A resumed run's reference (and a LoRA checkpoint's base) is the model the saving run was
        configured with, even when ``model.path`` changed under ``--resume-force``.
        """
        return load_policy(self.plan, self.registry, phase="train", checkpoint=self.resume_from,
                           reference=self.cfg.grpo.beta > 0, accelerator=self.accelerator,
                           base_path=self._saved_base())

    def _saved_base(self) -> str | None:
        """The saving run's ``model.path`` when it differs from this run's (only under ``--resume-force``)."""
        if self.resume_from is None:
            return None
        saved, current = saved_model_path(self.resume_from), self.cfg.model.resolved_path()
        if saved is None or saved == current or same_model_files(saved, current):
            return None
        if saved.startswith(("/", ".", "~")) and not Path(saved).expanduser().exists():
            self.accelerator.print(f"warning: --resume-force: {self.resume_from.name} was trained from {saved}, which "
                                   f"is gone; the reference model (and a LoRA base) is model.path={current}")
            return None
        self.accelerator.print(f"note: the reference model (and a LoRA base) is {saved}, the model "
                               f"{self.resume_from.name} was trained from, not model.path={current}")
        return saved

    def make_writer(self) -> MetricsWriter:
        """The run log (``metrics.jsonl``, TensorBoard, ``completions.jsonl``)."""
        cfg = self.cfg
        return MetricsWriter(self.out_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                             is_main=self.accelerator.is_main_process, run_config=cfg.model_dump(mode="json"))

    def _check_sharded_generation(self, eval_samples: int) -> None:
        g = self.cfg.grpo
        check_sharded_generation(self.backend, gather=self.gather, per_rank=self.per_rank, group_size=self.G,
                                 resample=g.zero_variance_groups == "resample", eval_samples=eval_samples)

    def _usable_eval_samples(self) -> Sequence[Sample]:
        """The first ``eval.num_samples`` eval samples (those whose images decode, if the task skips bad ones)."""
        n = self.cfg.eval.num_samples
        if not (self.task.skips_bad_samples() and self.eval_set):
            return list(self.eval_set)[:n]
        check = BadSampleSkipper(self.eval_set, None, True, self.accelerator.print)
        usable: list[Sample] = []
        for i in range(len(self.eval_set)):
            if len(usable) == n:
                break
            if check.usable(i):
                usable.append(self.eval_set[i])
        return usable

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train ``train.max_steps`` steps (from the resumed step), evaluate, save; returns the exit code."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        start = self.restore()
        if self.eval_set and "before" not in self.eval_result:
            self.eval_result["before"] = self.phase_eval("before training")
        bar = tqdm(total=cfg.train.max_steps, initial=start, desc="GRPO", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.logging.progress_bar))
        for step in range(start, cfg.train.max_steps):
            batch = StepBatch(step)
            t0, c0 = time.perf_counter(), time.process_time()
            # Seeded per (step, rank): sampling is reproducible across resume and differs per rank.
            torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + self.rank)
            self.phase_rollout_and_rewards(batch)
            with batch.timed("advantages"):
                self.phase_advantages(batch)
            with batch.timed("update"):
                policy_update(self.policy, batch)
            if self.memory is not None:
                self._record_memory()
            with batch.timed("sync"), whole_weights_for_generation(
                    acc, self.policy.model, gather=not self.engine.samples_from_policy):
                # Engines that hold their own copy of the weights (vLLM, inference servers) refresh it
                # from the whole weights: under ZeRO-3 / FSDP2 gathered first (every process joins).
                self.engine.sync_weights(acc.unwrap_model(self.policy.model))
            metrics = self.step_metrics(batch, time.perf_counter() - t0, time.process_time() - c0)
            done = step + 1
            if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0 and done < cfg.train.max_steps:
                with batch.timed("save"):
                    self.phase_save(done, metrics)
                metrics["timing/save_s"] = batch.timings["save"]
            self.phase_log(batch, metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', 0.0):.4f}")
            bar.update(1)
        bar.close()
        if self.eval_set:
            self.eval_result["after"] = self.phase_eval("after training")
        if cfg.checkpoint.save_final:
            self.phase_save(cfg.train.max_steps, None)
        self.finish()
        return 0

    # ---- phases --------------------------------------------------------------------------------
    def phase_rollout_and_rewards(self, batch: StepBatch) -> None:
        """Generate and score this rank's slots; with dynamic sampling, regenerate zero-variance groups.

        The slot layout never changes between rounds, only which prompt a group holds, so every
        rank keeps its share and all ranks take the same decisions from the gathered rewards.
        """
        cfg, acc, G = self.cfg, self.accelerator, self.G
        step, skipper = batch.step, self.skipper
        prompt_ids = self.sampler.prompts(step)
        swaps = skipper.fix(prompt_ids, step)
        slots = local_slots(len(prompt_ids), G, self.rank, self.per_rank)
        pending = set(range(len(prompt_ids)))
        rounds = cfg.grpo.resample_budget if cfg.grpo.zero_variance_groups == "resample" else 0
        resampled = 0
        for rnd in range(rounds + 1):
            idx = [i for i, (k, _) in enumerate(slots) if k in pending]
            part = None
            # Every rank enters (a ZeRO-3 gather is a collective), also one with nothing to regenerate.
            with batch.timed("rollout"), whole_weights_for_generation(acc, self.policy.model, gather=self.gather):
                if idx:
                    groups, counts, firsts = runs_of([slots[i] for i in idx])
                    seeds = [((cfg.train.seed * 1_000_003 + step) * 101 + rnd) * 10_007 + k for k in groups]
                    part = generate_groups(self.bundle, self.engine, [self.train_set[prompt_ids[k]] for k in groups],
                                           counts, self.sampling, seeds, firsts)
            if part is not None:
                with batch.timed("rewards"):
                    part_res = self.rewards(RewardBatch(part.items))
                _splice(batch, idx, part, part_res)
            with batch.timed("rewards"):
                # Group statistics need every completion of a group: gather all ranks' rewards.
                assert batch.rewards is not None
                batch.all_rewards = acc.gather(batch.rewards.total.to(acc.device)).cpu()
                batch.all_per_reward = acc.gather(batch.rewards.per_reward.to(acc.device)).cpu()
                failed = batch.rewards.failed_rows().to(torch.float32)  # float: bool gathers are not portable
                batch.all_failed = acc.gather(failed.to(acc.device)).cpu() > 0.5
            # Variance over the rows whose reward did not fail (a failed row has no real score).
            std = group_advantages(batch.all_rewards, G, valid=~batch.all_failed)[1]
            zero = [k for k in range(len(prompt_ids)) if float(std[k]) < 1e-6]
            if rnd == 0 and cfg.grpo.zero_variance_groups != "keep":
                batch.sampling["dynamic/zero_std_groups_sampled"] = float(len(zero))
            if rnd == rounds or not zero:
                break
            for k in zero:
                prompt_ids[k] = self.sampler.extra(step, rnd, k)
            swaps += skipper.fix(prompt_ids, step, zero)
            pending = set(zero)
            resampled += len(zero)
        if cfg.grpo.zero_variance_groups == "resample":
            batch.sampling["dynamic/resampled_groups"] = float(resampled)
        if skipper.enabled:
            batch.sampling["data/skipped_samples"] = float(swaps)

    def phase_advantages(self, batch: StepBatch) -> None:
        """Advantages of this rank's rows from every rank's rewards; optionally drop zero-variance groups."""
        g, G, rank, per_rank = self.cfg.grpo, self.G, self.rank, self.per_rank
        assert batch.all_rewards is not None
        # Rows whose reward failed (scored by on_error) are left out of the group statistics and
        # the loss: a filled-in 0 would give them an advantage tied to the failure, not the text.
        valid = None if batch.all_failed is None else ~batch.all_failed
        adv_all, batch.group_std = group_advantages(batch.all_rewards, G, g.scale_rewards, g.advantage_eps,
                                                    g.advantage_baseline, valid=valid)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        batch.advantages = adv_all[mine]
        if g.zero_variance_groups != "keep":
            batch.keep = (batch.group_std >= 1e-6).repeat_interleave(G)[mine]
            batch.sampling["dynamic/dropped_groups"] = float((batch.group_std < 1e-6).sum())
        if valid is not None:
            batch.sampling["rewards/failed_rows"] = float((~valid).sum())
            if not bool(valid.all()):
                batch.keep = valid[mine] if batch.keep is None else batch.keep & valid[mine]

    def step_metrics(self, batch: StepBatch, step_time: float, cpu_time: float) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of a step (gathered over ranks)."""
        acc = self.accelerator
        gen, res = batch.generations, batch.rewards
        assert gen is not None and res is not None and batch.all_rewards is not None
        assert batch.all_per_reward is not None and batch.group_std is not None
        lengths = acc.gather(torch.tensor([float(len(c.ids)) for c in gen.completions], device=acc.device)).cpu()
        truncs = acc.gather(torch.tensor([float(c.truncated) for c in gen.completions], device=acc.device)).cpu()
        std = batch.group_std
        return {
            "reward": float(batch.all_rewards.nanmean()),
            "reward_std": float(std.mean()),
            "frac_reward_zero_std": float((std < 1e-6).float().mean()),
            **{f"rewards/{name}": _nanmean(batch.all_per_reward[:, j]) for j, name in enumerate(self.rewards.names)},
            **{k: v for k, v in res.metrics.items() if k.endswith(("_errors", "_timeouts"))},
            **batch.stats,
            **batch.sampling,
            **self.engine.metrics(),
            "loss": float(sum(batch.losses) / max(len(batch.losses), 1)),
            "lr": float(self.policy.scheduler.get_last_lr()[0]),
            "completion_length": float(lengths.mean()),
            "truncated_frac": float(truncs.mean()),
            "step_time_s": step_time,
            # CPU seconds of this process (all threads): equal-compute comparisons on a shared machine.
            "cpu_time_s": cpu_time,
            **{f"timing/{k}_s": v for k, v in batch.timings.items()},
            **self.device.memory_stats(),
        }

    def phase_log(self, batch: StepBatch, metrics: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` line; every ``logging.log_completions_every`` steps the completions too."""
        from accelerate.utils import gather_object

        done = batch.step + 1
        self.writer.log(done, metrics)
        every = self.cfg.logging.log_completions_every
        if not every or not (done % every == 0 or batch.step == 0):
            return
        gen, res, adv = batch.generations, batch.rewards, batch.advantages
        assert gen is not None and res is not None and adv is not None
        names = self.rewards.names
        recs = [completion_record(done, gen.samples[i], it, float(res.total[i]), float(adv[i]),
                                  {n: _f(res.per_reward[i, j]) for j, n in enumerate(names)})
                for i, it in enumerate(gen.items)]
        self.writer.log_completions(gather_object(recs) if self.world > 1 else recs)

    def phase_eval(self, label: str) -> dict[str, Any]:
        """Greedy evaluation of the eval split with the one evaluator; printed and kept for ``eval.json``."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # Evaluation shards may be uneven: under ZeRO-3 the weights are gathered once for all of it.
        with whole_weights_for_generation(self.accelerator, self.policy.model, gather=self.gather):
            result = evaluate(self.plan, self.registry, self.bundle, self.engine, self.eval_set,
                              max_new_tokens=cfg.eval.max_new_tokens or cfg.grpo.max_completion_length,
                              batch_size=cfg.eval.batch_size, progress=False, accelerator=self.accelerator)
            kl = None
            if cfg.eval.kl_base:  # KL(policy || a fixed base) on the eval prompts (RL's Razor's forgetting measure)
                self._kl = getattr(self, "_kl", None) or KLToBase(self.plan, cfg.eval.kl_base)
                kl = self._kl(self.bundle, self.engine, self.eval_set, accelerator=self.accelerator,
                              seed=cfg.train.seed)
        res = training_result(result)
        if kl is not None:
            res["kl_to_base"] = kl
        res["seconds"] = round(time.perf_counter() - t0, 3)
        self.accelerator.print(eval_line(label, res))
        return res

    def phase_save(self, step: int, metrics: dict[str, Any] | None) -> None:
        """A crash-safe ``checkpoint-<step>`` (weights, processor, optimizer, schedule, RNG, data position)."""
        acc, model = self.accelerator, self.policy.model

        def save_model(folder: Path) -> None:
            state = full_state_dict(acc, model)
            if acc.is_main_process:
                acc.unwrap_model(model).save_pretrained(folder, state_dict=state, safe_serialization=True)
                self.bundle.processor.save_pretrained(folder)

        state = {"data_position": step * self.prompts_per_step, "eval": self.eval_result,
                 "config": self.cfg.model_dump(mode="json"), "num_processes": self.world,
                 "run_id": self.run_id, "dtype": str(self.dtype).removeprefix("torch."),
                 "backend": self.backend.as_dict()}
        if metrics is not None:
            # The step's metrics line is written after its checkpoint: a crash in between is
            # repaired on resume from this copy, so no step's line is ever lost.
            state["metrics"] = {k: v for k, v in metrics.items() if k != "timing/save_s"}
        save_checkpoint(self.out_dir, step, save_model=save_model, optimizer=self.optimizer_state,
                        scheduler=self.policy.scheduler, state=state, keep_last=self.cfg.checkpoint.keep_last,
                        is_main=acc.is_main_process, rank=self.rank, optimizer_per_rank=self.optimizer_per_rank,
                        barrier=acc.wait_for_everyone)
        acc.wait_for_everyone()

    # ---- start and end -------------------------------------------------------------------------
    def restore(self) -> int:
        """Resume optimizer, schedule, RNG and logs from the checkpoint, if any; returns the start step."""
        acc, cfg = self.accelerator, self.cfg
        start = 0
        if self.resume_from is not None:
            # verified in resolve_resume; a sharded optimizer gives each process its own shard
            blob, meta = load_trainer_state(self.resume_from, verify=False, rank=self.rank)
            self._check_optimizer_layout(meta)
            try:
                self.optimizer_state.load_state_dict(blob["optimizer"])
                self.policy.scheduler.load_state_dict(blob["scheduler"])
                set_rng_state(blob["rng"])
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
                # A hand-edited or foreign trainer state whose types are right but whose content does not fit.
                raise CheckpointError(f"checkpoint {self.resume_from}: its trainer state does not fit this run's "
                                      f"optimizer/scheduler/RNG ({type(exc).__name__}: {exc})") from None
            start = int(meta["step"])
            self.eval_result = meta.get("eval", {})
            self.writer.truncate_after(start)
            if meta.get("metrics") and self.writer.last_step() < start:
                self.writer.log(start, meta["metrics"])
            acc.print(f"resumed from {self.resume_from} at step {start}")
        elif (self.out_dir / "metrics.jsonl").exists():
            # A fresh run into a used folder: its logs must not continue the earlier run's.
            self.writer.truncate_after(0)
            acc.print(f"note: fresh run (no resume) in {self.out_dir}: earlier metrics.jsonl/completions.jsonl "
                      "replaced")
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
            write_backend(self.out_dir, self.backend)
        return start

    def _record_memory(self) -> None:
        """Gather every process's :class:`MemoryAccounting` once; ``backend.json`` gets ``memory_per_rank``."""
        from accelerate.utils import gather_object

        assert self.memory is not None
        mine = self.memory.take()
        self.memory = None
        ranks = gather_object([mine]) if self.world > 1 else [mine]
        acc = self.accelerator
        if acc.is_main_process:
            write_backend(self.out_dir, self.backend, memory_per_rank=ranks)
        mib = " | ".join(f"{r['params_bytes'] / 2**20:.2f} + {r['grads_bytes'] / 2**20:.2f} + "
                         f"{r['optimizer_state_bytes'] / 2**20:.2f}" for r in ranks)
        acc.print(f"memory per process (MiB, params + grads + optimizer state): {mib}")

    def _check_optimizer_layout(self, meta: dict[str, Any]) -> None:
        """Refuse a checkpoint whose optimizer state cannot fit this run's (also under ``--resume-force``).

        A whole optimizer state (one process, DDP) and ZeRO's per-process shards do not convert
        into each other, and a shard fits only the same ZeRO stage on the same number of processes.
        """
        saved = meta.get("backend") or {"name": "single" if meta.get("num_processes", 1) == 1 else "ddp"}
        layout = (bool(meta.get("optimizer_per_rank")), saved.get("zero_stage"), meta.get("num_processes"))
        mine = (self.optimizer_per_rank, self.backend.zero_stage, self.world)
        if layout[0] != mine[0] or (mine[0] and layout != mine):
            was = saved.get("description", f"{saved['name']}, {meta.get('num_processes', '?')} processes")
            raise CheckpointError(
                f"checkpoint {self.resume_from} was saved under {was}; its optimizer state does not fit "
                f"{self.backend.describe()}: resume under the backend and number of processes it was saved with, or "
                f"start a fresh run from its weights (model.path={self.resume_from})")

    def finish(self) -> None:
        """Write ``eval.json`` and the reward curve, release rewards and engine, end accelerate."""
        acc = self.accelerator
        if acc.is_main_process:
            if self.eval_result:
                (self.out_dir / "eval.json").write_text(json.dumps(self.eval_result, indent=2))
            if self.cfg.logging.plot:
                plot_rewards(self.out_dir)
            task_stats = self.task.stats()
            if task_stats:
                acc.print(f"data: {task_stats}")
            acc.print(f"outputs in {self.out_dir}")
        self.writer.close()
        self.rewards.close()
        self.engine.close()
        acc.wait_for_everyone()
        acc.end_training()
        release_output_dir(self.out_dir)


def _splice(batch: StepBatch, idx: list[int], part: Any, part_res: Any) -> None:
    """Put a (re)generated part into the batch's slots ``idx`` (all of them on the first round)."""
    if batch.generations is None:
        batch.generations, batch.rewards = part, part_res
        return
    gen, res = batch.generations, batch.rewards
    assert res is not None
    for j, i in enumerate(idx):
        gen.samples[i], gen.prompts[i] = part.samples[j], part.prompts[j]
        gen.completions[i], gen.items[i] = part.completions[j], part.items[j]
        res.per_reward[i] = part_res.per_reward[j]
        res.total[i] = part_res.total[j]
        if res.failed is not None and part_res.failed is not None:
            res.failed[i], res.timed_out[i] = part_res.failed[j], part_res.timed_out[j]
    for key, val in part_res.metrics.items():
        if key.endswith(("_errors", "_timeouts")):
            res.metrics[key] = res.metrics.get(key, 0.0) + val


def _configure_deepspeed(accelerator: Any, cfg: Any, model: Any) -> None:
    """Fill the DeepSpeed config's ``auto`` fields from the run config and the model.

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
    fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, model,
                          micro_batch_size=cfg.train.per_device_batch_size, num_processes=accelerator.num_processes,
                          max_grad_norm=cfg.train.max_grad_norm)


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")


def _f(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v
