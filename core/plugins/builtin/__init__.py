"""Core's built-in plugin: CPU device, transformers rollout engine, ``accuracy`` router, ``mixture`` task.

An ordinary plugin like any ``vlmr1-plugin-*`` (it imports only ``core.hookspecs`` and
``core.interfaces``), registered by the plugin host first, as the distribution ``vlmr1``.
"""

from __future__ import annotations

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_devices(register) -> None:
    """The CPU device."""
    from core.plugins.builtin.cpu import CPUDevice

    register(CPUDevice)


@hookimpl
def vlmr1_register_rollouts(register) -> None:
    """The transformers ``generate`` rollout engine."""
    from core.plugins.builtin.rollout import TransformersRollout

    register(TransformersRollout)


@hookimpl
def vlmr1_register_rewards(register) -> None:
    """The ``accuracy`` router."""
    from core.plugins.builtin.accuracy import AccuracyRouter

    register(AccuracyRouter)


@hookimpl
def vlmr1_register_tasks(register) -> None:
    """The ``mixture`` task (several tasks as one)."""
    from core.plugins.builtin.mixture import TaskMixture

    register(TaskMixture)
