"""Resolve a validated config against the loaded plugins, before any weights load.

:func:`make_plan` checks that every named component exists (and is unambiguous), validates
each ``options`` block against the component's ``Options`` model, picks the device for
``auto``, and computes the batch arithmetic. ``--dry-run`` prints the result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.config import ConfigError, RunConfig, format_validation_error
from core.registry import ComponentError, Entry, Registry


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
                {"name": e.qualified, "weight": r.weight} for e, r in zip(self.rewards, self.config.rewards, strict=True)
            ],
            "device": self.device.qualified,
            "rollout": self.rollout.qualified,
            "batch": self.batch,
            "notes": self.notes,
        }


def _validate_options(entry: Entry, raw: dict[str, Any], key: str) -> Any:
    try:
        return entry.cls.Options.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, entry.cls.Options, f"options of {entry.kind[:-1]} {entry.qualified}", key)
        ) from None


def _resolve(registry: Registry, kind: str, ref: str, key: str) -> Entry:
    try:
        return registry.resolve(kind, ref)
    except ComponentError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def pick_device(registry: Registry, ref: str) -> tuple[Entry, list[str]]:
    """Resolve ``auto`` to the highest-priority usable device; check a named one is usable."""
    notes = []
    if ref == "auto":
        usable = []
        for e in registry.entries("devices"):
            ok, why = e.cls().available()
            if ok:
                usable.append(e)
            else:
                notes.append(f"device {e.qualified} not usable: {why}")
        if not usable:
            raise ConfigError("device: auto found no usable device")
        return max(usable, key=lambda e: e.cls.priority), notes
    entry = _resolve(registry, "devices", ref, "device.name")
    ok, why = entry.cls().available()
    if not ok:
        raise ConfigError(f"device.name: {entry.qualified} is not usable here: {why}")
    return entry, notes


def make_plan(cfg: RunConfig, registry: Registry, num_processes: int = 1) -> Plan:
    """Resolve and validate every component of ``cfg``; raise :class:`ConfigError` on any problem."""
    opts: dict[str, Any] = {}
    fam = None
    if cfg.model.family:
        fam = _resolve(registry, "models", cfg.model.family, "model.family")
        opts["model"] = _validate_options(fam, cfg.model.options, "model.options")
    elif cfg.model.options:
        raise ConfigError("model.options given without model.family; name the family so they can be validated")
    elif cfg.model.path and Path(cfg.model.path, "config.json").is_file():
        fam = registry_family_for(registry, cfg.model.path)
        opts["model"] = _validate_options(fam, {}, "model.options")
    task = _resolve(registry, "tasks", cfg.task.name, "task.name")
    opts["task"] = _validate_options(task, cfg.task.options, "task.options")
    rewards = []
    for i, r in enumerate(cfg.rewards):
        e = _resolve(registry, "rewards", r.name, f"rewards[{i}].name")
        opts[f"rewards.{i}"] = _validate_options(e, r.options, f"rewards.{i}.options")
        rewards.append(e)
    device, notes = pick_device(registry, cfg.device.name)
    opts["device"] = _validate_options(device, cfg.device.options, "device.options")
    rollout = _resolve(registry, "rollouts", cfg.rollout.name, "rollout.name")
    opts["rollout"] = _validate_options(rollout, cfg.rollout.options, "rollout.options")
    if cfg.model.dtype not in ("auto", "float32"):
        supported = device.cls().supported_dtypes()
        if cfg.model.dtype not in supported:
            raise ConfigError(f"model.dtype: {cfg.model.dtype} is not supported by device {device.qualified} "
                              f"(supported: {', '.join(supported)})")
    batch = cfg.batch_plan(num_processes)
    return Plan(cfg, fam, task, rewards, device, rollout, opts, batch, notes)


def registry_family_for(registry: Registry, path: str | Path) -> Entry:
    """The model family whose ``model_types`` contain the checkpoint's ``config.model_type``."""
    cfg_file = Path(path) / "config.json"
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: cannot read {cfg_file}: {exc}") from None
    hits = [e for e in registry.entries("models") if e.cls.handles(model_type)]
    if len(hits) == 1:
        return hits[0]
    fams = ", ".join(f"{e.qualified} ({', '.join(e.cls.model_types) or 'any'})" for e in registry.entries("models"))
    if not hits:
        raise ConfigError(
            f"model.path: no installed model family handles model_type {model_type!r} of {path}. "
            f"Installed families: {fams or '(none)'}. Install a plugin for it or set model.family.")
    raise ConfigError(f"model.path: model_type {model_type!r} is claimed by several families "
                      f"({', '.join(e.qualified for e in hits)}); set model.family to choose one.")
