"""What transformers-native VLM families share, so a family plugin states only its differences.

:class:`TransformersFamily` is a :class:`~core.interfaces.ModelFamily` for checkpoints that load
through ``AutoModelForImageTextToText`` / ``AutoProcessor``. On top of the interface defaults
it checks ``config.model_type`` before loading, repairs ``generate`` where this transformers
needs it, applies ``min_pixels`` / ``max_pixels`` options to the image processor, finds the
vision modules by name and collects the vision placeholder ids generation must never emit. A
family subclass sets class attributes (``model_types``, ``box_convention``,
``vision_towers``, ``suppressed_tokens`` ...) and overrides only what its architecture does
differently (usually ``resized_image_size`` and ``build_tiny_checkpoint``)::

    class MyVLFamily(TransformersFamily):
        name = "my_vl"
        model_types = ("my_vl",)
        box_convention = "normalized_1000"
        Options = PixelBoundsOptions          # min_pixels / max_pixels, applied on load
        vision_towers = ("visual",)
        vision_projectors = ()
        suppressed_tokens = ("<|image|>", "<|begin_of_image|>", "<|end_of_image|>")

The module-level helpers are for family code too. Nothing here imports torch or transformers
at import time, and nothing names a model family.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.interfaces.compat import fix_multi_image_expansion
from core.interfaces.model import ModelFamily

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

#: Config / processor attributes under which transformers VLMs keep vision placeholder ids.
TOKEN_ID_ATTRS: tuple[str, ...] = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "boi_token_index",
    "eoi_token_index",
    "boi_token_id",
    "eoi_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "video_start_token_id",
    "video_end_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)
#: Processor attributes that hold vision placeholder token *strings* (image/video pads, image
#: begin/end markers, Idefics3's fake/global image tokens ...).
PROCESSOR_TOKEN_ATTRS: tuple[str, ...] = (
    "image_token",
    "video_token",
    "boi_token",
    "eoi_token",
    "start_image_token",
    "end_image_token",
    "image_start_token",
    "image_end_token",
    "fake_image_token",
    "global_image_token",
    "vision_start_token",
    "vision_end_token",
)
#: Names transformers gives vision towers (the list ``PreTrainedModel.get_encoder`` searches)
#: and multimodal projectors across its image-text-to-text models.
VISION_TOWER_NAMES: tuple[str, ...] = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_tower")
PROJECTOR_NAMES: tuple[str, ...] = (
    "multi_modal_projector",
    "connector",
    "mm_projector",
    "vision_projection",
    "visual_projection",
    "embed_vision",
)


# ---- helpers -------------------------------------------------------------------------------
def check_ordered(options: BaseModel, low: str, high: str) -> None:
    """Raise ``ValueError`` when options ``low`` and ``high`` are both set and ``low > high``."""
    lo, hi = getattr(options, low), getattr(options, high)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{low} ({lo}) must not exceed {high} ({hi})")


class PixelBoundsOptions(BaseModel):
    """Options with ``min_pixels`` / ``max_pixels``: bounds of the area an image is resized to.

    They become the image processor's ``size.shortest_edge`` / ``size.longest_edge`` (the
    dynamic-resolution processors' area bounds) when :class:`TransformersFamily` loads the
    processor; ``None`` keeps the checkpoint's value. Subclass it to add options.
    """

    model_config = ConfigDict(extra="forbid")
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> PixelBoundsOptions:
        check_ordered(self, "min_pixels", "max_pixels")
        return self


def set_pixel_bounds(image_processor: Any, min_pixels: int | None, max_pixels: int | None, source: Any) -> None:
    """Set ``size.shortest_edge`` / ``size.longest_edge`` of a loaded image processor.

    Set on the loaded object rather than passed to ``from_pretrained``: transformers 5 would
    also keep them as per-call kwargs and warn on every call (and some processors accept them
    only as ``size``). Raises when the result is inverted; ``source`` (the checkpoint path)
    names it, since one bound may come from the checkpoint's preprocessor config.
    """
    updates = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None}
    if not updates:
        return
    size = image_processor.size
    current = dict(size.items()) if hasattr(size, "items") else {
        k: getattr(size, k, None) for k in ("shortest_edge", "longest_edge")}
    merged = {**current, **updates}
    lo, hi = merged.get("shortest_edge"), merged.get("longest_edge")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(
            f"{source}: min_pixels {lo} exceeds max_pixels {hi} "
            "(one of them comes from the checkpoint's preprocessor config)"
        )
    image_processor.size = merged if isinstance(size, dict) else type(size)(**merged)


def size_value(size: Any, key: str) -> Any:
    """``size[key]`` of an image processor's ``size``, a dict or a ``SizeDict`` (``None`` if unset)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def sibling_function(obj: Any, name: str) -> Any:
    """The function ``name`` of the module that defines ``type(obj)``, or ``None``.

    Image processors come in torchvision and PIL backends, each module with its own resize
    helpers (``smart_resize`` ...); calling the one beside the processor's own class gives the
    size the model really saw.
    """
    return getattr(importlib.import_module(type(obj).__module__), name, None)


def single_token_ids(tokenizer: Any, tokens: Iterable[str]) -> set[int]:
    """Ids of those ``tokens`` that are one vocabulary entry each (others are skipped).

    A token missing from a vocabulary maps to the unknown id or ``None``; the round trip
    ``id -> token`` filters both out, so nothing unrelated is ever suppressed.
    """
    ids: set[int] = set()
    for t in tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and tokenizer.convert_ids_to_tokens(i) == t:
            ids.add(i)
    return ids


def transformers_has(module: str) -> bool:
    """Whether ``transformers.models.<module>`` exists (looked up without importing it)."""
    from importlib.util import find_spec

    try:
        return find_spec(f"transformers.models.{module}") is not None
    except ModuleNotFoundError:
        return False


def _embedding_rows(model: Any) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.weight.shape[0]) if emb is not None else 0


# ---- the base family -----------------------------------------------------------------------
class TransformersFamily(ModelFamily):
    """A family of ``AutoModelForImageTextToText`` checkpoints; subclasses state the differences.

    Class attributes (besides :class:`~core.interfaces.ModelFamily`'s):
        model_type_hint: appended to the error for a checkpoint of another ``model_type``.
        repair_generate: apply :func:`core.interfaces.compat.fix_multi_image_expansion` after loading (a
            probe; a no-op where transformers is right).
        vision_towers / vision_projectors: module leaf names of the vision tower(s) and the
            projector(s); the shallowest module of each name is listed, towers first.
        vision_tower_parts: submodules of the tower listed as well (e.g. ``"merger"``), for
            callers that treat the projector separately.
        suppressed_tokens: token strings generation must never emit, besides the ids found
            under :data:`TOKEN_ID_ATTRS` and the strings under :data:`PROCESSOR_TOKEN_ATTRS`.
    """

    model_type_hint: ClassVar[str] = ""
    repair_generate: ClassVar[bool] = True
    vision_towers: ClassVar[tuple[str, ...]] = VISION_TOWER_NAMES
    vision_projectors: ClassVar[tuple[str, ...]] = PROJECTOR_NAMES
    vision_tower_parts: ClassVar[tuple[str, ...]] = ()
    suppressed_tokens: ClassVar[tuple[str, ...]] = ()

    # ---- loading ---------------------------------------------------------------------
    def check_checkpoint(self, path: str | Path) -> Any:
        """Load the checkpoint's config and refuse a ``model_type`` this family does not handle.

        Called before any weights load; returns the ``AutoConfig``.
        """
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path))
        if not self.handles(cfg.model_type):
            hint = f" ({self.model_type_hint})" if self.model_type_hint else ""
            raise ValueError(
                f"{path}: config.model_type is {cfg.model_type!r}, but model family {self.name!r} "
                f"handles {list(self.model_types)}{hint}"
            )
        return cfg

    def load_model(
        self, path: str | Path, *, dtype: torch.dtype, attn_implementation: str | None = None
    ) -> Any:
        """``AutoModelForImageTextToText`` after :meth:`check_checkpoint`, ``generate`` repaired.

        GRPO samples n completions per prompt with ``num_return_sequences``; every one must
        see the prompt's own images, which some transformers versions get wrong.
        """
        self.check_checkpoint(path)
        model = super().load_model(path, dtype=dtype, attn_implementation=attn_implementation)
        if self.repair_generate and fix_multi_image_expansion(model):
            log.info("%s: repaired multi-image expansion in generate()", type(model).__name__)
        return model

    def load_processor(self, path: str | Path) -> Any:
        """``AutoProcessor`` (left padding), with :class:`PixelBoundsOptions` applied if used."""
        proc = super().load_processor(path)
        if isinstance(self.options, PixelBoundsOptions):
            set_pixel_bounds(proc.image_processor, self.options.min_pixels, self.options.max_pixels, path)
        return proc

    # ---- processing ------------------------------------------------------------------
    def resized_image_size(self, processor: Any, image: Image.Image) -> tuple[int, int]:
        """The fixed ``size`` of image processors that resize to ``height`` x ``width``; else unchanged.

        Aspect-preserving resizes, crops and tiling are not modelled: families with those
        override this.
        """
        ip = getattr(processor, "image_processor", None)
        size = getattr(ip, "size", None)
        if size is not None and getattr(ip, "do_resize", True):
            h, w = size_value(size, "height"), size_value(size, "width")
            if h and w:
                return int(w), int(h)
        return image.size

    # ---- facts for training ----------------------------------------------------------
    def vision_module_names(self, model: Any) -> list[str]:
        """The shallowest module of each :attr:`vision_towers` / :attr:`vision_projectors` name.

        Modules inside one already listed are skipped, then :attr:`vision_tower_parts` of the
        tower(s) are appended. Names come from ``named_modules()``, so wrapped models (PEFT,
        DDP) work too. Raises when no tower is found, rather than letting frozen-vision
        training or LoRA silently cover the vision tower.
        """
        names = [n for n, _ in model.named_modules()]
        out: list[str] = []
        for leaf in (*self.vision_towers, *self.vision_projectors):
            hits = [n for n in names if n.rsplit(".", 1)[-1] == leaf]
            if hits:
                best = min(hits, key=lambda n: n.count("."))
                if not any(best == o or best.startswith(o + ".") for o in out):
                    out.append(best)
        towers = [n for n in out if n.rsplit(".", 1)[-1] in self.vision_towers]
        if not towers:
            raise ValueError(
                f"model family {self.name!r}: no vision tower named {'/'.join(self.vision_towers)} in "
                f"{type(model).__name__}"
            )
        present = set(names)
        return out + [p for p in (f"{t}.{part}" for t in towers for part in self.vision_tower_parts) if p in present]

    def suppressed_token_ids(self, processor: Any, model: Any) -> list[int]:
        """Vision placeholder ids: the config's, the processor's and :attr:`suppressed_tokens`.

        Ids under :data:`TOKEN_ID_ATTRS` of the processor, ``model.config`` and its
        ``text_config`` count when inside the vocabulary; strings under
        :data:`PROCESSOR_TOKEN_ATTRS` and :attr:`suppressed_tokens` when they are one
        vocabulary entry. Never hard-coded ids, so tiny and real vocabularies both work.
        """
        tok = getattr(processor, "tokenizer", processor)
        limit = max(len(tok), _embedding_rows(model))
        cfg = getattr(model, "config", None)
        ids: set[int] = set()
        for src in (processor, cfg, getattr(cfg, "text_config", None)):
            for attr in TOKEN_ID_ATTRS:
                val = getattr(src, attr, None)
                if isinstance(val, int) and 0 <= val < limit:
                    ids.add(val)
        strings = [getattr(processor, a, None) for a in PROCESSOR_TOKEN_ATTRS]
        ids |= single_token_ids(tok, [s for s in strings if isinstance(s, str)] + list(self.suppressed_tokens))
        return sorted(ids)
