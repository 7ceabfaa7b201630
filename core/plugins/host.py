"""The plugin host: load ``vlmr1`` entry points, collect components, report status.

Usage::

    python -m core.plugins list [--json] [--kind models|rewards|tasks|devices|rollouts] [--plugins a,b]

(the command is :mod:`core.plugins.__main__`).

Loading is deterministic (entry points sorted by distribution then name, so every rank of
a distributed run registers components in the same order). A plugin that fails to import,
whose hooks raise (``sys.exit()`` included: never the host's own exit), or that requires an
incompatible ``vlmr1`` is recorded with its distribution, version and traceback and skipped;
it breaks only runs that need one of its components (``strict=True`` makes any failure fatal).
``list`` exits 0 even then: it is the tool for finding out what is broken.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

from core import __version__, hookspecs
from core.plugins.registry import (
    DEPRECATED_HOOK_KINDS,
    HOOK_KINDS,
    KINDS,
    SINGULAR,
    Registry,
    normalize_dist,
    short_dist,
)

ENTRY_POINT_GROUP = "vlmr1"
#: The distribution name under which core's built-in components are registered.
BUILTIN = "vlmr1"
#: Load states a plugin can end in.
STATUSES = ("loaded", "failed", "incompatible", "not selected")


class PluginError(RuntimeError):
    """A plugin could not be loaded (strict mode), or ``--plugins`` names one that is not installed."""


@dataclass
class PluginInfo:
    """What ``core.plugins list`` reports for one plugin (one entry point)."""

    distribution: str
    version: str
    entry_point: str
    status: str = "loaded"  # one of STATUSES
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    #: Deprecations the plugin relies on (it still loads); shown by ``list`` and at run start.
    warnings: list[str] = field(default_factory=list)

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
            "warnings": self.warnings,
        }


def parse_selection(plugins: str | list[str] | None) -> set[str] | None:
    """``None`` = load all; empty set = built-ins only (``none``); else short dist names.

    Names may carry the ``vlmr1-plugin-`` prefix or not, and any case or ``_``/``-`` spelling
    (``vlmr1-plugin-qwen-vl``, ``qwen_vl`` and ``Qwen-VL`` select the same distribution).
    Naming core itself (``vlmr1``) is allowed and changes nothing: built-ins always load.
    """
    if plugins is None:
        return None
    items = plugins.split(",") if isinstance(plugins, str) else list(plugins)
    items = [p.strip() for p in items if p and p.strip()]
    if [i.lower() for i in items] == ["all"]:
        return None
    if [i.lower() for i in items] in ([], ["none"]):
        return set()
    return {short_dist(p) for p in items} - {BUILTIN}


class PluginHost:
    """Loads plugins into a pluggy manager and collects their components into a registry.

    Args:
        plugins: ``None`` (every installed plugin), ``"none"`` (built-ins only), or the
            distributions to load as a comma-separated string or a list.
        strict: raise :class:`PluginError` at the first plugin that fails or is refused.
        autoload: load entry points now; ``False`` gives a host with only the built-ins
            (tests register plugin objects with :meth:`register`).
    """

    def __init__(self, plugins: str | list[str] | None = None, *, strict: bool = False,
                 autoload: bool = True) -> None:
        self.selection = parse_selection(plugins)
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.infos: list[PluginInfo] = []
        self._entry_points_loaded = False
        self._unselected: list[tuple[str, md.EntryPoint]] = []
        self._unselected_components: dict[str, dict[str, list[str]]] | None = None
        self.registry.unselected_providers = self._unselected_providers
        builtin = "core.plugins.builtin"
        self._register_object(importlib.import_module(builtin), BUILTIN, __version__, builtin)
        if autoload:
            self.load_entry_points()

    # ---- loading -----------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load every (selected) entry point of the ``vlmr1`` group, in a fixed order."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        # importlib.metadata already de-duplicates distributions by name (first on sys.path
        # wins); sorting makes the order independent of sys.path and filesystem order.
        eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda ep: (normalize_dist(ep.dist.name if ep.dist else ""), ep.name, ep.value))
        seen: dict[str, str] = {}
        for ep in eps:
            dist = ep.dist.name if ep.dist else ep.name
            version = ep.dist.version if ep.dist else "?"
            seen[short_dist(dist)] = dist
            if self.selection is not None and short_dist(dist) not in self.selection:
                self.infos.append(PluginInfo(dist, version, ep.value, status="not selected"))
                self._unselected.append((dist, ep))
                continue
            problem = _incompatibility(ep.dist)
            if problem:
                self._fail(PluginInfo(dist, version, ep.value, status="incompatible", error=problem))
                continue
            try:
                module = ep.load()
            except Exception:
                self._fail(PluginInfo(dist, version, ep.value, status="failed",
                                      error=f"importing entry point {ep.name} = {ep.value} failed:\n"
                                            + traceback.format_exc()))
                continue
            except SystemExit as exc:
                # sys.exit() in a plugin's module body must not end the host's process (exit 0
                # and no output): it is that plugin's failure.
                self._fail(PluginInfo(dist, version, ep.value, status="failed",
                                      error=f"importing entry point {ep.name} = {ep.value} failed:\n"
                                            + traceback.format_exc() + _exit_reason(exc)))
                continue
            self._register_object(module, dist, version, ep.value)
        if self.selection:
            missing = sorted(self.selection - set(seen))
            if missing:
                hints = []
                for m in missing:
                    close = difflib.get_close_matches(m, list(seen), n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{m!r} -> did you mean {close[0]!r}?")
                installed = ", ".join(sorted(seen.values())) or "(none)"
                raise PluginError(
                    f"--plugins names {', '.join(missing)}, which is not installed"
                    + (f" ({'; '.join(hints)})" if hints else "")
                    + f". Installed vlmr1 plugins: {installed}. Install it (pip install vlmr1-plugin-NAME) "
                    "or leave it out of --plugins / the config's `plugins:` list."
                )

    def _unselected_providers(self, kind: str, name: str) -> list[str]:
        """Installed but unselected distributions that register ``name`` of ``kind``.

        Asked only when a lookup fails, so the unselected plugins are imported (into a scratch
        registry, never into this one) only on that error path; one that fails to import is skipped.
        """
        if self._unselected_components is None:
            self._unselected_components = {}
            for dist, ep in self._unselected:
                scratch = Registry()
                try:
                    module = ep.load()
                    for hook_name, kinds in HOOK_KINDS.items():
                        fn = getattr(module, hook_name, None)
                        if callable(fn):
                            fn(register=scratch.registrar(dist, kinds))
                except (Exception, SystemExit):  # noqa: BLE001 - a hint must never turn into a new error
                    pass
                found = self._unselected_components.setdefault(dist, {})
                for k in KINDS:
                    found.setdefault(k, []).extend(e.name for e in scratch.entries(k))
        return sorted(d for d, comps in self._unselected_components.items() if name in comps.get(kind, []))

    def register(self, obj: Any, distribution: str, version: str = "0") -> PluginInfo:
        """Register an in-process plugin object or module (tests, notebooks).

        Failures are handled as for installed plugins: recorded in :attr:`infos` (check
        ``info.status``), or raised as :class:`PluginError` in strict mode.
        """
        return self._register_object(obj, distribution, version, getattr(obj, "__name__", repr(obj)))

    def _register_object(self, obj: Any, dist: str, version: str, ep_value: str) -> PluginInfo:
        info = PluginInfo(dist, version, ep_value)
        problem = self._hook_problems(obj)
        if problem:
            info.status, info.error = "failed", problem
            return self._fail(info)
        try:
            self.pm.register(obj, name=f"{dist}:{ep_value}")
        except Exception as exc:  # pluggy: already registered (ValueError), bad hook signature (PluginValidationError)
            info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"
            return self._fail(info)
        # Call each hook of this one plugin ourselves so every component is attributed to
        # its distribution (a plain pm.hook call would merge all providers anonymously).
        before = {k: len(self.registry.entries(k)) for k in KINDS}
        try:
            for hook_name, kinds in HOOK_KINDS.items():
                if self.pm.parse_hookimpl_opts(obj, hook_name) is None:
                    continue
                info.hooks.append(hook_name)
                counts = {k: len(self.registry.entries(k)) for k in kinds}
                getattr(obj, hook_name)(register=self.registry.registrar(dist, kinds))
                for kind in kinds:
                    instead = DEPRECATED_HOOK_KINDS.get((hook_name, kind))
                    added = [e.name for e in self.registry.entries(kind)[counts[kind]:]]
                    if instead and added:
                        info.warnings.append(
                            f"plugin {dist} registers {SINGULAR[kind]}(s) {', '.join(added)} through {hook_name}, "
                            f"deprecated since vlmr1 0.2 (removed in 0.3): register them with {instead} instead")
        except (Exception, SystemExit) as exc:  # a hook calling sys.exit() fails its plugin, not the process
            self.pm.unregister(obj)
            # Drop the half-registered components of this plugin: all or nothing.
            for k in KINDS:
                self.registry._entries[k] = self.registry._entries[k][: before[k]]
            hook = info.hooks[-1] if info.hooks else "registration"
            info.status, info.error = "failed", f"hook {hook} raised:\n" + traceback.format_exc()
            if isinstance(exc, SystemExit):
                info.error += _exit_reason(exc)
            return self._fail(info)
        comps = {k: [e.name for e in self.registry.entries(k)[before[k]:]] for k in KINDS}
        info.components = {k: v for k, v in comps.items() if v}
        self.infos.append(info)
        for message in info.warnings:
            # Python hides DeprecationWarning outside __main__ by default; the plugin list and
            # warn_failures() show the same text.
            warnings.warn(message, DeprecationWarning, stacklevel=2)
        return info

    def _hook_problems(self, obj: Any) -> str | None:
        """Reject hook-like functions pluggy would silently ignore (typos, missing ``@hookimpl``)."""
        problems = []
        for attr in sorted(a for a in dir(obj) if a.startswith("vlmr1_")):
            marked = self.pm.parse_hookimpl_opts(obj, attr) is not None
            if attr in HOOK_KINDS:
                if not marked and callable(getattr(obj, attr)):
                    problems.append(f"{attr} is not decorated with @hookimpl "
                                    "(from core.hookspecs import hookimpl)")
            elif marked:
                close = difflib.get_close_matches(attr, list(HOOK_KINDS), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else ""
                problems.append(f"unknown hook {attr}{hint} Hooks are: {', '.join(HOOK_KINDS)}")
        return "; ".join(problems) or None

    def _fail(self, info: PluginInfo) -> PluginInfo:
        self.infos.append(info)
        last = (info.error or "").strip().splitlines()[-1:] or [""]
        self.registry.failure_notes.append(
            f"plugin {info.distribution} {info.version} {info.status} ({last[0]}); "
            "run `python -m core.plugins list` for the traceback"
        )
        if self.strict:
            raise PluginError(f"plugin {info.distribution} {info.version} {info.status} "
                              f"(strict mode):\n{info.error}")
        return info

    # ---- reporting -----------------------------------------------------------------
    def failures(self) -> list[PluginInfo]:
        """Plugins that failed or were refused."""
        return [i for i in self.infos if i.status in ("failed", "incompatible")]

    def warn_failures(self, file: Any = None) -> None:
        """One warning line per failed plugin, printed at the start of every run (train, evaluate, serve).

        A failed plugin breaks only the runs that need it, so a run that does not need it goes on;
        the line makes sure nobody has to guess why a component is missing. Deprecations a loaded
        plugin relies on get one line each too.
        """
        for f in self.failures():
            last = (f.error or "").strip().splitlines()[-1:] or [""]
            print(f"warning: plugin {f.distribution} {f.version} {f.status} ({last[0][:160]}); "
                  "run `python -m core.plugins list` for the traceback", file=file or sys.stderr)
        for info in self.infos:
            for message in info.warnings:
                print(f"warning: {message}", file=file or sys.stderr)

    def as_json(self, kind: str | None = None) -> dict[str, Any]:
        """What ``list --json`` prints: plugins with status, plus every component by kind.

        With ``kind``, plugins that loaded but provide nothing of that kind are left out
        (failed ones stay: what they would have provided is unknown).
        """
        plugins = []
        for info in self.infos:
            d = info.as_dict()
            if kind:
                d["components"] = {k: v for k, v in d["components"].items() if k == kind}
                if info.status in ("loaded", "not selected") and not d["components"]:
                    continue
            plugins.append(d)
        components: dict[str, list[dict[str, str]]] = {}
        for k in KINDS if kind is None else (kind,):
            addressable = self.registry.names(k)
            components[k] = [
                {"name": a, "qualified": e.qualified, "provider": e.provider, "description": e.description}
                for a, e in zip(addressable, self.registry.entries(k), strict=True)
            ]
        return {"vlmr1": __version__, "plugins": plugins, "components": components}


def _exit_reason(exc: SystemExit) -> str:
    """The last line of a failed plugin's error for ``sys.exit()``: the code and where it was called."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"SystemExit: the plugin called sys.exit({exc.code!r}){where} while loading"


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
                    f"is installed; install a release of {dist.name} built for vlmr1 {__version__} "
                    f"or a vlmr1 that matches {req.specifier}. The plugin was not imported.")
    return None


# ---- command line ---------------------------------------------------------------------
