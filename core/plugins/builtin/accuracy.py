"""The built-in ``accuracy`` reward: each row goes to the reward serving its ``accu_reward_method``."""

from __future__ import annotations

import threading
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import NestedComponent, Reward, RewardBatch, RewardContext


class AccuracyRouter(Reward):
    """Routes each sample to the reward registered for its ``accu_reward_method``.

    VLM-R1 JSONL rows name an accuracy method per row (``iou``, ``map``, ``math``, ``mcq``
    ...). Every installed reward lists the methods it answers for in ``Reward.methods``;
    this router dispatches each row there, so mixed datasets train with one config entry.
    Rows without a method use ``default_method``. A method no installed reward serves is
    an error naming it and the methods that exist.
    """

    name = "accuracy"
    description = "dispatch each row to the reward serving its accu_reward_method"

    class Options(BaseModel):
        """``routes`` overrides method -> reward name; ``default_method`` serves rows without one."""

        model_config = ConfigDict(extra="forbid")
        default_method: str = "default"
        routes: dict[str, str] = Field(default_factory=dict)
        reward_options: dict[str, dict] = Field(default_factory=dict, description="options per reward name")

    thread_safe: ClassVar[bool] = True

    @classmethod
    def nested_components(cls, options: Options) -> list[NestedComponent]:
        """Each ``reward_options`` entry (validated against that reward) and each ``routes`` target.

        So a misspelt sub-reward option or route fails ``--dry-run``, not the first step that
        routes a row there.
        """
        bad = sorted(m for m, target in options.routes.items() if target.split(":")[-1] == cls.name)
        if bad:
            raise ValueError(f"routes: {', '.join(bad)} route(s) to {cls.name!r} itself")
        return ([NestedComponent("rewards", name, f"reward_options.{name}", dict(opts))
                 for name, opts in options.reward_options.items()]
                + [NestedComponent("rewards", target, f"routes.{method}") for method, target in options.routes.items()])

    def setup(self, ctx: RewardContext) -> None:
        """Build the method -> reward-name table; each reward is built on first use.

        Building lazily means an installed reward that needs options of its own (an LLM
        judge's endpoint) or resources (a worker process) costs nothing, and cannot fail
        the run, unless a row actually routes to it. ``reward_options`` are validated now.
        """
        self._ctx = ctx
        self._names: dict[str, str] = {}
        self._built: dict[str, Reward] = {}
        self._lock = threading.Lock()
        if ctx.registry is None:
            return
        for entry in ctx.registry.entries("rewards"):
            for m in getattr(entry.cls, "methods", ()):
                self._names.setdefault(m, entry.name)
        self._names.update(self.options.routes)
        for rname, opts in self.options.reward_options.items():
            ctx.registry.get("rewards", rname).Options.model_validate(opts)

    def reward_for(self, method: str) -> Reward:
        """The (built and set up) reward serving ``method``."""
        rname = self._names.get(method)
        if rname is None:
            raise KeyError(f"no installed reward serves accu_reward_method {method!r}; "
                           f"known methods: {', '.join(sorted(self._names)) or '(none)'}")
        with self._lock:
            if rname not in self._built:
                reward = self._ctx.registry.create("rewards", rname, self.options.reward_options.get(rname))
                reward.setup(self._ctx)
                self._built[rname] = reward
            return self._built[rname]

    def close(self) -> None:
        """Close the rewards built so far (those that hold resources)."""
        for reward in self._built.values():
            closer = getattr(reward, "close", None)
            if callable(closer):
                closer()

    def take_failures(self) -> int:
        """The fallback-scored completions of the rewards built so far."""
        return sum(r.take_failures() for r in list(self._built.values()))

    def route(self, batch: RewardBatch) -> list[tuple[Reward, list[int]]]:
        """Group the rows by the reward their method routes to (the runner scores each group)."""
        by_reward: dict[int, tuple[Reward, list[int]]] = {}
        for i, item in enumerate(batch):
            reward = self.reward_for(item.reward_method or self.options.default_method)
            by_reward.setdefault(id(reward), (reward, []))[1].append(i)
        return list(by_reward.values())

    def score(self, batch: RewardBatch) -> list[float | None]:
        """Score each item with the reward its method routes to (direct use; the runner calls :meth:`route`)."""
        out: list[float | None] = [None] * len(batch)
        for reward, idx in self.route(batch):
            scores = reward.score(RewardBatch([batch.items[i] for i in idx]))
            for i, s in zip(idx, scores, strict=True):
                out[i] = s
        return out
