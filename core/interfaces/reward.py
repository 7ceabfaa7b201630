"""Reward interface: score a batch of completions.

A reward receives a typed :class:`RewardBatch` and returns one score per completion, or
``None`` where the reward does not apply to that sample ("not applicable" is excluded from
the weighted sum and from the reward's mean, never counted as zero).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.interfaces.base import Component

#: Maps a box written by the model for image ``image_index`` to original-image pixels
#: ``[x1, y1, x2, y2]``. Provided by the model family (see ``ModelFamily.box_convention``).
BoxTransform = Callable[[Sequence[float], int], list[float]]


def identity_box_transform(box: Sequence[float], image_index: int = 0) -> list[float]:
    """Box transform for data whose boxes are already in original-image pixels."""
    return [float(v) for v in box]


@dataclass
class RewardItem:
    """One completion to score, with everything a rule-based reward may need.

    Attributes:
        completion: the generated text (special tokens stripped).
        solution: the sample's ground truth, as the task format produced it.
        prompt: the question text shown to the model.
        reward_method: the row's ``accu_reward_method`` (VLM-R1 JSONL), if any.
        image_sizes: original ``(width, height)`` of each image of the sample.
        box_to_original: maps a box in the model's coordinate convention to original pixels.
        box_convention: the model family's convention name (for rewards that must refuse
            an ``unknown`` convention).
        meta: free-form per-sample metadata from the task (dataset name, labels, ...).
    """

    completion: str
    solution: Any
    prompt: str = ""
    reward_method: str | None = None
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    box_to_original: BoxTransform = identity_box_transform
    box_convention: str = "absolute_original"
    meta: dict[str, Any] = field(default_factory=dict)
    completion_length: int = 0
    truncated: bool = False


@dataclass
class RewardBatch:
    """The completions of one step (all groups) handed to a reward at once."""

    items: list[RewardItem]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


@dataclass
class RewardContext:
    """What a reward may look at once, before scoring: the registry and the run config."""

    registry: Any = None
    config: Any = None


class Reward(Component):
    """A verifiable reward.

    ``methods`` lists the ``accu_reward_method`` values this reward answers for, so the
    built-in ``accuracy`` router can dispatch each VLM-R1 row to the right reward.
    ``thread_safe`` says whether the engine may score items in parallel threads.
    ``eval_metric`` is the metric kind evaluation reports for the samples this reward scores
    (``core.runtime.evaluator``): ``"rec"`` (Acc@0.5 from the answer's box), ``"detection"``
    (COCO mAP), or a name of your own (``"math"``, ``"exact_match"``) for "the share of samples
    this reward scores >= ``eval.threshold``"; ``None`` reports it as ``reward:<name>``.
    """

    methods: ClassVar[tuple[str, ...]] = ()
    thread_safe: ClassVar[bool] = True
    eval_metric: ClassVar[str | None] = None

    def setup(self, ctx: RewardContext) -> None:
        """Called once before training with the run's context (default: nothing to do)."""

    @abstractmethod
    def score(self, batch: RewardBatch) -> list[float | None]:
        """Return one score per item (``None`` = not applicable), same order as ``batch``."""

    def close(self) -> None:
        """Release what the reward holds (worker processes, HTTP clients); default no-op.

        Called once when the run ends; should be safe to call again.
        """

    def take_failures(self) -> int:
        """How many completions this reward scored by a fallback of its own since the last call.

        A reward that catches its own failures (an LLM judge under ``on_failure: zero``) and
        returns 0 or ``None`` reports them here, so the engine counts them in
        ``rewards/<name>_errors`` and in the ``max_error_frac`` budget. Default: none.
        """
        return 0

    def route(self, batch: RewardBatch) -> list[tuple[Reward, list[int]]] | None:
        """For a reward that only dispatches (the built-in ``accuracy`` router): which reward scores which rows.

        Return ``[(reward, row indices), ...]`` covering the rows that have a reward; the engine's
        reward runner then calls each of those rewards itself, so every routed reward gets the
        time limit, row isolation and error accounting of a configured one. Rows left out are
        "not applicable". Default ``None``: this reward scores the batch itself (``score``).
        """
        return None
