"""Answer extraction and normalisation shared by the text rewards.

The VLM-R1 conventions (``src/open-r1-multimodal/src/open_r1/grpo_jsonl.py``): the model's
answer is the content of the *last* ``<answer>…</answer>`` block, or the whole completion
when it has none; the ground truth is the solution with its ``<answer>`` tags removed.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Any

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

#: Characters trimmed from both ends by :func:`normalize`. Signs, ``%``, ``$`` and brackets
#: are kept because they change the meaning of an answer ("-5" is not "5").
EDGE_CHARS = " \t\r\n.,;:!?\"'`"


def extract_answer(text: str) -> str:
    """The last ``<answer>`` block of ``text`` (stripped), else all of ``text`` (stripped)."""
    matches = _ANSWER_RE.findall(text)
    return (matches[-1] if matches else text).strip()


def solution_text(solution: Any) -> str:
    """The ground truth as text: a string's ``<answer>`` content, or ``str()`` of anything else."""
    if isinstance(solution, str):
        return extract_answer(solution)
    return str(solution).strip()


def normalize(text: str, *, case_sensitive: bool = False, edge_chars: str = EDGE_CHARS) -> str:
    """Whitespace collapsed to one space, trimmed of ``edge_chars``, lower-cased unless asked not to.

    A superset of VLM-R1's ``clean_text`` (newlines to spaces, strip, ``rstrip('.')``, lower).
    """
    t = re.sub(r"\s+", " ", text).strip(edge_chars)
    return t if case_sensitive else t.lower()


#: Option letters recognised by default: every capital, so rows answering K or later are not lost.
OPTION_LETTERS = string.ascii_uppercase
#: "the answer is" in Chinese / Japanese: 答案是B, 正确答案为C, 选项D, 我选B.
_CJK_ANSWER = r"(?:正确答案|正確答案|答案|选项|選項|选择|選擇|选|選|答)(?:是|为|為|应该是|應該是|应为|應為)?"
# Word boundaries for a stand-alone letter. ASCII only: ``\w`` also matches CJK characters, so
# ``(?<!\w)B`` missed the B in "答案是B".
_NOT_BEFORE = r"(?<![A-Za-z0-9_'])"
_NOT_AFTER = r"(?![A-Za-z0-9_'])"


def extract_choice(text: str, letters: str = OPTION_LETTERS) -> str | None:
    """The multiple-choice letter a text commits to, or ``None`` when there is none or it is ambiguous.

    VLM-R1's ``extract_choice`` upper-cases the text and takes letters followed by punctuation
    or the end, so "The answer is (B)" yields nothing and an article "a." counts as choice A.
    Here, in order of precedence:

    1. the whole text is one letter, optionally bracketed or followed by ``.``/``:``/``)``
       ("B", "(b)", "C.");
    2. an explicit statement, the last one wins: "answer is (B)", "Answer: C", "option D";
    3. the text starts with an option label ("B. red", "(B) red", "B) red", "B: red") and
       names no other letter in brackets;
    4. bracketed capital letters "(B)" / "[B]" anywhere, if they name exactly one letter;
    5. capital letters standing alone as a word ("I think B."), if they name exactly one
       letter ("A"/"I" before a lower-case word are read as article/pronoun, not options).

    Several different letters at the same level count as a hedge and return ``None``. The text
    is NFKC-normalised first (full-width letters, brackets and colons become ASCII), and the
    statements of step 2 include Chinese ones ("答案是B", "正确答案：C", "选项D").
    """
    t = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()
    t = t.replace("【", "[").replace("】", "]")
    if not t:
        return None
    cls = "[" + re.escape(letters) + "]"
    m = re.fullmatch(rf"[(\[]?({cls})[)\]]?[.:)]?", t, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    stated = re.findall(
        rf"(?:(?i:answer|option|choice)(?:\s+(?i:is))?|{_CJK_ANSWER})\s*[:=]?\s*(?i:option\s+)?[(\[]?({cls})"
        rf"{_NOT_AFTER}", t)
    if stated:
        return stated[-1]
    bracketed = set(re.findall(rf"[(\[]({cls})[)\]]", t))
    m = re.match(rf"[(\[]?({cls})[.:)\]]\s", t + " ")
    if m:  # an option label, unless other letters are named in brackets too ("(A) or (C)")
        return m.group(1) if bracketed <= {m.group(1)} else None
    if bracketed:
        return bracketed.pop() if len(bracketed) == 1 else None
    # Stand-alone capitals; "A"/"I" followed by a lower-case word are an article/pronoun.
    alone = {m.group(1) for m in re.finditer(rf"{_NOT_BEFORE}({cls}){_NOT_AFTER}", t)
             if not (m.group(1) in "AI" and re.match(r"\s+[a-z]", t[m.end():]))}
    return alone.pop() if len(alone) == 1 else None


def extract_yes_no(text: str) -> str | None:
    """``"yes"`` or ``"no"`` when exactly one of the two words occurs, else ``None``.

    VLM-R1's ``yes_no_reward`` searches the substring ``(yes|no)``, so "I know" reads as "no";
    whole words are required here, and an answer containing both is a hedge.
    """
    found = set(re.findall(r"\b(yes|no)\b", text.lower()))
    return found.pop() if len(found) == 1 else None
