"""The shared library every app and engine stands on.

One home each: :mod:`~core.runtime.loader` (the model loader), :mod:`~core.runtime.generation`
(prompts, rollouts and reward items), :mod:`~core.runtime.reward_runner` (rewards under time
limits, isolated per row), :mod:`~core.runtime.evaluator` (the one evaluator),
:mod:`~core.runtime.checkpoint` (crash-safe, pickle-free checkpoints),
:mod:`~core.runtime.distributed` (the one ``Accelerator``: the launched backend, or a refusal) and
:mod:`~core.runtime.runlog` (metrics.jsonl, TensorBoard, completions).
"""
