"""The built-in ``mixture`` task: train and evaluate on several tasks at once.

``task: {name: mixture, options: {tasks: [{name, options, weight, label}, ...]}}``. Each entry is
any installed task with its own options (validated by ``--dry-run`` like any other options
block, through :meth:`TaskMixture.nested_components`). Every sample keeps its own solution and
``reward_method``, so the ``accuracy`` router scores each row with its own reward; it also
carries which entry it came from (``meta["subtask"]``, and ``meta["dataset"]``, which the
evaluator groups by), so evaluation reports every sub-task separately.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, overload

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.interfaces import NestedComponent, Sample, TaskFormat


class MixtureEntry(BaseModel):
    """One task of a mixture."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="an installed task (name or distribution:name)")
    options: dict[str, Any] = Field(default_factory=dict, description="that task's options")
    weight: float = Field(1.0, gt=0, description="share of the train split, relative to the other entries")
    label: str | None = Field(None, min_length=1, description="name in sample ids and per-task metrics; "
                                                              "default: the task name")

    @property
    def key(self) -> str:
        """The label, else the bare task name."""
        return self.label or self.name.split(":")[-1]


class _Tagged(Sequence[Sample]):
    """Samples of one entry, re-tagged on access (ids prefixed with the label, ``subtask``/``dataset`` set)."""

    def __init__(self, label: str, samples: Sequence[Sample]) -> None:
        self.label, self.samples = label, samples

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        s = self.samples[index]
        meta = dict(s.meta or {})
        inner = meta.get("dataset")
        meta["subtask"] = self.label
        # A sub-task that already names datasets (a JSONL with several sources) keeps them, under its label.
        meta["dataset"] = f"{self.label}/{inner}" if inner else self.label
        # A copy: a task may cache its Sample objects, and two entries may share one task.
        sid = s.id if s.id.startswith(self.label + "/") else f"{self.label}/{s.id}"
        return dataclasses.replace(s, id=sid, meta=meta)


class _Indexed(Sequence[Sample]):
    """``parts[which[i]][where[i]]`` for each position ``i`` (random access, picklable)."""

    def __init__(self, parts: list[_Tagged], which: list[int], where: list[int]) -> None:
        self.parts, self.which, self.where = parts, which, where

    def __len__(self) -> int:
        return len(self.which)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range (0..{len(self) - 1})")
        return self.parts[self.which[index]][self.where[index]]


def weighted_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder: exact, sums to ``total``)."""
    s = float(sum(weights))
    raw = [total * w / s for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


class TaskMixture(TaskFormat):
    """Several tasks as one: a weighted train split, and every sub-task in each evaluation split.

    ``train``: ``num_train`` samples (default: the sub-tasks' train sizes added up), entry ``j``
    contributing ``round(num_train * weight_j / sum(weights))`` of them (exactly; a sub-task smaller
    than its share repeats, cycling through it), in an order shuffled with ``seed``. Any other
    split: the sub-tasks that have it, interleaved round robin (so the first N samples, what
    ``eval.num_samples`` and ``--limit`` take, cover every sub-task evenly) until each runs out.
    Sample ids become ``<label>/<sub-task id>`` (unchanged when they already start so);
    ``meta["subtask"]`` and ``meta["dataset"]`` are the entry's label, so evaluation reports each
    sub-task (``summary.json`` per dataset).
    """

    name = "mixture"
    description = "several tasks as one: weighted train split, per-task evaluation"

    class Options(BaseModel):
        """Options of ``mixture``."""

        model_config = ConfigDict(extra="forbid")
        tasks: list[MixtureEntry] = Field(min_length=1, description="the tasks: [{name, options, weight, label}]")
        num_train: int | None = Field(None, ge=1, description="train split size; default: the sub-tasks' "
                                                              "train sizes added up")
        seed: int = Field(0, ge=0, description="seed of the train split's order")

        @model_validator(mode="after")
        def _distinct_labels(self):
            keys = [e.key for e in self.tasks]
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                raise ValueError(f"tasks: the label(s) {', '.join(dup)} appear more than once; give entries of "
                                 "the same task distinct `label`s")
            if any(e.name.split(":")[-1] == "mixture" for e in self.tasks):
                raise ValueError("tasks: a mixture cannot contain a mixture (list its tasks directly)")
            return self

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._registry: Any = None
        self._tasks: list[TaskFormat] | None = None

    @classmethod
    def nested_components(cls, options: Options) -> list[NestedComponent]:
        """Each entry's task and options, so ``--dry-run`` checks them at ``task.options.tasks.<i>``."""
        return [NestedComponent("tasks", e.name, f"tasks.{i}.options", dict(e.options), name_key=f"tasks.{i}.name")
                for i, e in enumerate(options.tasks)]

    def bind_registry(self, registry: Any) -> None:
        """Called by ``Registry.create``: the registry the sub-tasks are built from."""
        self._registry = registry

    @property
    def subtasks(self) -> list[TaskFormat]:
        """The sub-task instances, in entry order (built on first use)."""
        if self._tasks is None:
            if self._registry is None:
                raise RuntimeError("the mixture task was built without a registry; create it with "
                                   "Registry.create('tasks', 'mixture', options)")
            self._tasks = [self._registry.create("tasks", e.name, e.options) for e in self.options.tasks]
        return self._tasks

    def labels(self) -> list[str]:
        """Each entry's label (``meta["subtask"]`` of its samples)."""
        return [e.key for e in self.options.tasks]

    def splits(self) -> tuple[str, ...]:
        """Every split at least one sub-task declares."""
        out: list[str] = []
        for t in self.subtasks:
            out += [s for s in t.splits() if s not in out]
        return tuple(out)

    def load(self, split: str = "train") -> Sequence[Sample]:
        """The weighted ``train`` split, or any other split of the sub-tasks interleaved (see the class doc)."""
        if split == "train":
            return self._train()
        parts: list[_Tagged] = []
        missing: list[str] = []
        for label, task in zip(self.labels(), self.subtasks, strict=True):
            try:
                parts.append(_Tagged(label, task.load(split)))
            except (ValueError, KeyError) as exc:
                if split in task.splits():  # a split the task declares must load: a real error
                    raise
                missing.append(f"{label}: {exc}")  # that sub-task has no such split
        if not parts:
            raise ValueError(f"no task of the mixture has split {split!r} ({'; '.join(missing)})")
        which: list[int] = []
        where: list[int] = []
        for k in range(max(len(p) for p in parts)):
            for j, p in enumerate(parts):
                if k < len(p):
                    which.append(j)
                    where.append(k)
        return _Indexed(parts, which, where)

    def _train(self) -> Sequence[Sample]:
        import numpy as np

        parts = [_Tagged(label, t.load("train")) for label, t in zip(self.labels(), self.subtasks, strict=True)]
        for label, p in zip(self.labels(), parts, strict=True):
            if len(p) == 0:
                raise ValueError(f"task {label!r} of the mixture has an empty train split")
        total = self.options.num_train or sum(len(p) for p in parts)
        counts = weighted_counts(total, [e.weight for e in self.options.tasks])
        which = np.concatenate([np.full(c, j, dtype=np.int64) for j, c in enumerate(counts)])
        where = np.concatenate([np.arange(c, dtype=np.int64) % len(p) for c, p in zip(counts, parts, strict=True)])
        order = np.random.default_rng([self.options.seed, 0x6D6978]).permutation(total)
        return _Indexed(parts, which[order].tolist(), where[order].tolist())

    def stats(self) -> dict[str, int]:
        """Every sub-task's counters, prefixed with its label."""
        return {f"{label}/{k}": v for label, t in zip(self.labels(), self.subtasks, strict=True)
                for k, v in t.stats().items()}

    def skips_bad_samples(self) -> bool:
        """Only when every sub-task allows it (a sample is never skipped against its task's policy)."""
        return all(t.skips_bad_samples() for t in self.subtasks)
