r"""The equivalence check itself (runs inside the worker process, or inline).

``is_equivalent(gold, pred)``:

1. math-verify: ``verify(parse(gold), parse(pred))``; a string math-verify cannot read on
   its own (e.g. ``\sqrt{2}/2`` or ``\frac34`` without ``$``) is retried wrapped in ``$…$``
   when it is short (``MAX_WRAP_CHARS``);
2. fallback: the last ``\boxed{…}`` of the prediction (or the prediction itself) and the
   gold answer, both normalised by :func:`normalize_math`, compared as strings.
"""

from __future__ import annotations

import re

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_text(text: str) -> str:
    """The last ``<answer>`` block of ``text``, else ``text`` (stripped)."""
    m = _ANSWER_RE.findall(text)
    return (m[-1] if m else text).strip()


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{…}`` (or ``\fbox{…}``), with nested braces; ``None`` if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def normalize_math(text: str) -> str:
    r"""A canonical string for the fallback comparison.

    Removes ``$``, whitespace, ``\left``/``\right``, ``\!``/``\,`` spacing, ``\text{}`` wrappers and a
    trailing ``.``; ``\dfrac``/``\tfrac`` → ``\frac``; lower-cases.
    """
    s = text.strip().strip("$")
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = re.sub(r"\\(left|right)\b", "", s)
    s = re.sub(r"\\[!,;: ]", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").lower()


#: Longest text retried as a bare LaTeX expression: the retry is meant for short answers like
#: ``\frac34``; on a long prose answer it makes sympy multiply thousands of symbols (seconds).
MAX_WRAP_CHARS = 200


def _parse(text: str, timeout: int | None) -> list:
    from math_verify import parse

    out = parse(text, parsing_timeout=timeout)
    if not out and len(text) <= MAX_WRAP_CHARS:
        out = parse(f"${text}$", parsing_timeout=timeout)
    return out


def is_equivalent(gold: str, pred: str, timeout: int | None = None) -> bool:
    """Whether ``pred`` states the same answer as ``gold`` (see the module docstring).

    ``timeout`` is passed to math-verify's own ``signal.alarm`` timeouts (main thread only;
    ``None`` disables them).
    """
    from math_verify import verify

    if not gold.strip() or not pred.strip():
        return False
    g = _parse(gold, timeout)
    p = _parse(pred, timeout)
    if g and p and verify(g, p, timeout_seconds=timeout):
        return True
    boxed = last_boxed(pred)
    gold_boxed = last_boxed(gold)
    return normalize_math(boxed if boxed is not None else pred) == normalize_math(
        gold_boxed if gold_boxed is not None else gold)
