"""pluggy hook specifications for vlmr1 plugins.

Registration hooks only, one per kind (the style of simonw/llm and hatch): each receives a
``register`` callable and hands it component *classes*. Behaviour lives in those classes;
the engine calls them directly and never a hook inside the training loop.

A plugin module looks like::

    from core.interfaces import hookimpl  # or: from core.hookspecs import hookimpl

    @hookimpl
    def vlmr1_register_rewards(register):
        register(MyReward)

Hook modules must import nothing heavy (torch_npu, vllm, openai ...) at import time; import
such libraries inside the component's methods. Every hook function needs ``@hookimpl`` and a
parameter named ``register``; the plugin host reports an undecorated hook or a misspelt hook
name as a failed plugin (pluggy alone would ignore both). See ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "vlmr1"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorator for plugin hook implementations.
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type], None]


@hookspec
def vlmr1_register_models(register: Register) -> None:
    """Register :class:`core.interfaces.ModelFamily` subclasses."""


@hookspec
def vlmr1_register_rewards(register: Register) -> None:
    """Register :class:`core.interfaces.Reward` subclasses."""


@hookspec
def vlmr1_register_tasks(register: Register) -> None:
    """Register :class:`core.interfaces.TaskFormat` subclasses."""


@hookspec
def vlmr1_register_devices(register: Register) -> None:
    """Register :class:`core.interfaces.Device` subclasses (RolloutEngine too, deprecated since 0.2)."""


@hookspec
def vlmr1_register_rollouts(register: Register) -> None:
    """Register :class:`core.interfaces.RolloutEngine` subclasses."""
