"""What each GRPO step trains on: which prompts, which rank holds which copies, bad samples.

Every decision here is a pure function of the run's seed and the step, so all ranks agree
without talking and a resumed run continues with exactly the prompts an uninterrupted run
would have used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from core.config import ConfigError
from core.interfaces import DataError, Sample


class GroupSampler:
    """Which prompts each step uses: epochs of seeded permutations, identical on every rank.

    The data position is a pure function of the step, so resuming at step ``s`` continues
    with exactly the prompts an uninterrupted run would have used.
    """

    def __init__(self, num_samples: int, prompts_per_step: int, seed: int, shuffle: bool = True) -> None:
        if num_samples == 0:
            raise ConfigError("task: the training split is empty")
        self.n, self.per_step, self.seed, self.shuffle = num_samples, prompts_per_step, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return range(self.n)  # type: ignore[return-value]  # indexable like the permutations
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def prompts(self, step: int) -> list[int]:
        """Global prompt indices of ``step`` (0-based)."""
        out = []
        for pos in range(step * self.per_step, (step + 1) * self.per_step):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out

    def extra(self, step: int, round_: int, group: int) -> int:
        """A replacement prompt for ``group`` in resample round ``round_`` (dynamic sampling)."""
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 101 + round_) * 10_007 + group)
        return int(torch.randint(self.n, (1,), generator=g))


def local_slots(num_groups: int, group_size: int, rank: int, per_rank: int) -> list[tuple[int, int]]:
    """The contiguous share of a step's ``(group, copy)`` slots that ``rank`` holds."""
    slots = [(k, j) for k in range(num_groups) for j in range(group_size)]
    return slots[rank * per_rank:(rank + 1) * per_rank]


class BadSampleSkipper:
    """Replaces prompts whose images cannot be decoded, where the task allows skipping them.

    Tasks validate rows when loading, but pixel data corrupt past a valid header only shows
    when the image is decoded. With the task's :meth:`~core.interfaces.TaskFormat.skips_bad_samples`
    (``on_bad_row: skip`` for the file tasks) each sample is decoded once to check it (the
    verdict is remembered) and a bad one is swapped for ``sampler.extra(step, -t, group)``,
    ``t = 1, 2, ...``: a pure function of the step like every other data decision, so all
    ranks and a resumed run make the same swaps. Disabled, it does nothing and the
    :class:`DataError` naming the row stops the run when the rollout decodes the image.
    """

    #: Replacements tried for one prompt before concluding the data is mostly unreadable.
    MAX_TRIES = 100

    def __init__(self, samples: Sequence[Sample], sampler: GroupSampler | None, enabled: bool,
                 log: Callable[[str], Any]) -> None:
        self.samples, self.sampler, self.enabled, self.log = samples, sampler, enabled, log
        self.good: set[int] = set()
        self.bad: set[int] = set()

    def usable(self, i: int) -> bool:
        """Whether sample ``i``'s images decode (decoded at most once per run; a failure is logged)."""
        if i in self.good:
            return True
        if i in self.bad:
            return False
        try:
            self.samples[i].load_images()
        except DataError as exc:
            self.bad.add(i)
            self.log(f"warning: skipping a sample whose image cannot be decoded (on_bad_row: skip): {exc}")
            return False
        self.good.add(i)
        return True

    def fix(self, ids: list[int], step: int, groups: Iterable[int] | None = None) -> int:
        """Swap the unusable prompts of ``ids`` in place (only ``groups``, if given); returns the swaps."""
        if not self.enabled or self.sampler is None:
            return 0
        swaps = 0
        for k in range(len(ids)) if groups is None else groups:
            tries = 0
            while not self.usable(ids[k]):
                tries += 1
                if tries > self.MAX_TRIES:
                    raise DataError(f"{self.MAX_TRIES} replacement samples in a row had images that cannot be "
                                    f"decoded (step {step + 1}); the training data looks mostly unreadable")
                ids[k] = self.sampler.extra(step, -tries, k)
                swaps += 1
        return swaps
