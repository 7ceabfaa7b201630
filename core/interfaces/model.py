"""Model-family interface: everything the engine must know about one VLM architecture.

A family is chosen by the checkpoint's ``config.model_type`` (never by a substring of its
path) or named explicitly in the config. The defaults below follow the transformers
conventions that most ``AutoModelForImageTextToText`` checkpoints share; families override
what differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel

from core.interfaces.base import Component

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: How a family writes boxes in its answers:
#: ``absolute_resized``: pixels of the resized image the model saw (Qwen2.5-VL);
#: ``normalized_1000``: 0-1000 relative coordinates (Qwen2-VL, Qwen3-VL, InternVL);
#: ``absolute_original``: pixels of the original image; ``unknown``: rewards must be told.
BoxConvention = Literal["absolute_resized", "normalized_1000", "absolute_original", "unknown"]


class ModelFamily(Component):
    """A VLM family: loading, prompting, processing and the facts training needs.

    Class attributes:
        model_types: the ``config.model_type`` values this family handles.
        box_convention: see :data:`BoxConvention`.
        fallback: a family that claims model_types others may also claim (e.g. every
            ``AutoModelForImageTextToText`` type); chosen by ``config.model_type`` only when
            no non-fallback family claims the checkpoint.
        per_token_keys: processor outputs aligned with ``input_ids`` that must be extended
            (with zeros) over completion tokens for the training forward, so training-time
            log-probabilities use the same multimodal positions generation used.
        prefix_sharing: whether the engine may run this family's training passes with each
            group's prompt once (:mod:`core.grpo.prefix`): a prompt pass whose KV cache the
            completions run on, or one packed row per group under a block-causal mask. Opt in
            once the ``shared_prefix`` conformance check passes: it needs a model whose
            positions come from :meth:`prompt_positions` and whose attention is purely causal
            (not, e.g., bidirectional over image tokens).
        shared_prefill: whether the built-in rollout may prefill each unique prompt once and
            repeat its KV cache for the n samples (:mod:`core.plugins.builtin.prefill`) instead of
            prefilling n copies. Opt in once the ``shared_prefill`` conformance check passes:
            it needs a model whose ``generate`` continues from a given cache with the
            positions ``generate`` itself computes for the prompt.
        compact_decode: whether the built-in rollout may sample with its own decode loop, which
            drops finished rows from the batch (:mod:`core.plugins.builtin.decode`), instead of
            ``generate``. Opt in once the ``compact_decode`` conformance check passes: it needs
            what ``shared_prefill`` needs, plus a cache whose rows can be selected
            (``Cache.batch_select_indices``) and decode positions of ``last prompt position + t``
            on every axis, as ``generate`` computes them.
        tiny_options: the pydantic model of :meth:`build_tiny_checkpoint`'s options (a
            :class:`~core.interfaces.TinyOptions` subclass). Set, ``model.tiny`` is validated
            against it when the config is planned (``--dry-run`` included), before anything is built.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    tiny_options: ClassVar[type[BaseModel] | None] = None
    box_convention: ClassVar[BoxConvention] = "unknown"
    fallback: ClassVar[bool] = False
    per_token_keys: ClassVar[tuple[str, ...]] = ("token_type_ids", "mm_token_type_ids")
    prefix_sharing: ClassVar[bool] = False
    shared_prefill: ClassVar[bool] = False
    compact_decode: ClassVar[bool] = False

    # ---- selection -------------------------------------------------------------------
    @classmethod
    def handles(cls, model_type: str) -> bool:
        """Whether a checkpoint with this ``config.model_type`` belongs to the family."""
        return model_type in cls.model_types

    # ---- loading ---------------------------------------------------------------------
    def load_model(
        self, path: str | Path, *, dtype: torch.dtype, attn_implementation: str | None = None
    ) -> Any:
        """Load the model for training/generation (default: ``AutoModelForImageTextToText``)."""
        from transformers import AutoModelForImageTextToText

        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)

    def load_processor(self, path: str | Path) -> Any:
        """Load the processor (default: ``AutoProcessor``), left-padded for generation."""
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(str(path), **self.processor_init_kwargs())
        tok = getattr(proc, "tokenizer", proc)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return proc

    def processor_init_kwargs(self) -> dict[str, Any]:
        """Extra ``AutoProcessor.from_pretrained`` kwargs (e.g. min/max pixels)."""
        return {}

    def processor_call_kwargs(self) -> dict[str, Any]:
        """Extra kwargs for every processor call (e.g. InternVL's ``crop_to_patches``)."""
        return {}

    # ---- prompting and processing --------------------------------------------------
    def render_prompt(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        """Render chat messages (with ``{"type": "image"}`` placeholders) to prompt text."""
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def process(
        self, processor: Any, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]
    ) -> Any:
        """Tokenise prompts and preprocess their images into one left-padded batch."""
        flat = [img for imgs in images for img in imgs]
        kwargs = dict(self.processor_call_kwargs())
        if flat:
            kwargs["images"] = flat
        return processor(text=list(texts), padding=True, return_tensors="pt", **kwargs)

    def resized_image_size(self, processor: Any, image: Image.Image) -> tuple[int, int]:
        """``(width, height)`` of ``image`` as the model sees it (default: unchanged)."""
        return image.size

    def box_to_original(
        self,
        box: Sequence[float],
        original_size: tuple[int, int],
        resized_size: tuple[int, int],
    ) -> list[float]:
        """Map a box written in this family's convention back to original-image pixels."""
        ow, oh = original_size
        conv = self.box_convention
        if conv == "normalized_1000":
            return [box[0] * ow / 1000, box[1] * oh / 1000, box[2] * ow / 1000, box[3] * oh / 1000]
        if conv == "absolute_resized":
            rw, rh = resized_size
            sx, sy = ow / rw, oh / rh
            return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
        return [float(v) for v in box]

    # ---- facts for training ----------------------------------------------------------
    def vision_module_names(self, model: Any) -> list[str]:
        """Qualified names of the vision tower (and projector) modules inside ``model``."""
        return []

    def suppressed_token_ids(self, processor: Any, model: Any) -> list[int]:
        """Token ids generation must never emit (image/video pads and similar)."""
        return []

    def prompt_positions(self, model: Any, inputs: Any) -> torch.Tensor | None:
        """Position ids of processed, left-padded prompts, for the packed training forward.

        ``[axes, B, L]`` for multimodal RoPE, ``[B, L]`` for 1-D positions, or ``None`` for
        ``0 .. len-1`` over each prompt's unpadded tokens. The default asks the model's own
        ``get_rope_index`` (Qwen2/2.5/3-VL, GLM-4V) and otherwise returns ``None``.
        """
        import inspect

        import torch

        finder = next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)
        if finder is None:
            return None
        fn = finder.get_rope_index
        params = inspect.signature(fn).parameters
        keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
        kwargs = {k: inputs.get(k) for k in keys if k in params}
        if "mm_token_type_ids" in params and kwargs.get("mm_token_type_ids") is None:
            return None  # cannot tell image tokens from text: let the caller use 1-D positions
        with torch.no_grad():
            return fn(**kwargs)[0]

    # ---- offline tiny checkpoints (tests, quickstart) ------------------------------
    @classmethod
    def build_tiny_checkpoint(cls, path: str | Path, **options: Any) -> Path:
        """Write a tiny, randomly initialised but architecturally real checkpoint.

        The result must load back through the same code path a real checkpoint takes
        (``load_model`` / ``load_processor``). Families that cannot build one raise
        ``NotImplementedError``.
        """
        raise NotImplementedError(f"model family {cls.name!r} cannot build tiny checkpoints")
