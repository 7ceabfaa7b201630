"""The ``math`` reward: answer equivalence with math-verify under a hard per-completion time limit.

Reference: om-ai-lab/VLM-R1 ``grpo_jsonl.py`` ``math_reward`` (method ``math``), which
called an external ``compute_score`` on the cleaned ``<answer>`` text; math-verify
(huggingface/Math-Verify) is used here as the issue asks.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import Reward, RewardBatch, RewardContext, RewardItem
from vlmr1_math.check import answer_text, is_equivalent

if TYPE_CHECKING:
    from vlmr1_math.worker import MathWorker

logger = logging.getLogger(__name__)


class MathReward(Reward):
    r"""1.0 when the answer is mathematically equivalent to the solution, else 0.0.

    The answer is the completion's last ``<answer>`` block (or the whole completion); the
    gold answer is the solution without its ``<answer>`` tags. Equivalence
    (:func:`vlmr1_math.check.is_equivalent`): math-verify's ``verify(parse(gold), parse(answer))``
    (so ``\frac{1}{2}`` = ``0.5`` = ``$\boxed{1/2}$``, ``10%`` = ``0.1``), falling back to the
    last ``\boxed{}`` content and a normalised string comparison.

    Time limit — ``isolation: process`` (default): each completion is checked in a child
    process (:class:`vlmr1_math.worker.MathWorker`) that is **killed** when it has not
    answered within ``timeout_s`` and restarted for the next completion, so a pathological
    sympy parse (``9^{9^{9}}``) really stops. Inside the child math-verify's own
    ``signal.alarm`` timeouts (``parsing_timeout``/``timeout_seconds``, whole seconds) also
    apply, as a first line. ``isolation: inline`` runs math-verify in the calling thread: its
    signal timeouts then work only in the main thread, and in the engine's reward threads
    nothing but the runner's ``timeout_s`` bounds the call (which abandons, not stops, it).

    A timed-out completion scores ``0.0`` (``on_timeout: zero``) or is not applicable
    (``none``); a check that fails inside math-verify scores 0.0. Both are logged once and
    counted in ``self.timeouts`` / ``self.failures``. An empty gold answer → ``None``.
    """

    name = "math"
    description = "math-verify equivalence (boxed / normalised fallback) with a hard per-completion time limit"
    methods: ClassVar[tuple[str, ...]] = ("math",)
    eval_metric: ClassVar[str | None] = "math"

    class Options(BaseModel):
        """Time limit and isolation."""

        model_config = ConfigDict(extra="forbid")
        timeout_s: float = Field(5.0, gt=0, description="hard limit per completion (the worker is killed after it)")
        isolation: Literal["process", "inline"] = "process"
        on_timeout: Literal["zero", "none"] = "zero"

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._worker: MathWorker | None = None
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.timeouts = 0
        self.failures = 0

    def setup(self, ctx: RewardContext) -> None:
        """Start the worker process now rather than inside the first step."""
        if self.options.isolation == "process":
            self._get_worker().start()

    def close(self) -> None:
        """Stop the worker process."""
        if self._worker is not None:
            self._worker.close()

    def _get_worker(self) -> MathWorker:
        with self._lock:
            if self._worker is None:
                from vlmr1_math.worker import MathWorker

                self._worker = MathWorker()
            return self._worker

    def score(self, batch: RewardBatch) -> list[float | None]:
        """Check each completion."""
        return [self.score_item(it) for it in batch]

    def score_item(self, item: RewardItem) -> float | None:
        """Check one completion."""
        gold = answer_text(item.solution) if isinstance(item.solution, str) else str(item.solution).strip()
        if not gold:
            return None
        pred = answer_text(item.completion)
        if not pred:
            return 0.0
        if self.options.isolation == "inline":
            try:
                return float(is_equivalent(gold, pred, self._inline_timeout()))
            except Exception as e:  # math-verify raising on exotic input is a wrong answer, not a crash
                self._note("failure", f"math: math-verify raised {type(e).__name__}: {e}; scored 0")
                return 0.0
        from vlmr1_math.worker import WorkerError, WorkerTimeout

        try:
            return float(self._get_worker().check(gold, pred, self.options.timeout_s))
        except WorkerTimeout:
            self._note("timeout", f"math: a check exceeded {self.options.timeout_s:g} s and its worker process was "
                                  f"killed (scored {'0' if self.options.on_timeout == 'zero' else 'None'}); "
                                  f"answer starts {pred[:60]!r}")
            return 0.0 if self.options.on_timeout == "zero" else None
        except WorkerError as e:
            self._note("failure", f"math: {e}; scored 0")
            return 0.0

    def _inline_timeout(self) -> int | None:
        on_main = threading.current_thread() is threading.main_thread()
        return max(1, int(self.options.timeout_s)) if on_main else None

    def _note(self, kind: str, msg: str) -> None:
        with self._lock:
            if kind == "timeout":
                self.timeouts += 1
            else:
                self.failures += 1
            first = kind not in self._warned
            self._warned.add(kind)
        if first:
            logger.warning("%s (further ones are counted in the reward's %ss without a warning)", msg, kind)
