"""Resolve a validated config against the loaded plugins, before any weights load.

:func:`make_plan` checks that every named component exists (and is unambiguous), validates
each ``options`` block against the component's ``Options`` model (and, through
``Component.nested_components``, the options of components a component builds itself, such
as a router's sub-rewards), picks the device for
``auto``, and computes the batch arithmetic. ``--dry-run`` prints the result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.config import ConfigError, RunConfig, format_validation_error
from core.plugins.registry import SINGULAR, ComponentError, Entry, Registry


@dataclass
class Plan:
    """The resolved components (with validated options) of a run."""

    config: RunConfig
    model_family: Entry | None
    task: Entry
    rewards: list[Entry]
    device: Entry
    rollout: Entry
    options: dict[str, Any] = field(default_factory=dict)  # section key -> validated Options
    batch: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for ``--dry-run``."""
        fam = self.model_family
        return {
            "model": {
                "path": self.config.model.resolved_path(),
                "family": fam.qualified if fam else "(chosen from config.model_type at load time)",
                "tiny_build": self.config.model.tiny is not None,
            },
            "task": self.task.qualified,
            "rewards": [
                {"name": e.qualified, "weight": r.weight}
                for e, r in zip(self.rewards, self.config.rewards, strict=True)
            ],
            "device": self.device.qualified,
            "rollout": self.rollout.qualified,
            "options": {k: v.model_dump(mode="json") for k, v in self.options.items()},
            "batch": self.batch,
            "data": self.config.data.model_dump(mode="json"),  # the per-row limits, e.g. max_prompt_tokens
            "notes": self.notes,
        }


def _validate_options(entry: Entry, raw: dict[str, Any], key: str, cfg: RunConfig | None = None,
                      registry: Registry | None = None, depth: int = 0) -> Any:
    try:
        opts = entry.cls.Options.model_validate(raw or {})
    except ValidationError as exc:
        # Name the place in the file/override; the message lists the component's valid options.
        if cfg is None:
            msg = format_validation_error(exc, entry.cls.Options, "config", key)
        else:
            msg = format_validation_error(exc, entry.cls.Options, cfg._source, key,
                                          lines=cfg._lines, overrides=cfg._overrides)
        fields = ", ".join(entry.cls.Options.model_fields) or "none"
        raise ConfigError(f"{msg} ({SINGULAR[entry.kind]} {entry.qualified} takes the options: {fields}.)") from None
    if registry is not None:
        _validate_nested(entry, opts, key, cfg, registry, depth)
    return opts


def _validate_tiny(entry: Entry, cfg: RunConfig) -> None:
    """Check ``model.tiny`` against the family's ``tiny_options`` model (sizes, unknown keys) before any build."""
    model = getattr(entry.cls, "tiny_options", None)
    if model is None:
        if not callable(getattr(entry.cls, "build_tiny_checkpoint", None)):
            raise ConfigError(f"{cfg.origin('model.tiny')}: model family {entry.qualified} cannot build tiny "
                              "checkpoints; remove model.tiny")
        return
    try:
        model.model_validate(cfg.model.tiny or {})
    except ValidationError as exc:
        msg = format_validation_error(exc, model, cfg._source, "model.tiny", lines=cfg._lines,
                                      overrides=cfg._overrides)
        raise ConfigError(f"{msg} (the tiny build of model family {entry.qualified})") from None


def _validate_nested(entry: Entry, opts: Any, key: str, cfg: RunConfig | None, registry: Registry,
                     depth: int) -> None:
    """Resolve and validate the components ``entry`` builds from its options (``Component.nested_components``)."""
    hook = getattr(entry.cls, "nested_components", None)
    if hook is None:
        return
    where = (lambda k: f"{cfg.origin(k)}: ") if cfg is not None else (lambda k: "")
    try:
        nested = list(hook(opts))
    except ValueError as exc:
        raise ConfigError(f"{where(key)}{key}: {exc}") from None
    if nested and depth >= 8:
        raise ConfigError(f"{where(key)}{key}: components nested more than 8 deep")
    for n in nested:
        sub_key = f"{key}.{n.key}"
        sub = _resolve(registry, n.kind, n.name, f"{key}.{n.name_key or n.key}", cfg)
        if n.options is not None:
            _validate_options(sub, n.options, sub_key, cfg, registry, depth + 1)


def _resolve(registry: Registry, kind: str, ref: str, key: str, cfg: RunConfig | None = None) -> Entry:
    try:
        return registry.resolve(kind, ref)
    except ComponentError as exc:
        where = f"{cfg.origin(key)}: " if cfg is not None else ""
        raise ConfigError(f"{where}{key}: {exc}") from None


def pick_device(registry: Registry, ref: str, options: dict[str, Any] | None = None,
                cfg: RunConfig | None = None, *, require_available: bool = True) -> tuple[Entry, list[str]]:
    """Resolve ``auto`` to the highest-priority usable device; check a named one is usable.

    ``available()`` is asked of an instance built with ``options`` where they validate (a
    device's availability may depend on them, e.g. which accelerator index), else defaults.
    Ties in priority go to the first registered (deterministic: entry points load sorted).
    With ``require_available=False`` (``--dry-run``: validate a GPU config on a laptop) a
    named device that is not usable here is accepted with a note instead of an error.
    """
    notes = []

    def usable(e: Entry) -> tuple[bool, str]:
        try:
            inst = e.cls.from_options(options or {})
        except ValidationError:
            inst = e.cls()
        return inst.available()

    if ref == "auto":
        ok_entries = []
        for e in registry.entries("devices"):
            ok, why = usable(e)
            if ok:
                ok_entries.append(e)
            else:
                notes.append(f"device {e.qualified} not usable: {why}")
        if not ok_entries:
            raise ConfigError("device: auto found no usable device: " + "; ".join(notes))
        best = max(e.cls.priority for e in ok_entries)
        return next(e for e in ok_entries if e.cls.priority == best), notes
    entry = _resolve(registry, "devices", ref, "device.name", cfg)
    ok, why = usable(entry)
    if not ok and not require_available:
        notes.append(f"device {entry.qualified} is not usable on this machine ({why}); a real run here would stop")
    elif not ok:
        usable_names = [e.qualified for e in registry.entries("devices") if usable(e)[0]]
        raise ConfigError(f"device.name: {entry.qualified} is not usable here: {why}. "
                          f"Usable devices: {', '.join(usable_names) or '(none)'} (or device.name=auto).")
    return entry, notes


def make_plan(cfg: RunConfig, registry: Registry, num_processes: int = 1, *,
              require_available: bool = True) -> Plan:
    """Resolve and validate every component of ``cfg``; raise :class:`ConfigError` on any problem.

    ``require_available=False`` (for ``--dry-run``) accepts a named device this machine lacks,
    with a note in :attr:`Plan.notes`, so a GPU recipe validates on a CPU-only machine.

    Every independent problem is reported at once (one :class:`ConfigError` listing them all),
    so fixing a config takes one round trip, not one per mistake.
    """
    errors: list[str] = []

    def check(fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one check; record its ConfigError and go on (``None`` = that part is unknown)."""
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            errors.append(str(exc))
            return None

    opts: dict[str, Any] = {}
    fam = None
    if not cfg.model.path and cfg.model.tiny is None:
        errors.append(f"{cfg.origin('model')}: model.path is required: a checkpoint folder or hub id "
                      "(or set model.family and model.tiny to build a tiny random checkpoint offline).")
    if cfg.model.family:
        fam = check(_resolve, registry, "models", cfg.model.family, "model.family", cfg)
        if fam is not None:
            opts["model"] = check(_validate_options, fam, cfg.model.options, "model.options", cfg, registry)
            if cfg.model.tiny is not None:
                check(_validate_tiny, fam, cfg)
    elif cfg.model.options:
        errors.append(f"{cfg.origin('model.options')}: model.options given without model.family; "
                      "name the family so they can be validated")
    elif cfg.model.path and Path(cfg.model.path, "config.json").is_file():
        fam = check(registry_family_for, registry, cfg.model.path)
        if fam is not None:
            opts["model"] = check(_validate_options, fam, {}, "model.options", cfg, registry)
    task = check(_resolve, registry, "tasks", cfg.task.name, "task.name", cfg)
    if task is not None:
        opts["task"] = check(_validate_options, task, cfg.task.options, "task.options", cfg, registry)
    rewards = []
    for i, r in enumerate(cfg.rewards):
        e = check(_resolve, registry, "rewards", r.name, f"rewards.{i}.name", cfg)
        if e is not None:
            opts[f"rewards.{i}"] = check(_validate_options, e, r.options, f"rewards.{i}.options", cfg, registry)
        rewards.append(e)
    if cfg.eval.enabled and cfg.eval.reward is not None and cfg.eval.reward not in [r.name for r in cfg.rewards]:
        errors.append(f"{cfg.origin('eval.reward')}: eval.reward {cfg.eval.reward!r} is not one of the "
                      f"configured rewards ({', '.join(r.name for r in cfg.rewards)}).")
    device, notes = check(pick_device, registry, cfg.device.name, cfg.device.options, cfg,
                          require_available=require_available) or (None, [])
    if device is not None:
        opts["device"] = check(_validate_options, device, cfg.device.options, "device.options", cfg, registry)
    device_here = device is not None and not any(n.startswith(f"device {device.qualified} is not usable")
                                                 for n in notes)
    rollout = check(_resolve, registry, "rollouts", cfg.rollout.name, "rollout.name", cfg)
    if rollout is not None:
        opts["rollout"] = check(_validate_options, rollout, cfg.rollout.options, "rollout.options", cfg, registry)
    # Which dtypes a device supports may depend on the hardware, so ask only a usable one.
    if cfg.model.dtype not in ("auto", "float32") and device_here and opts.get("device") is not None:
        supported = device.cls(opts["device"]).supported_dtypes()
        if cfg.model.dtype not in supported:
            errors.append(f"{cfg.origin('model.dtype')}: model.dtype: {cfg.model.dtype} is not supported by "
                          f"device {device.qualified} (supported: {', '.join(supported)})")
    batch = check(cfg.batch_plan, num_processes)
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{len(errors)} problems in the config:\n" + "\n".join(f"- {e}" for e in errors))
    return Plan(cfg, fam, task, rewards, device, rollout, opts, batch, notes)


def plan_without_groups(cfg: RunConfig, registry: Registry) -> Plan:
    """``make_plan`` (every component and option checked) minus GRPO's group arithmetic.

    In SFT ``train.per_device_batch_size`` counts samples, so it need not be a multiple of
    ``grpo.num_generations``; the components are validated on a copy whose batch divides.
    """
    probe = cfg.model_copy(deep=True)
    probe.train.per_device_batch_size = cfg.grpo.num_generations
    probe.train.gradient_accumulation_steps = 1
    probe._source, probe._lines, probe._overrides = cfg._source, cfg._lines, cfg._overrides
    plan = make_plan(probe, registry, 1)
    plan.config = cfg
    return plan


def families_for_model_type(registry: Registry, model_type: str | None) -> list[Entry]:
    """The families that claim ``model_type``; dedicated ones win over fallbacks.

    A fallback family (``ModelFamily.fallback``, e.g. vlmr1-plugin-generic's ``generic``)
    claims every model_type transformers can load; it is chosen only when no dedicated family
    claims the checkpoint.
    """
    hits = [e for e in registry.entries("models") if e.cls.handles(model_type)]
    dedicated = [e for e in hits if not getattr(e.cls, "fallback", False)]
    return dedicated or hits


def registry_family_for(registry: Registry, path: str | Path) -> Entry:
    """The model family whose ``model_types`` contain the checkpoint's ``config.model_type``."""
    cfg_file = Path(path) / "config.json"
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: cannot read {cfg_file}: {exc}") from None
    hits = families_for_model_type(registry, model_type)
    if len(hits) == 1:
        return hits[0]
    fams = ", ".join(f"{e.qualified} ({', '.join(e.cls.model_types) or 'any'})" for e in registry.entries("models"))
    if not hits:
        raise ConfigError(
            f"model.path: no installed model family handles model_type {model_type!r} of {path}. "
            f"Installed families: {fams or '(none)'}. Install a plugin for it or set model.family.")
    raise ConfigError(f"model.path: model_type {model_type!r} is claimed by several families "
                      f"({', '.join(e.qualified for e in hits)}); set model.family to choose one.")
