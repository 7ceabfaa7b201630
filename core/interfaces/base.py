"""The base class every plugin component derives from.

A *component* is a class a plugin hands to the registry: a model family, a reward, a task
format, a compute device or a rollout engine. Each carries a pydantic ``Options`` model that
the run's config is validated against before any weights load.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    """Options model for components that take none: any key given is an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class NestedComponent:
    """A component that another component builds from its own options (see ``Component.nested_components``).

    Attributes:
        kind: the registry kind (``"rewards"``, ``"tasks"``, ...).
        name: the component's name (``name`` or ``distribution:name``), as the user wrote it.
        key: where, relative to the parent's ``options``, the nested options live (dotted, e.g.
            ``"reward_options.iou"``); errors are reported at ``<parent key>.<key>.<option>``.
        options: the raw options to validate against the nested component's ``Options``, or
            ``None`` to check only that ``name`` resolves.
        name_key: where ``name`` was written, if not at ``key`` (e.g. ``"correctness_reward"``).
    """

    kind: str
    name: str
    key: str
    options: dict[str, Any] | None = None
    name_key: str | None = None


class Component(ABC):
    """Base of every pluggable component.

    Subclasses set ``name`` (the config-facing identifier, unique per plugin), an optional
    one-line ``description`` and an ``Options`` pydantic model with ``extra="forbid"``
    (required: the registry refuses a component without it, so misspelt options are caught).
    The host instantiates a component with its validated options:
    ``Cls(Cls.Options.model_validate(raw))``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def nested_components(cls, options: Any) -> list[NestedComponent]:
        """Components this one will build from its (already validated) ``options``; default none.

        Override when ``options`` name other components and carry their options (a router's
        per-reward ``reward_options``): :func:`core.plugins.plan.make_plan` (and so ``--dry-run``)
        then resolves each name and validates each options block against that component's
        ``Options`` before any weights load, recursively, reporting errors at the full key
        (``rewards.0.options.reward_options.iou.foo``) with the config file's line. Raise
        ``ValueError`` for a problem the options models cannot express; it is reported at the
        component's ``options`` key. Must not build anything or touch resources.
        """
        return []

    @classmethod
    def from_options(cls, raw: dict[str, Any] | BaseModel | None = None) -> Component:
        """Validate ``raw`` against ``Options`` and build the component."""
        if isinstance(raw, BaseModel):
            return cls(raw)
        return cls(cls.Options.model_validate(raw or {}))
