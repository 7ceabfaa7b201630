"""``vlmr1_jsonl``: VLM-R1's JSONL conversation format, drop-in compatible with its files.

A row (one JSON object per line)::

    {"id": "r1", "image": "a.png" | ["a.png", "b.png"] (or absent: text-only),
     "conversations": [{"from": "human", "value": "<image>What is ...?"},
                       {"from": "gpt", "value": "<answer>...</answer>"}],
     "accu_reward_method": "iou"}   # optional
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

from pydantic import Field

from core.interfaces import Sample
from vlmr1_jsonl.base import FileTask
from vlmr1_jsonl.common import BadRow, FileTaskOptions, ImageRef, Source, check_box, resolve_image

IMAGE_TAG = "<image>"
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
KNOWN_KEYS = {"id", "image", "conversations", "accu_reward_method"}

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def extract_solution(value: str) -> str:
    """The ground truth inside the gpt turn.

    With ``<answer>…</answer>`` blocks, the inner text of the last one; otherwise the value with
    any stray answer tags removed. Stripped. (The original removed the tags but kept any text
    around them, e.g. a ``<think>`` block; for the usual ``"<answer> X </answer>"`` or ``"X"``
    both give ``X``.)
    """
    blocks = _ANSWER_RE.findall(value)
    if blocks:
        return blocks[-1].strip()
    return value.replace("<answer>", "").replace("</answer>", "").strip()


def solution_boxes(solution: str, box_row: bool) -> list[list[float]]:
    """Validated boxes in a solution; raises :class:`BadRow` for a box with x2 < x1 (or y2 < y1).

    Detection answers (JSON, optionally in a json code fence, of ``{"bbox_2d": [...]}`` objects)
    are always checked. In rows whose reward method is box-based (``box_reward_methods``) every
    ``[x1, y1, x2, y2]`` in the solution is checked and at least one must exist.
    """
    text = solution.strip()
    fence = _FENCE_RE.search(text)
    try:
        parsed: Any = json.loads(fence.group(1) if fence else text)
    except (ValueError, RecursionError):
        parsed = None
    items = parsed if isinstance(parsed, list) else [parsed]
    labelled = [it["bbox_2d"] for it in items if isinstance(it, dict) and "bbox_2d" in it]
    if labelled:
        return [check_box(b, "bbox_2d") for b in labelled]
    if not box_row:
        return []
    if isinstance(parsed, list) and len(parsed) == 4:
        return [check_box(parsed, "solution box")]
    found = _BOX_RE.findall(text)
    if not found:
        raise BadRow("invalid_box", f"the solution {solution[:80]!r} of a box-rewarded row has no "
                                    "[x1, y1, x2, y2] box")
    return [check_box([float(v) for v in m], "solution box") for m in found]


class VlmR1Jsonl(FileTask):
    """VLM-R1 JSONL rows -> samples: single-image, multi-image and text-only.

    Images are placed where the ``<image>`` tags stand in the human turn (``image_placement:
    tags``). A row with fewer tags than images gets the missing placeholders prepended (the
    first ``n - k`` images go before the text, the rest take the tags in order); more tags than
    images is bad data. ``image_placement: before_text`` reproduces the original exactly: all
    images first, then the question with the tags removed.
    """

    name = "vlmr1_jsonl"
    description = "VLM-R1 JSONL (conversations; single/multi-image, text-only)"

    class Options(FileTaskOptions):
        """File options (see :class:`FileTaskOptions`) plus the JSONL-specific ones."""

        image_placement: Literal["tags", "before_text"] = Field(
            "tags", description="tags: images where the <image> tags stand; before_text: all images first")
        box_reward_methods: list[str] = Field(
            default_factory=lambda: ["iou"],
            description="reward methods whose rows must carry a valid [x1, y1, x2, y2] box solution")

    def make_sample(self, row: Any, src: Source, line: int) -> Sample:
        """One JSONL row -> one sample (raises :class:`BadRow`)."""
        if not isinstance(row, dict):
            raise BadRow("not_an_object", f"a row must be a JSON object, got {type(row).__name__}")
        human, gpt = self._turns(row)
        question = human["value"]
        if not isinstance(question, str):
            raise BadRow("wrong_type", f"the human turn's value must be a string, got {type(question).__name__}")
        answer = gpt["value"]
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)  # the original accepts numeric answers as their string
        if not isinstance(answer, str):
            raise BadRow("wrong_type", f"the gpt turn's value must be a string or number, got {type(answer).__name__}")

        names = self._image_names(row)
        tags = question.count(IMAGE_TAG)
        if tags > len(names):
            raise BadRow("image_tag_mismatch", f"the human turn has {tags} {IMAGE_TAG} tag(s) but the row has "
                         f"{len(names)} image(s)")
        method = row.get("accu_reward_method")
        if method is None:
            method = src.reward_method
        elif not isinstance(method, str) or not method:
            raise BadRow("wrong_type", f"accu_reward_method must be a non-empty string, got {method!r}")
        o = self.options
        paths = [resolve_image(n, src.image_folder, o.allow_outside_image_folder, o.check_images, self.limits)
                 for n in names]
        solution = extract_solution(answer)
        boxes = solution_boxes(solution, method in o.box_reward_methods)

        content = self._content(question, len(names), tags)
        if len(row.get("conversations", ())) > 2:
            self.log.counts["extra_turns_ignored"] += 1
        if 0 < tags < len(names) and o.image_placement == "tags":
            # Partly tagged rows are worth a counter: the file may have lost a tag.
            self.log.counts["prepended_image_placeholders"] += 1
        meta: dict[str, Any] = {
            "source_file": src.path,
            "source_line": line,
            "dataset": os.path.basename(src.path),
            "row_id": row.get("id"),
            "image_paths": paths,
            "reference_completion": answer,
        }
        if boxes:
            meta["solution_boxes"] = boxes
        extra = {k: v for k, v in row.items() if k not in KNOWN_KEYS}
        if extra:
            meta["extra"] = extra
        return Sample(
            id=self.unique_id(row.get("id"), src, line),
            images=[ImageRef(p, src.path, line, self.limits) for p in paths],
            messages=self.messages(content),
            solution=solution,
            reward_method=method,
            meta=meta,
        )

    @staticmethod
    def _turns(row: dict) -> tuple[dict, dict]:
        if "conversations" not in row:
            raise BadRow("missing_field", "row has no 'conversations'")
        conv = row["conversations"]
        if not isinstance(conv, list):
            raise BadRow("wrong_type", f"'conversations' must be a list, got {type(conv).__name__}")
        if len(conv) < 2:
            raise BadRow("bad_conversations", f"'conversations' needs a human and a gpt turn, has {len(conv)}")
        human, gpt = conv[0], conv[1]
        for turn, roles, which in ((human, HUMAN_ROLES, "first"), (gpt, GPT_ROLES, "second")):
            if not isinstance(turn, dict):
                raise BadRow("wrong_type", f"the {which} turn must be an object, got {type(turn).__name__}")
            for key in ("from", "value"):
                if key not in turn:
                    raise BadRow("missing_field", f"the {which} turn has no {key!r}")
            if turn["from"] not in roles:
                raise BadRow("bad_conversations", f"the {which} turn must be from {' or '.join(roles)}, "
                             f"got {turn['from']!r}")
        return human, gpt

    @staticmethod
    def _image_names(row: dict) -> list[Any]:
        image = row.get("image")
        if image is None:
            return []
        if isinstance(image, str):
            return [image]
        if isinstance(image, list):
            return image
        raise BadRow("wrong_type", f"'image' must be a string or a list of strings, got {type(image).__name__}")

    def _content(self, question: str, n_images: int, tags: int) -> list[dict[str, Any]]:
        image = {"type": "image"}
        if self.options.image_placement == "before_text" or tags == 0:
            text = self.template_prefix + question.replace(IMAGE_TAG, "") + self.template_suffix
            return [dict(image) for _ in range(n_images)] + ([{"type": "text", "text": text}] if text else [])
        content: list[dict[str, Any]] = [dict(image) for _ in range(n_images - tags)]
        for i, seg in enumerate(self.wrap_question(question.split(IMAGE_TAG))):
            if i:
                content.append(dict(image))
            if seg:
                content.append({"type": "text", "text": seg})
        return content
