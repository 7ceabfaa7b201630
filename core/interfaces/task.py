"""Task-format interface: turn a data source into :class:`Sample` objects.

Messages use the Hugging Face chat content format. Images are placed where the
``{"type": "image"}`` entries stand in the content list; the model family renders them
with its own chat template. Images load lazily through :meth:`Sample.load_images`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.interfaces.base import Component

if TYPE_CHECKING:
    from PIL import Image

class DataError(ValueError):
    """Bad input data, with the file and line (1-based) where it was found."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(f"{where}{message}")
        self.file, self.line = file, line


@dataclass
class Sample:
    """One training or evaluation example.

    Attributes:
        id: stable identifier (used in logs and for exact resume).
        images: image references (a path, a PIL image, or a zero-argument loader), in the
            order their placeholders appear in ``messages``.
        messages: chat turns up to (not including) the answer, e.g.
            ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]``.
        solution: ground truth handed to rewards (a string, a box, a list of boxes ...).
        reward_method: VLM-R1's ``accu_reward_method`` for this row, if any.
        meta: anything else rewards or evaluation may need (dataset name, source file, ...).
    """

    id: str
    images: list[Any]
    messages: list[dict[str, Any]]
    solution: Any = None
    reward_method: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_images(self) -> list[Image.Image]:
        """Load every image as RGB. Raises :class:`DataError` naming the file if one fails."""
        from PIL import Image

        from core.interfaces.images import open_image

        out = []
        for src in self.images:
            if isinstance(src, Image.Image):
                img = src
            elif callable(src):
                img = src()
            else:
                try:
                    with open_image(src) as f:  # allowed formats only (core.interfaces.images)
                        img = f.copy()
                except Exception as exc:  # noqa: BLE001 - PIL's DecompressionBombError is neither OSError nor ValueError
                    raise DataError(
                        f"sample {self.id!r}: cannot read image {src}: {exc}",
                        file=self.meta.get("source_file"),
                        line=self.meta.get("source_line"),
                    ) from exc
            out.append(img if img.mode == "RGB" else img.convert("RGB"))
        return out

    @property
    def question(self) -> str:
        """The concatenated text of the last user turn (for logs and text-only back ends)."""
        for msg in reversed(self.messages):
            if msg.get("role") == "user":
                content = msg.get("content")
                if isinstance(content, str):
                    return content
                return "".join(c.get("text", "") for c in content if c.get("type") == "text")
        return ""


class TaskFormat(Component):
    """A data format. ``load(split)`` returns a random-access sequence of samples.

    Implementations validate rows eagerly enough that a malformed row is reported with its
    file and line before training starts (or skipped and counted, per their options), and
    expose counts of skipped rows through :meth:`stats`.
    """

    @abstractmethod
    def load(self, split: str = "train") -> Sequence[Sample]:
        """Return the samples of ``split`` (``"train"`` or ``"eval"``)."""

    def splits(self) -> tuple[str, ...]:
        """The splits :meth:`load` can return; a task without held-out data returns ``("train",)``."""
        return ("train", "eval")

    def stats(self) -> dict[str, int]:
        """Counters for the logs, e.g. ``{"skipped_rows": 3}``."""
        return {}

    def skips_bad_samples(self) -> bool:
        """Whether a sample whose images fail to decode during training may be skipped.

        Rows are validated at :meth:`load`, but some faults (pixel data corrupt past a valid
        header) only show when an image is decoded. ``True`` lets the trainer replace such a
        sample by another prompt, warn naming its file and line, and count it
        (``data/skipped_samples``); ``False`` (the default) stops the run with the
        :class:`DataError`. Formats with a skip option for bad rows return that option.
        """
        return False
