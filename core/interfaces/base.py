"""The base class every plugin component derives from.

A *component* is a class a plugin hands to the registry: a model family, a reward, a task
format, a compute device or a rollout engine. Each carries a pydantic ``Options`` model that
the run's config is validated against before any weights load.
"""

from __future__ import annotations

from abc import ABC
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    """Options model for components that take none: any key given is an error."""

    model_config = ConfigDict(extra="forbid")


class Component(ABC):
    """Base of every pluggable component.

    Subclasses set ``name`` (the config-facing identifier, unique per plugin), an optional
    one-line ``description`` and an ``Options`` pydantic model (``extra="forbid"`` is
    recommended so misspelt options are caught). The host instantiates a component with
    its validated options: ``Cls(Cls.Options.model_validate(raw))``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def from_options(cls, raw: dict[str, Any] | BaseModel | None = None) -> Component:
        """Validate ``raw`` against ``Options`` and build the component."""
        if isinstance(raw, BaseModel):
            return cls(raw)
        return cls(cls.Options.model_validate(raw or {}))
