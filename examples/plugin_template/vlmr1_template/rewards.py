"""The ``keyword`` reward: 1.0 if the answer contains a configured keyword, else 0.0."""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import Reward, RewardBatch

# The last <answer>...</answer> block (R1-style output); DOTALL so answers may span lines.
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class KeywordReward(Reward):
    """Score 1.0 when the answer contains ``keyword``, else 0.0.

    With ``answer_only`` (default) only the text inside the last ``<answer>...</answer>`` is
    searched, and a completion without one scores 0.0. With ``whole_word`` the keyword must
    not be part of a longer word (``red`` does not match ``reddish``).
    """

    name = "keyword"
    description = "1.0 if the answer contains a configured keyword"
    # VLM-R1 rows with accu_reward_method "keyword" are routed here by the `accuracy` reward.
    methods: ClassVar[tuple[str, ...]] = ("keyword",)

    class Options(BaseModel):
        """Options of the ``keyword`` reward (unknown keys are errors)."""

        model_config = ConfigDict(extra="forbid")
        keyword: str = Field(min_length=1, description="the text to look for")
        case_sensitive: bool = Field(False, description="match case exactly")
        whole_word: bool = Field(False, description="the keyword must not be part of a longer word")
        answer_only: bool = Field(True, description="search only inside the last <answer>...</answer>")

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        o = self.options
        pattern = re.escape(o.keyword)
        if o.whole_word:
            pattern = rf"(?<!\w){pattern}(?!\w)"
        self._pattern = re.compile(pattern, 0 if o.case_sensitive else re.IGNORECASE)

    def _text(self, completion: str) -> str | None:
        """The text to search, or None when an answer block is required and absent."""
        if not self.options.answer_only:
            return completion
        blocks = _ANSWER.findall(completion)
        return blocks[-1] if blocks else None

    def score(self, batch: RewardBatch) -> list[float | None]:
        """1.0 per completion whose (answer) text contains the keyword, else 0.0."""
        out: list[float | None] = []
        for item in batch:
            text = self._text(item.completion)
            out.append(1.0 if text is not None and self._pattern.search(text) else 0.0)
        return out
