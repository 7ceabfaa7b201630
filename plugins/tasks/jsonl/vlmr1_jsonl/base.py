"""Base of the file-backed task formats: split handling, caching, ids and stats."""

from __future__ import annotations

import os
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel

from core.interfaces import Sample, TaskFormat
from vlmr1_jsonl.common import (
    BadRow,
    FileTaskOptions,
    ImageLimits,
    RowLog,
    Source,
    canonical_split,
    cap,
    holdout,
    iter_jsonl,
    read_bytes,
    sources,
)
from vlmr1_jsonl.templates import resolve_template, split_template


class FileTask(TaskFormat):
    """Reads data files row by row into samples, eagerly, so every bad row is found before training.

    Subclasses implement :meth:`make_sample` (one parsed row -> one sample, or :class:`BadRow`)
    and may override :meth:`rows` (how a file is split into rows).
    """

    Options = FileTaskOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.template = resolve_template(self.options.question_template)
        self.template_prefix, self.template_suffix = split_template(self.template)
        self.log = RowLog(self.options.on_bad_row)
        self.limits = ImageLimits(self.options.max_image_pixels, self.options.max_aspect_ratio)
        self._splits: dict[str, list[Sample]] = {}
        self._ids: Counter = Counter()

    # ---- subclass API -----------------------------------------------------------------------
    @abstractmethod
    def make_sample(self, row: Any, src: Source, line: int) -> Sample:
        """Turn one parsed row into a sample; raise :class:`BadRow` for bad data."""

    def rows(self, src: Source) -> Iterator[tuple[int, Any]]:
        """``(line, parsed row or BadRow)`` for every row of ``src`` (JSON Lines by default)."""
        return iter_jsonl(src.path, read_bytes(src.path))

    # ---- TaskFormat -------------------------------------------------------------------------
    def splits(self) -> tuple[str, ...]:
        """``("train", "eval")`` when eval files or a validation ratio are configured, else ``("train",)``."""
        o = self.options
        return ("train", "eval") if (o.eval_files or o.val_split_ratio > 0) else ("train",)

    def load(self, split: str = "train") -> Sequence[Sample]:
        """The samples of ``split``; files are parsed once per task object and cached."""
        split = canonical_split(split)
        o = self.options
        if "train" not in self._splits and (split == "train" or o.val_split_ratio > 0):
            rows = self._parse(sources(o.data_files, o.image_folders, o.reward_method))
            self._splits["train"], held = holdout(rows, o.val_split_ratio, o.val_seed)
            if o.val_split_ratio > 0:
                self._splits["eval"] = held
        if split == "eval" and "eval" not in self._splits:
            if not o.eval_files:
                raise ValueError(f"task {self.name!r} has no eval split: set its option eval_files "
                                 "(with eval_image_folders) or val_split_ratio")
            methods = o.eval_reward_method
            if methods is None and o.reward_method and len(o.reward_method) == 1:
                methods = o.reward_method
            self._splits["eval"] = self._parse(sources(o.eval_files, o.eval_image_folders, methods))
        return cap(self._splits[split], o.max_samples)

    def stats(self) -> dict[str, int]:
        """``rows_<split>``, ``skipped_rows``, ``skipped/<reason>`` and format-specific counters."""
        out = {f"rows_{k}": len(v) for k, v in self._splits.items()}
        out["skipped_rows"] = 0
        out.update(self.log.counts)
        return out

    def skips_bad_samples(self) -> bool:
        """``on_bad_row: skip`` also covers images that turn out undecodable during training."""
        return self.options.on_bad_row == "skip"

    # ---- helpers ----------------------------------------------------------------------------
    def _parse(self, srcs: list[Source]) -> list[Sample]:
        out: list[Sample] = []
        for src in srcs:
            for line, row in self.rows(src):
                try:
                    if isinstance(row, BadRow):
                        raise row
                    out.append(self.make_sample(row, src, line))
                except BadRow as exc:
                    self.log.bad(exc, src.path, line)
        return out

    def unique_id(self, row_id: Any, src: Source, line: int) -> str:
        """The row's ``id`` (or ``file:line``), made unique across the task's files."""
        where = f"{os.path.basename(src.path)}:{line}"
        base = str(row_id) if isinstance(row_id, str | int) and not isinstance(row_id, bool) and \
            str(row_id) else where
        self._ids[base] += 1
        if self._ids[base] > 1:
            self.log.counts["duplicate_ids"] += 1
            return f"{base}@{where}"
        return base

    def wrap_question(self, segments: list[str]) -> list[str]:
        """Apply the question template to the text segments between images.

        The template's text before ``{Question}`` joins the first non-empty segment and its text
        after joins the last non-empty one, so the concatenated text equals
        ``template.replace("{Question}", question)`` exactly, as in the original.
        """
        segs = list(segments)
        filled = [i for i, s in enumerate(segs) if s]
        first, last = (filled[0], filled[-1]) if filled else (len(segs) - 1, len(segs) - 1)
        segs[first] = self.template_prefix + segs[first]
        segs[last] = segs[last] + self.template_suffix
        return segs

    def messages(self, content: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat turns: an optional system turn, then the user turn with ``content``."""
        msgs: list[dict[str, Any]] = []
        if self.options.system_prompt:
            msgs.append({"role": "system", "content": [{"type": "text", "text": self.options.system_prompt}]})
        msgs.append({"role": "user", "content": content})
        return msgs
