"""Length-shaping rewards: the cosine length schedule and the n-gram repetition penalty.

Reference: om-ai-lab/VLM-R1 ``grpo_jsonl.py`` (``cosine_reward``, ``cosine_rewards``,
``repetition_reward``), after Yeo et al., "Demystifying Long Chain-of-Thought Reasoning in
LLMs" (arXiv 2502.03373).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import Reward, RewardBatch, RewardContext, RewardItem
from vlmr1_text.parsing import extract_answer, normalize, solution_text


class LengthReward(Reward):
    """Cosine length schedule whose end points depend on whether the answer is correct.

    With ``L`` the completion length (clamped to ``max_length``) and ``c = (1 + cos(π·L/max_length)) / 2``
    (1 at ``L = 0``, 0 at ``L = max_length``)::

        correct: reward = correct_long + (correct_short - correct_long) · c    (1.0 → 0.5 by default)
        wrong:   reward = wrong_long   + (wrong_short   - wrong_long)   · c    (-0.5 → 0.0 by default)

    so short correct answers and long (still-thinking) wrong answers are preferred. The
    defaults are VLM-R1's. A truncated completion scores ``truncated_value`` when set.

    Fixes to VLM-R1's ``cosine_reward``: it overwrote the correctness score with
    ``acc_reward = 1.0``, so every answer was scored as correct; here correctness comes from
    ``correctness_reward`` (any registered reward, built with ``correctness_options``;
    correct when its score ``>= correct_threshold``, 0.7 as in VLM-R1) or, with
    ``correctness: exact_match``, from the normalised answer equalling the solution. It also
    did not clamp ``L``, so the cosine rose again past ``max_length``. When the correctness
    reward returns ``None`` for a completion, this reward returns ``None`` too.

    ``length_unit: tokens`` uses ``RewardItem.completion_length`` (set by the engine);
    ``chars`` and ``words`` measure the text.
    """

    name = "length"
    description = "cosine length schedule, correctness-dependent (VLM-R1 'length', fixed)"

    class Options(BaseModel):
        """Schedule end points, length measure and the source of correctness."""

        model_config = ConfigDict(extra="forbid")
        correctness: Literal["reward", "exact_match"] = "reward"
        correctness_reward: str = Field("accuracy", description="registered reward that judges correctness")
        correctness_options: dict[str, Any] = Field(default_factory=dict)
        correct_threshold: float = 0.7
        max_length: int = Field(1024, ge=1)
        length_unit: Literal["tokens", "chars", "words"] = "tokens"
        correct_short: float = 1.0
        correct_long: float = 0.5
        wrong_short: float = -0.5
        wrong_long: float = 0.0
        truncated_value: float | None = Field(None, description="score of a truncated completion (None = schedule)")

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._judge: Reward | None = None

    def setup(self, ctx: RewardContext) -> None:
        """Build the correctness reward from the registry (``correctness: reward``)."""
        if self.options.correctness != "reward" or self._judge is not None:
            return
        if ctx.registry is None:
            raise ValueError("length: correctness 'reward' needs the component registry in setup(); "
                             "or set options.correctness: exact_match")
        if self.options.correctness_reward == self.name:
            raise ValueError("length: options.correctness_reward cannot be 'length' itself")
        judge = ctx.registry.create("rewards", self.options.correctness_reward, self.options.correctness_options)
        judge.setup(ctx)
        self.set_correctness_reward(judge)

    def set_correctness_reward(self, reward: Reward) -> None:
        """Use an already built reward to judge correctness."""
        self._judge = reward

    @property
    def thread_safe(self) -> bool:  # type: ignore[override]
        """As thread-safe as the correctness reward it calls."""
        return self._judge is None or bool(getattr(self._judge, "thread_safe", True))

    def close(self) -> None:
        """Close the correctness reward if it holds resources."""
        if self._judge is not None:
            self._judge.close()  # a no-op unless the reward holds resources (Reward.close)

    def score(self, batch: RewardBatch) -> list[float | None]:
        """Cosine schedule per completion."""
        correct = self._correctness(batch)
        return [None if c is None else self.schedule(self._length(it), c, it.truncated)
                for it, c in zip(batch, correct, strict=True)]

    def schedule(self, length: int, correct: bool, truncated: bool = False) -> float:
        """The reward for a completion of ``length`` units."""
        o = self.options
        if truncated and o.truncated_value is not None:
            return o.truncated_value
        c = (1.0 + math.cos(math.pi * min(max(length, 0), o.max_length) / o.max_length)) / 2.0
        short, long_ = (o.correct_short, o.correct_long) if correct else (o.wrong_short, o.wrong_long)
        return long_ + (short - long_) * c

    def _length(self, item: RewardItem) -> int:
        unit = self.options.length_unit
        if unit == "chars":
            return len(item.completion)
        if unit == "words":
            return len(item.completion.split())
        if item.completion_length == 0 and item.completion.strip():
            raise ValueError("length: length_unit 'tokens' but RewardItem.completion_length is 0 for a non-empty "
                             "completion; the engine must set it (or use length_unit: chars | words)")
        return item.completion_length

    def _correctness(self, batch: RewardBatch) -> list[bool | None]:
        o = self.options
        if o.correctness == "exact_match":
            return [normalize(extract_answer(it.completion)) == normalize(solution_text(it.solution)) for it in batch]
        if self._judge is None:
            raise RuntimeError(f"length: correctness reward {o.correctness_reward!r} is not set up; call setup(ctx)")
        scores = self._judge.score(batch)
        if len(scores) != len(batch):
            raise ValueError(f"length: correctness reward {o.correctness_reward!r} returned {len(scores)} scores "
                             f"for {len(batch)} completions")
        out: list[bool | None] = []
        for s in scores:
            if s is None or (isinstance(s, float) and math.isnan(s)):
                out.append(None)
            else:
                out.append(float(s) >= o.correct_threshold)
        return out


class RepetitionReward(Reward):
    """Penalty for repeated n-grams: ``max_penalty · (1 − distinct n-grams / total n-grams)``.

    Text: lower-cased whitespace-separated words, ``ngram_size``-grams (6 by default); fewer
    words than ``ngram_size`` (including an empty completion) → 0. Detection answers
    (``json_items: true``, VLM-R1's behaviour): when the completion holds a JSON list of
    objects with ``bbox_2d`` and ``label`` (in a code fence or bare), the n-grams are single
    objects, so each duplicated box/label pair is penalised. VLM-R1 repaired broken JSON
    with ``json_repair``; here broken JSON falls back to the text rule.
    """

    name = "repetition"
    description = "n-gram repetition penalty (VLM-R1 'repetition')"

    class Options(BaseModel):
        """n-gram size and penalty scale."""

        model_config = ConfigDict(extra="forbid")
        ngram_size: int = Field(6, ge=1)
        max_penalty: float = Field(-1.0, le=0.0)
        json_items: bool = True

    def score(self, batch: RewardBatch) -> list[float | None]:
        """Penalty per completion."""
        return [self.penalty(it.completion) for it in batch]

    def penalty(self, text: str) -> float:
        """The penalty of one text."""
        if self.options.json_items:
            items = _json_objects(text)
            if items is not None:
                return self._from_ngrams([f"{o['bbox_2d']}_{o['label']}" for o in items], 1)
        return self._from_ngrams(text.lower().split(), self.options.ngram_size)

    def _from_ngrams(self, tokens: list[str], n: int) -> float:
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        if not grams:
            return 0.0
        return self.options.max_penalty * (1.0 - len(set(grams)) / len(grams))


def _json_objects(text: str) -> list[dict[str, Any]] | None:
    """Objects with ``bbox_2d`` and ``label`` from a JSON list in ``text``, or ``None``."""
    candidates = re.findall(r"```(?:json)?(.*?)```", text, re.DOTALL)
    candidates += re.findall(r"\[\s*\{.*\}\s*\]", text, re.DOTALL)
    for chunk in candidates:
        try:
            data = json.loads(chunk.strip())
        except ValueError:
            continue
        if isinstance(data, list):
            objs = [o for o in data if isinstance(o, dict) and "bbox_2d" in o and "label" in o]
            if objs:
                return objs
    return None
