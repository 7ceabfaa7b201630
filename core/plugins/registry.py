"""The component registry: which plugin provides which named component of which kind.

Names are addressed as ``name`` or ``distribution:name``. Two providers of one bare name
are both kept; asking for the bare name is then an error that lists them (never a silent
overwrite).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from core.interfaces import Device, ModelFamily, Reward, RolloutEngine, TaskFormat

#: kind name -> interface base class.
KINDS: dict[str, type] = {
    "models": ModelFamily,
    "rewards": Reward,
    "tasks": TaskFormat,
    "devices": Device,
    "rollouts": RolloutEngine,
}
#: hook name -> the kinds its ``register`` accepts, one hook per kind.
HOOK_KINDS: dict[str, tuple[str, ...]] = {
    "vlmr1_register_models": ("models",),
    "vlmr1_register_rewards": ("rewards",),
    "vlmr1_register_tasks": ("tasks",),
    "vlmr1_register_devices": ("devices", "rollouts"),  # rollouts: deprecated, see DEPRECATED_HOOK_KINDS
    "vlmr1_register_rollouts": ("rollouts",),
}
#: (hook, kind) still accepted for one version -> the hook to use instead. vlmr1 0.1 registered
#: rollout engines through the devices hook; 0.2 accepts that with a DeprecationWarning, 0.3 will not.
DEPRECATED_HOOK_KINDS: dict[tuple[str, str], str] = {
    ("vlmr1_register_devices", "rollouts"): "vlmr1_register_rollouts",
}
SINGULAR = {"models": "model family", "rewards": "reward", "tasks": "task", "devices": "device",
            "rollouts": "rollout engine"}


class ComponentError(LookupError):
    """A component name that is unknown, ambiguous, or of the wrong type."""


@dataclass(frozen=True)
class Entry:
    """One registered component: its kind, name, class and providing distribution."""

    kind: str
    name: str
    cls: type
    provider: str

    @property
    def qualified(self) -> str:
        """``distribution:name``."""
        return f"{self.provider}:{self.name}"

    @property
    def description(self) -> str:
        """The class's one-line ``description`` (or the first line of its docstring)."""
        text = getattr(self.cls, "description", "") or (inspect.getdoc(self.cls) or "")
        return text.strip().splitlines()[0] if text.strip() else ""


class Registry:
    """Components by kind, each possibly provided by several distributions."""

    def __init__(self) -> None:
        self._entries: dict[str, list[Entry]] = {k: [] for k in KINDS}
        # Notes about plugins that failed, appended to lookup errors so a user learns that
        # the component they want may live in a plugin that did not load.
        self.failure_notes: list[str] = []
        # (kind, name) -> installed distributions that provide it but were not selected by
        # --plugins; set by the plugin host, asked only when a lookup fails.
        self.unselected_providers: Callable[[str, str], list[str]] | None = None

    def registrar(self, provider: str, kinds: tuple[str, ...]) -> Callable[[type], None]:
        """Return the ``register`` callable handed to one plugin's hook."""

        def register(cls: type) -> None:
            for kind in kinds:
                if isinstance(cls, type) and issubclass(cls, KINDS[kind]):
                    self.add(kind, cls, provider)
                    return
            wanted = " or ".join(KINDS[k].__name__ for k in kinds)
            raise TypeError(f"{provider}: register() got {cls!r}, expected a subclass of {wanted}")

        return register

    def add(self, kind: str, cls: type, provider: str) -> None:
        """Register ``cls`` under its ``name``; the same provider may not register a name twice.

        Raises ``TypeError`` for a class that cannot work as a component (no usable ``name``,
        ``Options`` not a pydantic model or not ``extra="forbid"``, abstract methods left
        unimplemented), so the plugin fails at load time with a message instead of at the
        first training step (or never, for an option silently ignored).
        """
        if not (isinstance(cls, type) and issubclass(cls, KINDS[kind])):
            raise TypeError(f"{provider}: {cls!r} is not a subclass of {KINDS[kind].__name__}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or ":" in name or name != name.strip() or " " in name:
            raise TypeError(
                f"{provider}: {cls.__qualname__} needs a class attribute `name` (a non-empty string "
                f"without ':' or spaces), got {name!r}")
        options = getattr(cls, "Options", None)
        if not (isinstance(options, type) and issubclass(options, BaseModel)):
            raise TypeError(f"{provider}: {cls.__qualname__}.Options must be a pydantic BaseModel subclass, "
                            f"got {options!r}")
        if options.model_config.get("extra") != "forbid":
            # Without it a misspelt option ("temprature") is silently dropped and the default used.
            raise TypeError(f"{provider}: {cls.__qualname__}.Options must set "
                            f"model_config = ConfigDict(extra=\"forbid\") so that a misspelt option is an error; "
                            f"it has extra={options.model_config.get('extra', 'ignore')!r}")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            raise TypeError(f"{provider}: {SINGULAR[kind]} {name!r} ({cls.__qualname__}) does not implement "
                            f"the abstract method(s) {missing}")
        for e in self._entries[kind]:
            if e.name == name and e.provider == provider:
                raise ValueError(f"{provider} registers {SINGULAR[kind]} {name!r} twice")
        self._entries[kind].append(Entry(kind, name, cls, provider))

    def entries(self, kind: str | None = None) -> list[Entry]:
        """All entries, or those of one kind, in registration order."""
        if kind is not None:
            return list(self._entries[kind])
        return [e for k in KINDS for e in self._entries[k]]

    def names(self, kind: str) -> list[str]:
        """Addressable names of one kind (bare where unique, qualified where ambiguous)."""
        out = []
        for e in self._entries[kind]:
            dup = sum(1 for o in self._entries[kind] if o.name == e.name) > 1
            out.append(e.qualified if dup else e.name)
        return out

    def resolve(self, kind: str, ref: str) -> Entry:
        """Find the entry for ``name`` or ``distribution:name``; raise a helpful error otherwise.

        The distribution may be written with or without the ``vlmr1-plugin-`` prefix
        (``vlmr1-plugin-math:accuracy`` and ``math:accuracy`` are the same component).
        """
        if kind not in KINDS:
            raise ComponentError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        what = SINGULAR[kind]
        if ":" in ref:
            provider, name = ref.split(":", 1)
            hits = [e for e in self._entries[kind] if e.name == name and _same_dist(e.provider, provider)]
        else:
            hits = [e for e in self._entries[kind] if e.name == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            provs = ", ".join(e.provider for e in hits)
            raise ComponentError(
                f"{what} {ref!r} is ambiguous: it is provided by {len(hits)} plugins ({provs}). "
                f"Name the one you mean as 'distribution:name', i.e. "
                f"{' or '.join(repr(e.qualified) for e in hits)}."
            )
        known = self.names(kind)
        msg = f"no {what} named {ref!r}."
        close = difflib.get_close_matches(ref, known, n=3, cutoff=0.5)
        if close:
            msg += f" Did you mean {' or '.join(repr(c) for c in close)}?"
        msg += f" Available {kind}: {', '.join(known) if known else '(none)'}."
        bare = ref.split(":", 1)[-1]
        elsewhere = self.unselected_providers(kind, bare) if self.unselected_providers else []
        if elsewhere:
            short = ",".join(short_dist(d) for d in elsewhere)
            msg += (f" {what.capitalize()} {bare!r} is provided by {', '.join(elsewhere)}, installed but not selected "
                    f"by --plugins (or the config's `plugins:` list): add {short} to it.")
        if self.failure_notes:
            msg += " Note: " + "; ".join(self.failure_notes)
        raise ComponentError(msg)

    def providers(self, kind: str, name: str) -> list[str]:
        """Distributions that provide a component called ``name`` of ``kind``."""
        return [e.provider for e in self._entries[kind] if e.name == name]

    def get(self, kind: str, ref: str) -> type:
        """The class registered as ``ref``."""
        return self.resolve(kind, ref).cls

    def create(self, kind: str, ref: str, options: dict[str, Any] | None = None) -> Any:
        """Instantiate ``ref`` with its options validated against its ``Options`` model.

        A component that builds other components itself (the ``mixture`` task) defines
        ``bind_registry(registry)``; it is called here with this registry.
        """
        inst = self.get(kind, ref).from_options(options)
        bind = getattr(inst, "bind_registry", None)
        if callable(bind):
            bind(self)
        return inst


def normalize_dist(name: str) -> str:
    """Canonical distribution name: lower case, ``_``/``.`` -> ``-``, ``vlmr1-plugin-`` kept."""
    return name.lower().replace("_", "-").replace(".", "-")


def short_dist(name: str) -> str:
    """Distribution name without the ``vlmr1-plugin-`` prefix (for ``--plugins``)."""
    n = normalize_dist(name)
    return n[len("vlmr1-plugin-"):] if n.startswith("vlmr1-plugin-") else n


def _same_dist(a: str, b: str) -> bool:
    return short_dist(a) == short_dist(b)
