"""Shared machinery of the file-backed tasks.

Options, row errors and skip counting, image paths, file readers with line numbers, and the
validation split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.interfaces import DataError, ImageFormatError, Sample
from core.interfaces import open_image as open_allowed_image
from vlmr1_jsonl.templates import resolve_template

logger = logging.getLogger("vlmr1.tasks.jsonl")

#: At most this many skipped rows are logged one by one; the rest only count (see ``stats()``).
LOG_SKIPS = 20

SPLIT_ALIASES = {"validation": "eval", "val": "eval", "test": "eval"}


def canonical_split(split: str) -> str:
    """``train`` or ``eval`` (``validation``/``val``/``test`` are aliases of ``eval``)."""
    s = SPLIT_ALIASES.get(split, split)
    if s not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'eval' (aliases: {', '.join(SPLIT_ALIASES)})")
    return s


# ---- options ----------------------------------------------------------------------------------
def _colon_list(value: Any) -> Any:
    """Accept the original scripts' ``a.jsonl:b.jsonl`` strings as well as YAML lists."""
    if isinstance(value, str):
        return value.split(":")
    return value


def _check_items(name: str, items: list[str] | None) -> list[str] | None:
    if items is not None and any(not s.strip() for s in items):
        raise ValueError(f"{name} has an empty entry: {items!r} (a stray ':'?)")
    return items


def _aligned(name: str, items: list | None, files: list[str] | None, files_name: str) -> None:
    if items is None or files is None:
        return
    if len(items) not in (1, len(files)):
        raise ValueError(f"{name} has {len(items)} entries but {files_name} has {len(files)}: give one "
                         f"per data file (in the same order) or a single one for all")


class FileTaskOptions(BaseModel):
    """Options shared by the file-backed tasks (see the README for each)."""

    model_config = ConfigDict(extra="forbid")

    data_files: list[str] = Field(min_length=1, description="data files ('a:b' string or list)")
    image_folders: list[str] | None = Field(
        None, description="one image folder per data file, or one for all; default: each file's folder")
    reward_method: list[str] | None = Field(
        None, description="accu_reward_method per data file (or one for all); a row's own value wins")
    question_template: str = Field("r1", description="r1 | rec | ic | od | none | a custom '{Question} ...'")
    system_prompt: str | None = Field(None, description="optional system turn before the user turn")
    eval_files: list[str] | None = Field(None, description="data files of the eval split")
    eval_image_folders: list[str] | None = None
    eval_reward_method: list[str] | None = Field(
        None, description="per eval file; default: reward_method when that is a single value")
    val_split_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="hold out this share of train rows as eval")
    val_seed: int = Field(0, description="seed of the held-out split (deterministic on every rank)")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: raise DataError naming file:line; skip: drop the row and count it")
    allow_outside_image_folder: bool = Field(
        False, description="allow absolute image paths and '..' that leave the image folder")
    check_images: Literal["exists", "header", "decode"] = Field(
        "header", description="at load time: check that image files exist; also read each header (format, size "
                              "within the pixel budget, aspect ratio: no decoding); or fully decode each one")
    max_image_pixels: int = Field(
        100_000_000, ge=1, description="pixel budget per image: a larger one (e.g. a decompression bomb) is a bad "
                                       "row, refused from its header before any decoding")
    max_aspect_ratio: float = Field(
        200.0, ge=1.0, description="longer side / shorter side above this is a bad row (Qwen-VL processors fail "
                                   "past 200)")
    max_samples: int | None = Field(None, ge=1, description="keep at most this many samples per split")

    @field_validator("data_files", "image_folders", "reward_method", "eval_files", "eval_image_folders",
                     "eval_reward_method", mode="before")
    @classmethod
    def _split_colons(cls, v: Any) -> Any:
        return _colon_list(v)

    @field_validator("data_files", "image_folders", "eval_files", "eval_image_folders", "reward_method",
                     "eval_reward_method")
    @classmethod
    def _no_empty(cls, v: list[str] | None, info) -> list[str] | None:
        return _check_items(info.field_name, v)

    @field_validator("question_template")
    @classmethod
    def _template(cls, v: str) -> str:
        resolve_template(v)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        _aligned("image_folders", self.image_folders, self.data_files, "data_files")
        _aligned("reward_method", self.reward_method, self.data_files, "data_files")
        _aligned("eval_image_folders", self.eval_image_folders, self.eval_files, "eval_files")
        _aligned("eval_reward_method", self.eval_reward_method, self.eval_files, "eval_files")
        if self.eval_files and self.val_split_ratio > 0:
            raise ValueError("give either eval_files or val_split_ratio, not both")
        if self.eval_files is None and (self.eval_image_folders or self.eval_reward_method):
            raise ValueError("eval_image_folders / eval_reward_method need eval_files")
        return self


@dataclass(frozen=True)
class Source:
    """One data file with its image folder and default reward method."""

    path: str
    image_folder: str
    reward_method: str | None


def _pick(items: list[str] | None, i: int) -> str | None:
    if not items:
        return None
    return items[0] if len(items) == 1 else items[i]


def sources(files: list[str], folders: list[str] | None, methods: list[str] | None) -> list[Source]:
    """Pair each data file with its folder (default: the file's own folder) and reward method."""
    out = []
    for i, f in enumerate(files):
        folder = _pick(folders, i) or os.path.dirname(os.path.abspath(f))
        out.append(Source(f, folder, _pick(methods, i)))
    return out


# ---- bad rows ---------------------------------------------------------------------------------
class BadRow(Exception):
    """A row that cannot become a sample; ``reason`` is the stats key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Skipped:
    """Record of one skipped row."""

    file: str
    line: int
    reason: str
    message: str


@dataclass
class RowLog:
    """Applies ``on_bad_row`` and keeps the counters that ``stats()`` reports."""

    on_bad_row: str
    counts: Counter = field(default_factory=Counter)
    skipped: list[Skipped] = field(default_factory=list)

    def bad(self, exc: BadRow, file: str, line: int) -> None:
        """Raise a :class:`DataError` naming ``file:line``, or record and log the skip."""
        if self.on_bad_row == "error":
            raise DataError(f"{exc} [{exc.reason}] (set on_bad_row: skip to skip such rows)",
                            file=file, line=line) from exc
        self.skipped.append(Skipped(file, line, exc.reason, str(exc)))
        self.counts["skipped_rows"] += 1
        self.counts[f"skipped/{exc.reason}"] += 1
        n = self.counts["skipped_rows"]
        if n <= LOG_SKIPS:
            logger.warning("skipping %s:%d: %s [%s]", file, line, exc, exc.reason)
        elif n == LOG_SKIPS + 1:
            logger.warning("more rows skipped; see the task's stats() for the counts")


# ---- images -----------------------------------------------------------------------------------
class ImageRef(os.PathLike):
    """A lazily loaded image file: ``os.fspath(ref)`` is its path, ``ref()`` decodes it to RGB.

    Decoding failures of any kind (PIL raises OSError, SyntaxError, ValueError or
    DecompressionBombError for broken files) become one :class:`DataError` naming the data file
    and line the image came from, so a bad image never surfaces as an anonymous crash.
    """

    __slots__ = ("path", "file", "line", "limits")

    def __init__(self, path: str, file: str | None = None, line: int | None = None,
                 limits: ImageLimits | None = None) -> None:
        self.path, self.file, self.line, self.limits = path, file, line, limits

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"ImageRef({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageRef) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __reduce__(self):
        return (ImageRef, (self.path, self.file, self.line, self.limits))

    def __call__(self):
        """Open and fully decode the image as RGB."""
        try:
            return decode_image(self.path, self.limits)
        except BadRow as exc:  # already says what is wrong with which image
            raise DataError(f"{exc} [{exc.reason}]", file=self.file, line=self.line) from exc
        except Exception as exc:  # noqa: BLE001 - any decoder failure is bad data, reported with its row
            raise DataError(f"cannot read image {self.path}: {type(exc).__name__}: {exc}",
                            file=self.file, line=self.line) from exc


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be, checked from its header before any pixel is decoded."""

    max_pixels: int = 100_000_000
    max_aspect_ratio: float = 200.0

    def check(self, img: Any, path: str) -> None:
        """Raise :class:`BadRow` for an empty, oversized (decompression bomb) or extreme-aspect image."""
        w, h = img.size
        if w < 1 or h < 1:
            raise BadRow("unreadable_image", f"image {path} has size {w}x{h}")
        if w * h > self.max_pixels:
            raise BadRow("image_too_large", f"image {path} is {w}x{h} = {w * h / 1e6:.0f} Mpx, over the pixel "
                         f"budget max_image_pixels={self.max_pixels} (a decompression bomb?); not decoded")
        if max(w, h) / min(w, h) > self.max_aspect_ratio:
            raise BadRow("image_aspect", f"image {path} is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f} "
                         f"over max_aspect_ratio={self.max_aspect_ratio:g}")


def open_image(path: str, limits: ImageLimits | None = None):
    """Open ``path`` lazily (header only) and check it against ``limits``; raise :class:`BadRow` if unusable.

    Only the formats of :data:`core.interfaces.IMAGE_FORMATS` are tried (an EPS named ``.png``
    is refused, never handed to Ghostscript). PIL's own decompression-bomb guard (an error from
    ~179 Mpx) still applies on top.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below decides
            img = open_allowed_image(path)
    except ImageFormatError as exc:
        raise BadRow("unreadable_image", f"cannot read image {path}: it {exc.detail}") from exc
    except Image.DecompressionBombError as exc:  # PIL refuses past ~179 Mpx while reading the header
        budget = (limits or ImageLimits()).max_pixels
        raise BadRow("image_too_large", f"image {path} is over the pixel budget max_image_pixels={budget} (a "
                     f"decompression bomb? PIL: {exc}); not decoded") from exc
    except Exception as exc:  # noqa: BLE001 - not an image, empty, truncated header, PIL's bomb error
        raise BadRow("unreadable_image", f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    try:
        (limits or ImageLimits()).check(img, path)
    except BadRow:
        img.close()
        raise
    return img


def decode_image(path: str, limits: ImageLimits | None = None):
    """Open and fully decode ``path`` (not just the header), converted to RGB, within ``limits``."""
    with open_image(path, limits) as img:
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img.copy()


def resolve_image(name: Any, folder: str, allow_outside: bool, check: str, limits: ImageLimits | None = None) -> str:
    """The path of image ``name`` inside ``folder``; raises :class:`BadRow` if it is unusable.

    The containment check is lexical (absolute paths and ``..`` components), not ``realpath``,
    so dataset folders built from symlinks keep working.
    """
    if not isinstance(name, str) or not name.strip():
        raise BadRow("wrong_type", f"image entries must be non-empty strings, got {name!r}")
    if not allow_outside:
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
            raise BadRow("image_outside_folder", f"image path {name!r} leaves its image folder {folder!r} "
                         "(set allow_outside_image_folder: true to allow it)")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        if os.path.exists(path):  # a folder, FIFO or device: opening it could block or never end
            raise BadRow("missing_image", f"image {path} is not a regular file (a folder, FIFO or device?)")
        raise BadRow("missing_image", f"image {path} does not exist")
    if check == "header":
        open_image(path, limits).close()
    elif check == "decode":
        try:
            decode_image(path, limits)
        except BadRow:
            raise
        except Exception as exc:  # noqa: BLE001 - see ImageRef.__call__
            raise BadRow("unreadable_image", f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc
    return path


# ---- readers ----------------------------------------------------------------------------------
def read_bytes(path: str) -> bytes:
    """The file's bytes; a missing, unreadable or non-regular data file is a configuration error.

    The file type is checked before opening: reading a FIFO blocks until a writer comes, and a
    device such as ``/dev/zero`` never ends (it filled memory).
    """
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise DataError("the data file is a folder; give the .jsonl/.json file(s) in it", file=path)
        if not stat.S_ISREG(mode):
            raise DataError("the data file is not a regular file (a FIFO, socket or device?); give a "
                            ".jsonl/.json file", file=path)
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"cannot read data file: {exc.strerror or exc}", file=path) from exc


def iter_jsonl(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_value_or_BadRow)`` for every non-blank line (1-based).

    Lines are decoded one at a time so one bad byte costs one row, not the file.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for i, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield i, BadRow("invalid_utf8", f"line is not valid UTF-8: {exc}")
            continue
        try:
            yield i, json.loads(text)
        except json.JSONDecodeError as exc:
            yield i, BadRow("malformed_json", f"malformed JSON: {exc.msg} at column {exc.colno}")
        except (ValueError, RecursionError) as exc:  # e.g. an integer past Python's digit limit, deep nesting
            yield i, BadRow("malformed_json", f"malformed JSON: {type(exc).__name__}: {str(exc)[:200]}")


def iter_json_array(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, element)`` for each element of a top-level JSON array.

    The standard ``json`` module gives no positions for array elements, so the array is walked
    with ``JSONDecoder.raw_decode`` to report the line each element starts on. A syntax error
    in an array cannot be skipped past reliably, so it is always a :class:`DataError`.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8: {exc}", file=path, line=line) from exc
    dec = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise DataError("expected a JSON array", file=path, line=text.count("\n", 0, pos) + 1)
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg} at column {exc.colno}", file=path, line=exc.lineno) from exc
        except (ValueError, RecursionError) as exc:
            raise DataError(f"malformed JSON: {type(exc).__name__}: {str(exc)[:200]}", file=path, line=line) from exc
        yield line, value
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if _skip_ws(text, pos + 1) != len(text):
                raise DataError("extra data after the JSON array", file=path, line=text.count("\n", 0, pos) + 1)
            return
        raise DataError("malformed JSON array: expected ',' or ']'", file=path,
                        line=text.count("\n", 0, min(pos, len(text))) + 1)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# ---- values -----------------------------------------------------------------------------------
def check_box(box: Any, what: str = "box") -> list[float]:
    """``[x1, y1, x2, y2]`` as floats; raises :class:`BadRow` unless 4 finite numbers with x1<=x2, y1<=y2."""
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in box):
        raise BadRow("invalid_box", f"{what} must be a list of 4 numbers [x1, y1, x2, y2], got {box!r}")
    try:
        vals = [float(v) for v in box]
    except OverflowError:  # an integer too large for a float
        vals = [math.inf]
    if not all(math.isfinite(v) for v in vals):
        raise BadRow("invalid_box", f"{what} has a non-finite value: {box!r}")
    if vals[2] < vals[0] or vals[3] < vals[1]:
        raise BadRow("invalid_box", f"{what} {box!r} has x2 < x1 or y2 < y1")
    return vals


# ---- splits -----------------------------------------------------------------------------------
def holdout(samples: list[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off ``round(ratio * n)`` samples (at least 1 when ratio > 0 and n > 1) as eval.

    ``random.Random(seed)`` is platform-independent, so every rank and every run draws the same
    split; both parts keep file order (the trainer's sampler does the shuffling).
    """
    n = len(samples)
    if ratio <= 0 or n < 2:
        return samples, []
    k = min(n - 1, max(1, round(ratio * n)))
    chosen = set(random.Random(seed).sample(range(n), k))
    return ([s for i, s in enumerate(samples) if i not in chosen],
            [s for i, s in enumerate(samples) if i in chosen])


def cap(samples: Sequence[Sample], max_samples: int | None) -> list[Sample]:
    """The first ``max_samples`` samples (all when ``None``)."""
    return list(samples if max_samples is None else samples[:max_samples])
