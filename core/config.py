"""Typed run configuration: pydantic models, YAML loading, dotted CLI overrides, validation.

A run config is YAML (or the built-in default) plus ``a.b.c=value`` overrides, where a value
is parsed as YAML (``1e-5``, ``true``, ``[a, b]``). Unknown keys are errors with a
did-you-mean; each component's ``options`` are validated against its ``Options`` model by
:func:`validate_components` once plugins are loaded, before any weights load.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """An invalid configuration, with a one-paragraph message naming the key."""


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentRef(Strict):
    """A component by name (``name`` or ``distribution:name``) with its options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(Strict):
    """The policy checkpoint and how to load it."""

    path: str | None = Field(None, description="checkpoint folder or hub id; default: a tiny build under .cache/")
    family: str | None = Field(None, description="model family; default: chosen by config.model_type")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="the family's Options")
    tiny: dict[str, Any] | None = Field(
        None, description="build a tiny random checkpoint of `family` at `path` if missing (offline demos)")

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

    weight: float = 1.0
    timeout_s: float = Field(30.0, gt=0, description="time limit for scoring one step")
    on_error: Literal["zero", "skip", "raise"] = Field(
        "zero", description="score of a completion whose reward timed out, raised or gave NaN")


class GRPOConfig(Strict):
    """GRPO hyper-parameters (names follow TRL's GRPOConfig where they mean the same)."""

    num_generations: int = Field(8, ge=2, description="G: completions per prompt")
    max_prompt_length: int | None = None
    max_completion_length: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = None
    repetition_penalty: float = 1.0
    beta: float = Field(0.04, ge=0, description="KL coefficient; 0 loads no reference model")
    epsilon: float = Field(0.2, ge=0, description="clip range (low)")
    epsilon_high: float | None = Field(None, description="clip range (high); default = epsilon")
    num_iterations: int = Field(1, ge=1, description="mu: optimisation passes per rollout")
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: str = Field("grpo", description="loss aggregation: grpo | bnpo | dr_grpo | dapo")
    importance_sampling_level: Literal["token", "sequence"] = "token"
    mask_truncated_completions: bool = False
    advantage_eps: float = 1e-4


class LoraConfig(Strict):
    """peft LoRA settings (used when ``train.mode == "lora"``)."""

    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] | str | None = None


class TrainConfig(Strict):
    """Optimisation and batch settings.

    ``per_device_batch_size`` counts completions (as in TRL): a step on ``P`` processes uses
    ``P * per_device_batch_size * gradient_accumulation_steps`` completions, i.e. that many
    divided by ``grpo.num_generations`` prompts.
    """

    mode: Literal["full", "lora", "frozen_vision"] = "full"
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1)
    seed: int = 0
    gradient_checkpointing: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)


class LoggingConfig(Strict):
    """Where and what to log."""

    output_dir: str = "runs/quickstart"
    log_completions_every: int = Field(10, ge=0, description="steps between completions.jsonl dumps; 0 = never")
    tensorboard: bool = True
    wandb: bool = False
    progress_bar: bool = True
    plot: bool = True


class CheckpointConfig(Strict):
    """Checkpointing and resume."""

    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_last: int = Field(2, ge=1)
    resume: bool | Literal["auto"] | str = Field(False, description="true/auto = latest in output_dir, or a path")
    save_final: bool = True


class EvalConfig(Strict):
    """Held-out evaluation before and after training (greedy)."""

    enabled: bool = True
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int | None = None
    reward: str | None = Field(None, description="reward whose score >= threshold counts as correct; "
                                                   "default: the first configured reward")
    threshold: float = 1.0


class RunConfig(Strict):
    """A whole run: ``python -m core.train`` validates and executes one of these."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    task: ComponentRef
    rewards: list[RewardConfig] = Field(min_length=1)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    device: ComponentRef = Field(default_factory=lambda: ComponentRef(name="auto"))
    rollout: ComponentRef = Field(default_factory=lambda: ComponentRef(name="transformers"))
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    plugins: list[str] | None = Field(None, description="distributions to load (default: all installed)")

    @model_validator(mode="after")
    def _check_model(self) -> RunConfig:
        if self.model.tiny is not None and not self.model.family:
            raise ValueError("model.tiny needs model.family (the family that builds the checkpoint)")
        return self

    def batch_plan(self, num_processes: int = 1) -> dict[str, int]:
        """Batch and step arithmetic; raises :class:`ConfigError` if it does not divide."""
        g = self.grpo.num_generations
        per_step = num_processes * self.train.per_device_batch_size * self.train.gradient_accumulation_steps
        if per_step % g:
            valid = [b for b in range(1, 4 * g + 1) if (num_processes * b * self.train.gradient_accumulation_steps) % g == 0][:4]
            raise ConfigError(
                f"train.per_device_batch_size: {num_processes} process(es) x batch "
                f"{self.train.per_device_batch_size} x accumulation {self.train.gradient_accumulation_steps} = "
                f"{per_step} completions per step, which is not divisible by grpo.num_generations={g}, "
                f"so groups would be split unevenly. Valid per-device batch sizes here: "
                f"{', '.join(map(str, valid))} ...")
        return {
            "num_processes": num_processes,
            "completions_per_step": per_step,
            "prompts_per_step": per_step // g,
            "completions_per_micro_batch": self.train.per_device_batch_size,
            "micro_batches_per_step": self.train.gradient_accumulation_steps,
            "optimizer_steps": self.train.max_steps,
            "optimizer_updates_per_step": self.grpo.num_iterations,
            "total_completions": per_step * self.train.max_steps,
        }


# ---- loading ------------------------------------------------------------------------
def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur: Any = data
    for i, k in enumerate(keys[:-1]):
        if isinstance(cur, list):
            cur = cur[int(k)]
            continue
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        elif not isinstance(nxt, dict | list):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
        cur = nxt
    if isinstance(cur, list):
        cur[int(keys[-1])] = value
    else:
        cur[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.path=value`` strings; values are YAML scalars/lists."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. train.learning_rate=1e-5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_raw(path: str | Path | None, default: str | Path | None = None) -> dict[str, Any]:
    """Read a YAML config file into a dict (``default`` when ``path`` is None)."""
    src = Path(path) if path else (Path(default) if default else None)
    if src is None:
        return {}
    if not src.is_file():
        raise ConfigError(f"config file {src} does not exist")
    try:
        data = yaml.safe_load(src.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{src}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the top level must be a mapping of sections (model, task, rewards, ...)")
    return data


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> RunConfig:
    """Apply overrides to ``raw`` and validate it into a :class:`RunConfig`."""
    data = json.loads(json.dumps(raw))  # deep copy of plain data
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, RunConfig, source)) from None


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str, prefix: str = "") -> str:
    """One paragraph per problem: the dotted key, what is wrong, and what would be valid."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(([prefix] if prefix else []) + loc)
        if err["type"] == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.5)
            hint = f" Did you mean {'.'.join(([prefix] if prefix else []) + loc[:-1] + [close[0]])!r}?" if close else ""
            lines.append(f"{source}: unknown key {key!r}.{hint} Valid keys here: {', '.join(fields)}.")
        elif err["type"] == "missing":
            lines.append(f"{source}: {key!r} is required.")
        else:
            lines.append(f"{source}: {key} = {err.get('input')!r}: {err['msg']}.")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the nested pydantic model at ``loc`` (list indices skipped)."""
    cur: Any = model
    for part in loc:
        if part.isdigit():
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        cur = _model_in(ann)
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
