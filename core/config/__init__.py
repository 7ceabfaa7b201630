"""Typed run configuration: pydantic models, dotted CLI overrides, validation (YAML reading: ``yaml_reader``).

A run config is YAML (or the built-in default) plus ``a.b.c=value`` overrides, where a value
is parsed as YAML (``1e-5``, ``true``, ``[a, b]``) and a number in a dotted path indexes a
list (``rewards.0.weight=2``; the index one past the end appends). Unknown keys are errors
with a did-you-mean; every error names the file and line (or the override) it came from.
Each component's ``options`` are validated against its ``Options`` model by
:func:`core.plugins.plan.make_plan` once plugins are loaded, before any weights load.

``python -m core.config --markdown`` prints the field reference used in ``docs/config.md``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUndefined

from core.config.yaml_reader import RawConfig, YamlRefused, key_lines, plain_data_problem, yaml_load


class ConfigError(ValueError):
    """An invalid configuration, with a one-paragraph message naming the key."""


FLOAT32_MAX = 3.4028234663852886e38
#: transformers schedulers that work with the engine's call (no extra kwargs, stepped without a metric).
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")


# ---- models -----------------------------------------------------------------------------
class Strict(BaseModel):
    """Base of every config section: unknown keys are errors."""

    # inf/nan are refused everywhere: a learning rate or weight of inf only failed at step 2, deep in sampling.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_float32(cls, v: Any) -> Any:
        # Finite in Python but inf on the device: a reward weight of 1e39 became inf in float32.
        if isinstance(v, float) and abs(v) > FLOAT32_MAX:
            raise ValueError(f"{v:g} overflows float32 (largest {FLOAT32_MAX:.3g}): it would become inf on the device")
        return v


def expand_home(v: Any) -> Any:
    """``~/x`` -> ``$HOME/x`` for a path option (a quoted ``~`` reaches the program unexpanded by the shell)."""
    return os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v


class ComponentRef(Strict):
    """A component by name (``name`` or ``distribution:name``) with its options."""

    name: str = Field(description="component name, or `distribution:name` when two plugins provide it")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="validated against the component's `Options` model")


class DeviceRef(ComponentRef):
    """The compute device (``auto`` = the highest-priority usable one) and its options."""

    name: str = Field("auto", description="device name, or `auto`")


class RolloutRef(ComponentRef):
    """The rollout engine that generates completions, and its options."""

    name: str = Field("transformers", description="rollout engine name (built-in: `transformers`)")


class ModelConfig(Strict):
    """The policy checkpoint and how to load it."""

    path: str | None = Field(None, description="checkpoint folder or hub id; default: a tiny build under .cache/")
    family: str | None = Field(None, description="model family; default: chosen by config.model_type")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="training dtype; `auto` = bfloat16 on an accelerator that supports it, float32 on CPU")
    attn_implementation: str | None = Field(
        None, description="transformers attention kernel (`sdpa`, `eager`, `flash_attention_2`); default: the model's")
    options: dict[str, Any] = Field(default_factory=dict, description="the family's Options")
    tiny: dict[str, Any] | None = Field(
        None, description="build a tiny random checkpoint of `family` at `path` if missing (offline demos)")

    _home = field_validator("path")(classmethod(lambda cls, v: expand_home(v)))

    def resolved_path(self) -> str:
        """``path``, or a deterministic cache folder for a tiny build."""
        if self.path:
            return self.path
        if self.tiny is None:
            raise ConfigError("model.path is required (or set model.tiny to build a tiny checkpoint)")
        digest = hashlib.sha1(json.dumps(self.tiny, sort_keys=True).encode()).hexdigest()[:8]
        return str(Path(".cache") / "tiny" / f"{self.family}-{digest}")


class RewardConfig(ComponentRef):
    """One reward term of the weighted sum."""

    weight: float = Field(1.0, ge=-1e6, le=1e6, description="weight of this reward in the summed reward")
    timeout_s: float = Field(30.0, gt=0, description="time limit for scoring one step")
    on_error: Literal["zero", "skip", "raise"] = Field(
        "zero", description="score of a completion whose reward timed out, raised or gave NaN")
    max_error_frac: float = Field(
        0.5, ge=0, le=1, description="stop the run when at least this fraction of a step's completions fail "
                                     "this reward (errors + timeouts) ...")
    max_error_steps: int = Field(10, ge=1, description="... for this many steps in a row")


class GRPOConfig(Strict):
    """GRPO hyper-parameters (names follow TRL's GRPOConfig where they mean the same)."""

    num_generations: int = Field(8, ge=2, le=65536, description="G: completions per prompt")
    max_completion_length: int = Field(256, ge=1, le=1 << 20, description="max new tokens per completion")
    temperature: float = Field(1.0, ge=1e-3, le=100, description="sampling temperature (logits are divided by it)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    top_k: int | None = Field(None, ge=0, description="top-k sampling; null/0 = off")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0 = off")
    beta: float = Field(0.04, ge=0, description="KL coefficient; 0 loads no reference model")
    epsilon: float = Field(0.2, ge=0, description="clip range (low)")
    epsilon_high: float | None = Field(None, ge=0, description="clip range (high); default = epsilon")
    num_iterations: int = Field(1, ge=1, description="mu: optimisation passes per rollout")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group's std, the batch's std, or not at all")
    advantage_baseline: Literal["group", "batch"] = Field(
        "group", description="subtract the group's mean reward (GRPO) or the whole step's (REINFORCE++); batch "
                             "still scores groups whose completions all agree")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("grpo", description="loss aggregation")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="importance ratio per token (GRPO) or per sequence (GSPO)")
    mask_truncated_completions: bool = Field(False, description="exclude completions without EOS from the loss")
    advantage_eps: float = Field(1e-4, gt=0, description="added to the std before dividing")
    zero_variance_groups: Literal["keep", "drop", "resample"] = Field(
        "keep", description="groups whose rewards are all equal: keep (zero advantage), drop from the loss, or "
                            "resample new prompts for them (DAPO dynamic sampling), up to resample_budget rounds")
    resample_budget: int = Field(2, ge=0, description="extra rollout rounds per step for zero_variance_groups=resample")
    prefix_sharing: bool = Field(
        True, description="training passes run each group's prompt and images once (core.grpo.prefix), where the "
                          "model family opted in: a prompt pass whose KV cache its G completions then run on (any "
                          "attention kernel), or one packed row per group under a block-causal mask (sdpa/eager; "
                          "with gradient checkpointing, and on small models where that is cheaper); else the plain "
                          "path; false = one [prompt, completion] row per completion")
    # Rollout correction: TRL's vllm_importance_sampling_* options, with TRL's defaults.
    rollout_is_correction: bool | None = Field(
        None, description="weight each completion's loss by pi_old / q, q being the rollout engine's sampling "
                          "distribution (truncated importance sampling, as TRL's vllm_importance_sampling_correction); "
                          "needs the engine's per-token log-probs. null = on for engines that sample outside the "
                          "trainer (vLLM, servers), off for the built-in engine (it samples from the policy itself) "
                          "and for guided choices")
    rollout_is_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "sequence_mask", description="per-token or per-completion ratio; *_truncate clamps it to [rollout_is_min, "
                                     "rollout_is_max], *_mask zeroes the loss where it falls outside")
    rollout_is_max: float | None = Field(3.0, gt=0, description="C_max of the rollout correction (TRL: 3.0)")
    rollout_is_min: float | None = Field(None, ge=0, description="C_min of the rollout correction (TRL: none)")

    @model_validator(mode="after")
    def _check_clip(self) -> GRPOConfig:
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"grpo.epsilon_high ({self.epsilon_high}) must be >= grpo.epsilon ({self.epsilon})")
        lo, hi = self.rollout_is_min, self.rollout_is_max
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"grpo.rollout_is_min ({lo}) must be less than grpo.rollout_is_max ({hi})")
        if self.rollout_is_mode.endswith("truncate") and lo is None and hi is None:
            raise ValueError(f"grpo.rollout_is_mode {self.rollout_is_mode}: set grpo.rollout_is_min or "
                             "grpo.rollout_is_max (the bound to truncate at)")
        if self.advantage_baseline == "batch" and self.scale_rewards == "group":
            # A group whose rewards agree has std 0: dividing its non-zero batch-baseline advantage
            # by std + eps would blow it up by 1/eps.
            raise ValueError("grpo.advantage_baseline=batch needs grpo.scale_rewards=batch or none (a group's "
                             "std is 0 when its completions agree)")
        return self


class LoraConfig(Strict):
    """peft LoRA settings (used when ``train.mode == "lora"``)."""

    r: int = Field(64, ge=1, description="rank")
    alpha: int = Field(128, ge=1, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None, description="module names or regex; default: every Linear of the language model "
                          "(not vision, not lm_head)")


class TrainConfig(Strict):
    """Optimisation and batch settings.

    ``per_device_batch_size`` counts completions (as in TRL): a step on ``P`` processes uses
    ``P * per_device_batch_size * gradient_accumulation_steps`` completions, i.e. that many
    divided by ``grpo.num_generations`` prompts.
    """

    mode: Literal["full", "lora", "frozen_vision"] = Field(
        "full", description="train everything, a LoRA adapter (vision frozen), or all but the vision tower")
    learning_rate: float = Field(1e-6, gt=0, le=1.0)
    lr_scheduler: str = Field("constant", description="a transformers scheduler name: " + ", ".join(SCHEDULERS))
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = off")
    per_device_batch_size: int = Field(8, ge=1, le=1 << 20, description="completions per micro-batch on each process")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1 << 20)
    max_steps: int = Field(100, ge=1, le=1 << 40, description="optimizer steps (each on a fresh rollout)")
    seed: int = Field(0, ge=0, le=1 << 24, description="the run's seed (per-step sampling seeds derived from it "
                                                       "must fit in 64 bits)")
    shuffle: bool = Field(True, description="visit training prompts in a seeded random order each epoch; "
                          "false = in the task's order (for tasks that interleave classes)")
    gradient_checkpointing: bool = False
    distributed_timeout_s: float | None = Field(
        None, gt=0, description="seconds a collective waits for the other processes before the run fails "
                                "(torch.distributed's timeout); null = accelerate's default (30 min gloo, 10 min nccl)")
    gather_for_generation: bool = Field(
        True, description="DeepSpeed ZeRO-3: gather the policy's whole weights on every process once per rollout and "
                          "evaluation (fast; no collective while generating, so ranks may generate different "
                          "amounts) at the cost of the whole model's memory on every process while generating; "
                          "false = keep them sharded (each layer all-gathered per token), which needs every process "
                          "to make the same generate calls: uneven settings are refused at start")
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            close = difflib.get_close_matches(v, SCHEDULERS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown learning-rate scheduler.{hint} Valid: {', '.join(SCHEDULERS)}")
        return v


class LoggingConfig(Strict):
    """Where and what to log."""

    output_dir: str = Field("runs/quickstart", min_length=1, pattern=r"\S",
                            description="metrics, completions, checkpoints and plots go here")
    log_completions_every: int = Field(10, ge=0, description="steps between completions.jsonl dumps; 0 = never")
    tensorboard: bool = True
    wandb: bool = False
    progress_bar: bool = True
    plot: bool = Field(True, description="write a reward curve PNG at the end")
    start_over: bool = Field(
        False, description="a fresh run into an output_dir holding an earlier run's checkpoints (refused otherwise) "
                           "first moves everything there to <output_dir>.previous-<time> (`--start-over`); "
                           "nothing is deleted")

    _home = field_validator("output_dir")(classmethod(lambda cls, v: expand_home(v)))


class CheckpointConfig(Strict):
    """Checkpointing and resume."""

    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_last: int = Field(
        2, ge=1, description="keep this run's keep_last checkpoint-N folders with the highest N and delete its "
                             "others after each save (checkpoints of another run are never deleted)")
    resume: bool | Literal["auto"] | str = Field(
        False, description="true (`--resume`) = the latest checkpoint in output_dir, an error if there is none; "
                           "auto = the latest if any, else start fresh; or a checkpoint folder")
    resume_force: bool = Field(
        False, description="resume even when batch, G, seed, schedule or data changed since the checkpoint "
                           "(`--resume-force`); the run then no longer continues the checkpointed one exactly")
    save_final: bool = True

    _home = field_validator("resume")(classmethod(lambda cls, v: expand_home(v)))


class EvalConfig(Strict):
    """Held-out evaluation before and after training (greedy)."""

    enabled: bool = True
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int | None = Field(None, ge=1, description="default: grpo.max_completion_length")
    reward: str | None = Field(None, description="reward whose score >= threshold counts as correct; "
                                                   "default: the first configured reward")
    threshold: float = 1.0
    kl_base: str | None = Field(None, min_length=1, description="a checkpoint folder: also report KL(policy || "
                                "this model) on the eval prompts (sampled completions, per-token mean)")
    kl_samples_per_prompt: int = Field(1, ge=1, description="completions sampled per eval prompt for kl_base")


class DataConfig(Strict):
    """Limits on every loaded row that need the model's tokenizer (:mod:`core.runtime.data_limits`).

    Rows whose prompt text holds one of the model's special tokens (image placeholders, chat
    markers) are always refused, never escaped. A refused row follows the task's bad-row policy
    (``on_bad_row``: an error naming file:line, or skipped and counted).
    """

    max_prompt_tokens: int | None = Field(
        4096, ge=1, le=1 << 24, description="most tokens of a row's prompt text (system + user text; the chat "
                                            "template and image tokens are not counted); null = no limit")


class RunConfig(Strict):
    """A whole run: ``python -m core.train`` validates and executes one of these."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    task: ComponentRef = Field(description="the data: a task format and its options")
    rewards: list[RewardConfig] = Field(min_length=1, description="reward terms, summed with their weights")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    device: DeviceRef = Field(default_factory=DeviceRef,
                              description="compute device; `auto` = the highest-priority usable one")
    rollout: RolloutRef = Field(default_factory=RolloutRef, description="rollout engine that generates completions")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: DataConfig = Field(default_factory=DataConfig, description="limits on each row's prompt text")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    plugins: list[str] | None = Field(
        None, description="distributions to load (default: all installed; `none` = built-ins only); "
                          "`--plugins` on the command line wins")

    # Where each key came from, for error messages after validation (make_plan).
    _source: str = PrivateAttr("config")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _overrides: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, v: Any) -> Any:
        # `plugins=a,b` on the command line and `plugins: none` in YAML are plain strings.
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @model_validator(mode="after")
    def _check_model(self) -> RunConfig:
        if self.model.tiny is not None and not self.model.family:
            raise ValueError("model.tiny needs model.family (the family that builds the checkpoint)")
        if all(r.weight == 0 for r in self.rewards):
            # Every advantage would be 0: the run would "train" on no signal and exit 0.
            raise ValueError("rewards: every reward has weight 0, so the summed reward is always 0 and nothing "
                             "is learnt; give at least one reward a non-zero weight")
        return self

    def origin(self, key: str) -> str:
        """Where ``key`` (dotted) was set: ``file:line``, the command-line override, or the source."""
        return _origin(key, self._source, self._lines, self._overrides)

    def batch_plan(self, num_processes: int = 1) -> dict[str, int]:
        """Batch and step arithmetic; raises :class:`ConfigError` if it does not divide."""
        g = self.grpo.num_generations
        ga = self.train.gradient_accumulation_steps
        per_step = num_processes * self.train.per_device_batch_size * ga
        if per_step % g:
            unit = g // math.gcd(g, num_processes * ga)  # closed form: a search up to 4 * G hung for huge G
            valid = [unit * k for k in range(1, 5)]
            raise ConfigError(
                f"{self.origin('train.per_device_batch_size')}: batch arithmetic: {num_processes} process(es) x "
                f"train.per_device_batch_size {self.train.per_device_batch_size} x "
                f"train.gradient_accumulation_steps {ga} = {per_step} completions per step, which is not "
                f"divisible by grpo.num_generations={g}, so a group of {g} completions of one prompt would be "
                f"split across steps. Valid per-device batch sizes here: {', '.join(map(str, valid))} ... "
                f"(or change grpo.num_generations / gradient_accumulation_steps).")
        return {
            "num_processes": num_processes,
            "completions_per_step": per_step,
            "prompts_per_step": per_step // g,
            "completions_per_micro_batch": self.train.per_device_batch_size,
            "micro_batches_per_step": ga,
            "optimizer_steps": self.train.max_steps,
            "optimizer_updates_per_step": self.grpo.num_iterations,
            "total_completions": per_step * self.train.max_steps,
        }


# ---- loading ------------------------------------------------------------------------
def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists, creating missing sections; an index may append."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override {dotted!r}: empty key segment")
    cur: Any = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        here = ".".join(keys[: i + 1])
        if isinstance(cur, list):
            if not k.isdigit():
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i])} is a list; "
                                  f"use a number (0..{len(cur)}) instead of {k!r}")
            idx = int(k)
            if idx > len(cur):
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i])} has {len(cur)} item(s); "
                                  f"index {idx} is out of range (use {len(cur)} to append one)")
            if idx == len(cur):
                cur.append(None if last else {})
            if last:
                cur[idx] = value
            elif not isinstance(cur[idx], dict | list):
                cur[idx] = {}
            cur = cur[idx]
            continue
        if not isinstance(cur, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i])} is a value, not a section")
        if last:
            cur[k] = value
            return
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        elif not isinstance(nxt, dict | list):
            raise ConfigError(f"override {dotted!r}: {here} is a value ({nxt!r}), not a section")
        cur = nxt


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.path=value`` strings; values are YAML scalars/lists/mappings."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. train.learning_rate=1e-5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml_load(raw) if raw != "" else ""
        except YamlRefused as exc:
            raise ConfigError(f"override {item!r}: {exc.problem}") from None
        except yaml.YAMLError:
            value = raw  # an unparseable value is a plain string (e.g. a path with a colon)
        bad = plain_data_problem(value, key)
        if bad is not None:
            raise ConfigError(f"override {item!r}: {bad[0]}: {bad[1]}")
        out.append((key, value))
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: ``line N: problem`` (PyYAML's own message spans several lines with a caret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}; {problem}" if context else problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}" if mark is not None else " ".join(text.split())


def load_raw(path: str | Path | None, default: str | Path | None = None) -> RawConfig:
    """Read a YAML config file into a :class:`RawConfig` (``default`` when ``path`` is None)."""
    if path is not None and not str(path).strip():
        # `--config ''` (an unset shell variable) used to run the default config without a word.
        raise ConfigError("--config: the config file name is empty (an unset shell variable?); give a YAML file, "
                          "or leave --config out to run the built-in quickstart config")
    src = Path(path).expanduser() if path is not None else (Path(default) if default else None)
    if src is None:
        return RawConfig({})
    if src.is_dir():
        raise ConfigError(f"config file {src} is a folder, not a YAML file")
    if not src.exists():
        raise ConfigError(f"config file {src} does not exist")
    if not src.is_file():  # checked before opening: reading a FIFO or a device would block or never end
        raise ConfigError(f"config file {src} is not a regular file (a FIFO, socket or device?); give a YAML file")
    try:
        text = src.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{src}: not UTF-8 text (byte {exc.start}): is this a YAML config file?") from None
    except OSError as exc:
        raise ConfigError(f"config file {src}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = yaml_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{src}: not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the top level must be a mapping of sections (model, task, rewards, ...)")
    lines = key_lines(text)
    bad = plain_data_problem(data)
    if bad is not None:
        raise ConfigError(f"{_origin(bad[0], str(src), lines, None)}: {bad[0]}: {bad[1]}")
    return RawConfig(data, str(src), lines)


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, source: str | None = None) -> RunConfig:
    """Apply overrides to ``raw`` and validate it into a :class:`RunConfig`.

    Errors (:class:`ConfigError`) name each offending key with its ``file:line`` (when
    ``raw`` came from :func:`load_raw`) or the override that set it.
    """
    src = source or getattr(raw, "source", "config")
    lines = dict(getattr(raw, "lines", {}))
    data = json.loads(json.dumps(dict(raw)))  # deep copy of plain data
    applied: dict[str, str] = {}
    for (key, value), text in zip(parse_overrides(overrides or []), overrides or [], strict=True):
        _set_dotted(data, key, value)
        applied[key] = text
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, RunConfig, src, lines=lines, overrides=applied)) from None
    cfg._source, cfg._lines, cfg._overrides = src, lines, applied
    return cfg


def _origin(key: str, source: str, lines: dict[str, int] | None, overrides: dict[str, str] | None) -> str:
    """``override 'k=v'`` if an override set ``key`` (or a parent), else ``file:line`` of the nearest key."""
    if overrides:
        # An override that set this key or something inside it (`trian.seed=3` for key `trian`).
        for okey, text in overrides.items():
            if okey.startswith(key + ".") and key:
                return f"override {text!r}"
    parts = key.split(".")
    prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    # An override of the key or of any parent replaced what the file had there (`rewards.0={...}`
    # replaces the file's rewards.0.weight line), so it is blamed before any file line.
    for prefix in prefixes:
        if overrides and prefix in overrides:
            return f"override {overrides[prefix]!r}"
    for prefix in prefixes:
        if lines and prefix in lines:
            return f"{source}:{lines[prefix]}"
    return source


#: Keys TRL users bring that mean something else here: the pointer replaces the "did you mean" guess.
MOVED_KEYS = {
    "grpo.max_prompt_length": " Prompts are never truncated (that would cut images or the question): "
                              "data.max_prompt_tokens refuses longer rows at load time.",
}


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str, prefix: str = "", *,
                            lines: dict[str, int] | None = None, overrides: dict[str, str] | None = None) -> str:
    """One line per problem: where, the dotted key, what is wrong, and what would be valid."""
    out: list[str] = []
    # Value errors grouped per key: a union field fails once per member and should read as one line.
    value_errors: dict[str, tuple[str, Any, list[str]]] = {}
    for err in exc.errors():
        # Unions add the member type to loc (``resume.bool``); keep only real field names/indices.
        loc = _strip_union_tags(model, [str(p) for p in err["loc"]])
        key = ".".join(([prefix] if prefix else []) + loc)
        where = _origin(key, source, lines, overrides)
        if err["type"] == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.5)
            parent = ".".join(([prefix] if prefix else []) + loc[:-1])
            hint = f" Did you mean {'.'.join(([parent] if parent else []) + [close[0]])!r}?" if close else ""
            hint = MOVED_KEYS.get(key, hint)
            valid = ", ".join(fields) if fields else "(none: this section takes no keys)"
            out.append(f"{where}: unknown key {key!r}.{hint} Valid keys{' in ' + parent if parent else ''}: {valid}.")
        elif err["type"] == "missing":
            desc = _field_doc(model, loc)
            out.append(f"{where}: {key!r} is required{' (' + desc + ')' if desc else ''}.")
        else:
            value_errors.setdefault(key, (where, err.get("input"), []))[2].append(err["msg"])
    for key, (where, value, msgs) in value_errors.items():
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        out.append(f"{where}: {key or '(top level)'} = {shown}: {_join_messages(msgs)}.")
    return "\n".join(dict.fromkeys(out))


def _join_messages(msgs: list[str]) -> str:
    """``Input should be a valid boolean, 'auto' or a valid string`` from pydantic's per-member messages."""
    msgs = list(dict.fromkeys(m.rstrip(".") for m in msgs))
    head = "Input should be "
    if len(msgs) > 1 and all(m.startswith(head) for m in msgs):
        rest = [m[len(head):] for m in msgs]
        return head + ", ".join(rest[:-1]) + " or " + rest[-1]
    return "; ".join(msgs)


def _strip_union_tags(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Drop pydantic's union-member tags (``bool``, ``literal['auto']``) from an error location.

    Walks the models along ``loc``: list indices and field names are kept; a part met inside
    a non-model value (where pydantic puts the union member it tried) is dropped.
    """
    out: list[str] = []
    cur: Any = model
    for part in loc:
        if part.isdigit():
            out.append(part)
            continue
        fields = getattr(cur, "model_fields", None) if cur is not None else None
        if fields is None:
            continue
        out.append(part)
        cur = _model_in(fields[part].annotation) if part in fields else None
    return out


def _field_doc(model: type[BaseModel], loc: list[str]) -> str:
    """The description of the field at ``loc``, if any."""
    if not loc:
        return ""
    cur: Any = model
    for part in loc[:-1]:
        if part.isdigit():
            continue
        f = getattr(cur, "model_fields", {}).get(part)
        cur = _model_in(f.annotation) if f else None
    f = getattr(cur, "model_fields", {}).get(loc[-1]) if cur else None
    return (f.description or "") if f else ""


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the nested pydantic model at ``loc`` (list indices skipped)."""
    cur: Any = model
    for part in loc:
        if part.isdigit():
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        cur = _model_in(field.annotation)
        if cur is None:
            return []
    return sorted(getattr(cur, "model_fields", {}))


def _model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``--dry-run`` prints and runs save)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---- reference documentation ---------------------------------------------------------
def _type_name(ann: Any) -> str:
    """A short, readable rendering of a field annotation (``int | None``, ``'a' | 'b'``)."""
    origin = typing.get_origin(ann)
    if origin is Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    if origin in (list, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{origin.__name__}[{args}]"
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    return getattr(ann, "__name__", str(ann))


def _default_text(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _constraints(field: Any) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min items")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def markdown_reference() -> str:
    """Markdown tables of every config section and field, generated from the pydantic models."""
    sections: list[tuple[str, type[BaseModel]]] = [("(top level)", RunConfig)]
    for name, f in RunConfig.model_fields.items():
        sub = _model_in(f.annotation)
        if sub is not None:
            sections.append((name if sub is not RewardConfig else "rewards[i]", sub))
    sections.append(("train.lora", LoraConfig))
    parts = []
    for title, model in sections:
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        rows = ["| key | type | default | constraints | meaning |", "|---|---|---|---|---|"]
        for fname, f in model.model_fields.items():
            meaning = (f.description or "").replace("|", "\\|")
            rows.append(f"| `{fname}` | {_type_name(f.annotation)} | {_default_text(f)} | {_constraints(f)} | "
                        f"{meaning} |")
        parts.append(f"### `{title}`\n\n{doc}\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"
