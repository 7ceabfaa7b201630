"""Text rewards: format, exact match, multiple choice, yes/no and VLM-R1's default chain.

Reference: om-ai-lab/VLM-R1 ``src/open-r1-multimodal/src/open_r1/grpo_jsonl.py``
(``format_reward``, ``all_match_reward``, ``mcq_reward``, ``yes_no_reward``,
``default_accuracy_reward``). Deviations from it are fixes, each noted where it is made.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.interfaces import Reward, RewardBatch, RewardItem
from vlmr1_text.parsing import (
    EDGE_CHARS,
    OPTION_LETTERS,
    extract_answer,
    extract_choice,
    extract_yes_no,
    normalize,
    solution_text,
)

logger = logging.getLogger(__name__)


class PerItemReward(Reward):
    """A reward scored one completion at a time (subclasses implement :meth:`score_item`)."""

    def score(self, batch: RewardBatch) -> list[float | None]:
        """Score each item independently."""
        return [self.score_item(item) for item in batch]

    def score_item(self, item: RewardItem) -> float | None:  # pragma: no cover - abstract by convention
        raise NotImplementedError


# ---- format ------------------------------------------------------------------------------
class FormatReward(PerItemReward):
    r"""1.0 when the completion is ``<think>…</think>`` followed by ``<answer>…</answer>``, else 0.0.

    Modes: ``strict`` (default) = the whole completion is the two blocks, each tag exactly
    once; ``original`` = VLM-R1's ``re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>")``,
    which also accepts repeated blocks such as ``<answer>a</answer><answer>b</answer>``;
    ``loose`` = the two blocks appear in order somewhere in the completion.
    """

    name = "format"
    description = "<think>…</think><answer>…</answer> structure (strict | original | loose)"

    class Options(BaseModel):
        """Tag names, strictness and whitespace handling."""

        model_config = ConfigDict(extra="forbid")
        think_tag: str = "think"
        answer_tag: str = "answer"
        mode: Literal["strict", "original", "loose"] = "strict"
        strip: bool = Field(True, description="ignore leading/trailing whitespace of the completion")

        @field_validator("think_tag", "answer_tag")
        @classmethod
        def _tag(cls, v: str) -> str:
            if not re.fullmatch(r"[A-Za-z_][\w.-]*", v):
                raise ValueError(f"tag name {v!r} must be a word such as 'think' (no brackets)")
            return v

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        o = self.options
        self._tags = [f"<{o.think_tag}>", f"</{o.think_tag}>", f"<{o.answer_tag}>", f"</{o.answer_tag}>"]
        t, c, a, e = (re.escape(x) for x in self._tags)
        self._re = re.compile(rf"{t}.*?{c}\s*{a}.*?{e}", re.DOTALL)

    def score_item(self, item: RewardItem) -> float:
        """Apply the configured mode."""
        text = item.completion.strip() if self.options.strip else item.completion
        if self.options.mode == "loose":
            return float(self._re.search(text) is not None)
        if self._re.fullmatch(text) is None:
            return 0.0
        if self.options.mode == "strict" and any(text.count(tag) != 1 for tag in self._tags):
            return 0.0
        return 1.0


# ---- answer pattern ------------------------------------------------------------------------
class RegexReward(PerItemReward):
    r"""1.0 when the answer matches a regular expression, else 0.0 (a format check for any schema).

    The answer is the last ``<answer>`` block, or the whole completion (``target``). With
    ``match: full`` the pattern must match all of it (``re.fullmatch``); with ``search``
    anywhere. Typical uses: "the answer is one of the choices" (``(red|green|blue)``), a
    number (``-?\d+(\.\d+)?``), a box (``\[\s*\d+(\s*,\s*\d+){3}\s*\]``). Paired with
    an accuracy reward it is the R1 recipe's format term: it rewards every well-formed answer
    equally, so a policy learns the answer space before it learns which answer is right.
    """

    name = "regex"
    description = "answer matches a regular expression (format check for any answer schema)"

    class Options(BaseModel):
        """The pattern, what it is matched against, and how."""

        model_config = ConfigDict(extra="forbid")
        pattern: str = Field(description="Python regular expression")
        target: Literal["answer", "completion"] = "answer"
        match: Literal["full", "search"] = "full"
        ignore_case: bool = True

        @field_validator("pattern")
        @classmethod
        def _compiles(cls, v: str) -> str:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
            return v

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        o = self.options
        self._re = re.compile(o.pattern, re.IGNORECASE | re.DOTALL if o.ignore_case else re.DOTALL)

    def score_item(self, item: RewardItem) -> float:
        """Match the configured target."""
        text = extract_answer(item.completion) if self.options.target == "answer" else item.completion.strip()
        hit = self._re.fullmatch(text) if self.options.match == "full" else self._re.search(text)
        return float(hit is not None)


# ---- exact match -------------------------------------------------------------------------
class AllMatchReward(PerItemReward):
    """1.0 when the normalised answer equals the normalised solution, else 0.0.

    Normalisation (both sides): the last ``<answer>`` block (or the whole text), whitespace
    collapsed, ``edge_chars`` trimmed from both ends, lower-cased. VLM-R1's ``all_match``
    only stripped and removed one trailing ``.``.
    """

    name = "all_match"
    description = "exact match after normalisation (strip, lower, <answer> tags, edge punctuation)"
    methods: ClassVar[tuple[str, ...]] = ("all_match", "exact_match")
    eval_metric: ClassVar[str | None] = "exact_match"

    class Options(BaseModel):
        """Normalisation switches."""

        model_config = ConfigDict(extra="forbid")
        case_sensitive: bool = False
        edge_chars: str = Field(EDGE_CHARS, description="characters trimmed from both ends before comparing")

    def score_item(self, item: RewardItem) -> float:
        """Compare normalised answer and solution."""
        o = self.options
        pred = normalize(extract_answer(item.completion), case_sensitive=o.case_sensitive, edge_chars=o.edge_chars)
        gold = normalize(solution_text(item.solution), case_sensitive=o.case_sensitive, edge_chars=o.edge_chars)
        return float(pred == gold)


# ---- multiple choice ------------------------------------------------------------------------
class MCQReward(PerItemReward):
    """1.0 when the answer commits to the solution's choice letter, else 0.0.

    The letter is read with :func:`vlmr1_text.parsing.extract_choice` from the answer block
    (or the whole completion) and from the solution. A solution without a readable letter
    makes the row not applicable (``None``, with a warning): it is a data error, not a
    wrong answer. A hedge naming several letters scores 0.
    """

    name = "mcq"
    description = "multiple-choice letter match"
    methods: ClassVar[tuple[str, ...]] = ("mcq",)

    class Options(BaseModel):
        """The option letters to recognise."""

        model_config = ConfigDict(extra="forbid")
        letters: str = Field(OPTION_LETTERS, pattern=r"^[A-Z]+$", description="capital letters that name options")

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._warned = False
        self._lock = threading.Lock()

    def score_item(self, item: RewardItem) -> float | None:
        """Compare choice letters."""
        gold = extract_choice(solution_text(item.solution), self.options.letters)
        if gold is None:
            with self._lock:
                if not self._warned:
                    self._warned = True
                    logger.warning("mcq: solution %r names no option letter (%s); such rows are not applicable",
                                   solution_text(item.solution)[:80], self.options.letters)
            return None
        pred = extract_choice(extract_answer(item.completion), self.options.letters)
        return float(pred == gold)


# ---- yes / no ------------------------------------------------------------------------------
class YesNoReward(PerItemReward):
    """1.0 when answer and solution say the same of "yes"/"no" (whole words), else 0.0.

    Fixes to VLM-R1's ``yes_no_reward``: whole words only ("I know" is not "no"); an answer
    with both words scores 0; a solution with neither is not applicable (``None``) instead of
    rewarding every answer that also lacks both words with 1.0.
    """

    name = "yes_no"
    description = "yes/no answer match"
    methods: ClassVar[tuple[str, ...]] = ("yes_no",)

    def score_item(self, item: RewardItem) -> float | None:
        """Compare the yes/no words."""
        gold = extract_yes_no(solution_text(item.solution))
        if gold is None:
            return None
        return float(extract_yes_no(extract_answer(item.completion)) == gold)


# ---- VLM-R1 default chain -------------------------------------------------------------------
def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class DefaultReward(PerItemReward):
    """VLM-R1's ``default_accuracy_reward`` fallback chain, for rows without a method.

    With ``gt`` the solution's answer and ``ans`` the completion's last ``<answer>`` block
    (or the whole completion):

    1. math-verify: ``verify(parse(gt), parse(ans))`` true → 1.0;
    2. if ``gt`` contains a digit: ``float(ans) == float(gt)`` after normalisation → 1.0/0.0;
       when either is not a plain number → fuzzy ratio;
    3. elif ``gt`` names a choice letter: letters equal → 1.0 else 0.0;
    4. else fuzzy ratio.

    The fuzzy ratio is Levenshtein ``ratio`` (``rapidfuzz.fuzz.ratio / 100``, the same value
    as the ``Levenshtein`` package VLM-R1 uses) of the normalised texts: **partial credit
    that can be hacked** — an answer that merely resembles the solution, e.g. a copy of
    part of the question or a long string sharing many characters with it, earns up to
    1.0 without being right. Set ``fuzzy: false`` to score such rows 1.0/0.0 by exact
    normalised match instead.

    math-verify's own timeouts use ``signal.alarm``, which works only in the main thread;
    in the engine's reward threads this step runs without them and is bounded by the
    reward's ``timeout_s`` (the runner abandons a stuck call). The ``math`` reward of
    ``vlmr1-plugin-math`` enforces a hard per-completion limit instead.
    """

    name = "default"
    description = "VLM-R1 default chain: math-verify, numeric, choice letter, fuzzy ratio (hackable)"
    methods: ClassVar[tuple[str, ...]] = ("default",)

    class Options(BaseModel):
        """Switches for the chain's steps."""

        model_config = ConfigDict(extra="forbid")
        math_verify: bool = Field(True, description="try math-verify equivalence first")
        fuzzy: bool = Field(True, description="Levenshtein partial credit (hackable); false = exact match")
        math_verify_timeout_s: int = Field(5, ge=1, description="math-verify's own timeout (main thread only)")

    def score_item(self, item: RewardItem) -> float:
        """Run the chain."""
        gt = solution_text(item.solution)
        ans = extract_answer(item.completion)
        if self.options.math_verify and ans and gt and self._math_equal(gt, ans):
            return 1.0
        if re.search(r"\d", gt):
            a, g = _float_or_none(normalize(ans)), _float_or_none(normalize(gt))
            if a is not None and g is not None:
                return float(a == g)
            return self._fuzzy(ans, gt)
        gold_choice = extract_choice(gt)
        if gold_choice is not None:
            return float(extract_choice(ans) == gold_choice)
        return self._fuzzy(ans, gt)

    def _fuzzy(self, ans: str, gt: str) -> float:
        a, g = normalize(ans), normalize(gt)
        if not self.options.fuzzy:
            return float(a == g)
        from rapidfuzz import fuzz

        return fuzz.ratio(a, g) / 100.0

    def _math_equal(self, gt: str, ans: str) -> bool:
        from math_verify import parse, verify

        t: Any = self.options.math_verify_timeout_s if threading.current_thread() is threading.main_thread() else None
        try:
            gold = parse(gt, parsing_timeout=t) or parse(f"${gt}$", parsing_timeout=t)
            pred = parse(ans, parsing_timeout=t)
            return bool(gold and pred and verify(gold, pred, timeout_seconds=t))
        except Exception:  # math-verify raises on exotic input; the chain goes on
            logger.debug("default: math-verify failed", exc_info=True)
            return False
