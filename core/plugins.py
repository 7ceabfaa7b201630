"""The plugin host: load ``vlmr1`` entry points, collect components, report status.

Usage::

    python -m core.plugins list [--json] [--kind models|rewards|tasks|devices|rollouts] [--plugins a,b]

Loading is deterministic (entry points sorted by distribution then name, so every rank of
a distributed run registers components in the same order). A plugin that fails to import,
whose hooks raise, or that requires an incompatible ``vlmr1`` is recorded with its
distribution, version and traceback and skipped; it breaks only runs that need one of its
components (``strict=True`` makes any failure fatal).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import pluggy
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

from core import __version__, hookspecs
from core.registry import HOOK_KINDS, KINDS, Registry, normalize_dist, short_dist

ENTRY_POINT_GROUP = "vlmr1"
BUILTIN = "vlmr1"


class PluginError(RuntimeError):
    """A plugin could not be loaded (raised in strict mode, or for an explicitly selected plugin)."""


@dataclass
class PluginInfo:
    """What ``core.plugins list`` reports for one plugin."""

    distribution: str
    version: str
    entry_point: str
    status: str = "loaded"  # loaded | failed | incompatible | not selected
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
            "status": self.status,
            "error": self.error,
            "hooks": self.hooks,
            "components": self.components,
        }


def parse_selection(plugins: str | list[str] | None) -> set[str] | None:
    """``None`` = load all; empty set = built-ins only (``none``); else short dist names."""
    if plugins is None:
        return None
    items = plugins.split(",") if isinstance(plugins, str) else list(plugins)
    items = [p.strip() for p in items if p.strip()]
    if items == ["all"]:
        return None
    if items in ([], ["none"]):
        return set()
    return {short_dist(p) for p in items}


class PluginHost:
    """Loads plugins into a pluggy manager and collects their components into a registry."""

    def __init__(self, plugins: str | list[str] | None = None, *, strict: bool = False,
                 autoload: bool = True) -> None:
        self.selection = parse_selection(plugins)
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.infos: list[PluginInfo] = []
        self._register_object(importlib.import_module("core.builtins"), BUILTIN, __version__, "core.builtins")
        if autoload:
            self.load_entry_points()

    # ---- loading -----------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load every (selected) entry point of the ``vlmr1`` group, in a fixed order."""
        eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda ep: (normalize_dist(ep.dist.name if ep.dist else ""), ep.name))
        seen: set[str] = set()
        for ep in eps:
            dist = ep.dist.name if ep.dist else ep.name
            version = ep.dist.version if ep.dist else "?"
            seen.add(short_dist(dist))
            if self.selection is not None and short_dist(dist) not in self.selection:
                self.infos.append(PluginInfo(dist, version, ep.value, status="not selected"))
                continue
            problem = _incompatibility(ep.dist)
            if problem:
                self._fail(PluginInfo(dist, version, ep.value, status="incompatible", error=problem))
                continue
            try:
                module = ep.load()
            except Exception:
                self._fail(PluginInfo(dist, version, ep.value, status="failed",
                                      error=traceback.format_exc()))
                continue
            self._register_object(module, dist, version, ep.value)
        if self.selection:
            missing = sorted(self.selection - seen)
            if missing:
                installed = sorted(seen) or ["(none)"]
                raise PluginError(
                    f"--plugins names {', '.join(missing)}, which is not installed. "
                    f"Installed vlmr1 plugins: {', '.join(installed)}."
                )

    def register(self, obj: Any, distribution: str, version: str = "0") -> PluginInfo:
        """Register an in-process plugin object or module (tests, notebooks)."""
        return self._register_object(obj, distribution, version, repr(obj))

    def _register_object(self, obj: Any, dist: str, version: str, ep_value: str) -> PluginInfo:
        info = PluginInfo(dist, version, ep_value)
        try:
            self.pm.register(obj, name=f"{dist}:{ep_value}")
        except ValueError as exc:  # pluggy: already registered / no hookimpl with that name
            info.status, info.error = "failed", str(exc)
            return self._fail(info)
        # Call each hook of this one plugin ourselves so every component is attributed to
        # its distribution (a plain pm.hook call would merge all providers anonymously).
        before = {k: len(self.registry.entries(k)) for k in KINDS}
        try:
            for hook_name, kinds in HOOK_KINDS.items():
                impl = getattr(obj, hook_name, None)
                if impl is None:
                    continue
                info.hooks.append(hook_name)
                impl(register=self.registry.registrar(dist, kinds))
        except Exception:
            self.pm.unregister(obj)
            # Drop the half-registered components of this plugin.
            for k in KINDS:
                self.registry._entries[k] = self.registry._entries[k][: before[k]]
            info.status, info.error = "failed", traceback.format_exc()
            return self._fail(info)
        info.components = {k: [e.name for e in self.registry.entries(k)[before[k]:]] for k in KINDS}
        info.components = {k: v for k, v in info.components.items() if v}
        self.infos.append(info)
        return info

    def _fail(self, info: PluginInfo) -> PluginInfo:
        self.infos.append(info)
        last = (info.error or "").strip().splitlines()[-1:] or [""]
        self.registry.failure_notes.append(
            f"plugin {info.distribution} {info.version} {info.status} ({last[0]}); "
            "run `python -m core.plugins list` for the traceback"
        )
        if self.strict:
            raise PluginError(f"plugin {info.distribution} {info.version} {info.status}:\n{info.error}")
        return info

    # ---- reporting -----------------------------------------------------------------
    def failures(self) -> list[PluginInfo]:
        """Plugins that failed or were refused."""
        return [i for i in self.infos if i.status in ("failed", "incompatible")]


def _incompatibility(dist: md.Distribution | None) -> str | None:
    """A message if ``dist`` declares a ``vlmr1`` requirement this core does not satisfy."""
    if dist is None:
        return None
    for raw in dist.requires or []:
        try:
            req = Requirement(raw)
        except InvalidRequirement:
            continue
        if normalize_dist(req.name) != "vlmr1" or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        if req.specifier and not req.specifier.contains(Version(__version__), prereleases=True):
            return (f"{dist.name} {dist.version} requires vlmr1{req.specifier}, but vlmr1 {__version__} "
                    f"is installed; upgrade the plugin or install a matching vlmr1")
    return None


# ---- command line ---------------------------------------------------------------------
def _print_table(host: PluginHost, kind: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vlmr1 {__version__} plugins")
    for col in ("plugin", "version", "status", "hooks", "components"):
        table.add_column(col)
    for info in host.infos:
        comps = {k: v for k, v in info.components.items() if kind in (None, k)}
        if kind and not comps and info.status == "loaded":
            continue
        comp_text = "\n".join(f"{k}: {', '.join(v)}" for k, v in comps.items())
        if info.error:
            comp_text = (comp_text + "\n" if comp_text else "") + info.error.strip().splitlines()[-1]
        style = {"loaded": "green", "not selected": "dim"}.get(info.status, "red")
        table.add_row(info.distribution, info.version, f"[{style}]{info.status}[/]",
                      "\n".join(h.replace("vlmr1_register_", "") for h in info.hooks), comp_text)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m core.plugins``."""
    parser = argparse.ArgumentParser(prog="python -m core.plugins", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    lst = sub.add_parser("list", help="list installed plugins, their components and load status")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.add_argument("--kind", choices=sorted(KINDS), help="only components of this kind")
    lst.add_argument("--plugins", default=None, help="comma-separated distributions to load (default: all)")
    args = parser.parse_args(argv)
    try:
        host = PluginHost(args.plugins)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        infos = [i.as_dict() for i in host.infos]
        if args.kind:
            for d in infos:
                d["components"] = {k: v for k, v in d["components"].items() if k == args.kind}
        json.dump({"vlmr1": __version__, "plugins": infos}, sys.stdout, indent=2)
        print()
    else:
        _print_table(host, args.kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
