"""One GRPO step's data, filled phase by phase as it flows through :class:`core.grpo.trainer.GRPOTrainer`.

rollout -> ``generations``; rewards -> ``rewards`` and the gathered ``all_rewards`` /
``all_per_reward`` / ``all_failed``; advantages -> ``advantages``, ``group_std``, ``keep``; update -> ``losses``
and update ``stats``; every phase adds its wall time to ``timings``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from core.runtime.generation import Generations
    from core.runtime.reward_runner import RewardResult


@dataclass
class StepBatch:
    """What one optimizer step holds; this rank's rows unless named ``all_*`` (every rank's, gathered).

    ``sampling`` holds the rollout's counts (dynamic sampling, skipped samples); ``stats`` the
    update's metrics (KL, clip ratios, grad norm); ``timings`` the seconds of each phase.
    """

    step: int
    generations: Generations | None = None
    rewards: RewardResult | None = None
    all_rewards: torch.Tensor | None = None
    all_per_reward: torch.Tensor | None = None
    #: bool ``[P * G]``: rows (every rank's) whose reward failed; they get no advantage and no loss.
    all_failed: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    group_std: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    losses: list[float] = field(default_factory=list)
    sampling: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``timings[phase]`` (phases may run several times)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0
