"""Model families for Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

All three share one processor design (``<|vision_start|><|image_pad|>…<|vision_end|>``
placeholders expanded by the processor, dynamic resolution via ``smart_resize``, 3-D
multimodal RoPE driven by ``mm_token_type_ids``), so one base class carries the behaviour and
the subclasses state what differs: ``model_type``, box convention and the tiny architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, model_validator

from core.interfaces import (
    PixelBoundsOptions,
    TinyOptions,
    TransformersFamily,
    save_tiny_model,
    sibling_function,
    transformers_has,
)

if TYPE_CHECKING:
    from PIL import Image

#: The special tokens of the real Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizers that the
#: processors and chat templates use (tiny checkpoints carry the same strings).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Vision placeholder tokens: generation emitting one breaks the next forward ("Image
#: features and image tokens do not match") or corrupts the multimodal positions.
VISION_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template of Qwen2-VL-Instruct (Qwen2.5-VL's is the same), with the default system
# prompt made switchable because Qwen3-VL's template adds none.
_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and DEFAULT_SYSTEM %}"
    "<|im_start|>system\nDEFAULT_SYSTEM<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_chat_template(default_system: str | None) -> str:
    """The Qwen-VL chat template; ``default_system`` is inserted when a chat has no system turn."""
    if default_system:
        return _CHAT_TEMPLATE.replace("and DEFAULT_SYSTEM %}", "%}").replace("DEFAULT_SYSTEM", default_system)
    return _CHAT_TEMPLATE.replace(
        "{% if loop.first and message['role'] != 'system' and DEFAULT_SYSTEM %}"
        "<|im_start|>system\nDEFAULT_SYSTEM<|im_end|>\n{% endif %}",
        "",
    )


class QwenVLOptions(PixelBoundsOptions):
    """Options of every Qwen-VL family.

    ``min_pixels`` / ``max_pixels`` bound the area an image is resized to (the processor's
    ``size.shortest_edge`` / ``size.longest_edge``); ``None`` keeps the checkpoint's values.
    VLM-R1's REC recipe uses ``max_pixels = 12845056`` and ``min_pixels = 3136``.
    """


class TinyQwenOptions(TinyOptions):
    """Options of :meth:`QwenVLFamily.build_tiny_checkpoint` (all overridable).

    ``rope_theta`` is tiny on purpose: with the real 1e6 a 2-layer, 16-dim-head model cannot
    tell nearby positions apart, so it cannot resolve which image token is where.
    ``mrope_section`` defaults to the real checkpoints' split scaled to ``head_dim / 2``.

    ``num_heads`` defaults to ``hidden_size // 16`` (head_dim 16, at least one head) and
    ``num_kv_heads`` to half of it, so a wider model gets more heads rather than wider ones.
    Grounding depends on it: a model reads *where* an image token is only through its heads'
    rotary position patterns, and learning that starts from a plateau where it ignores the image
    and writes the marginal box distribution. With hidden 128, the old fixed 4 heads (head_dim 32)
    stayed on that plateau for 1500 SFT steps at lr 1e-3 (every greedy answer the same box) and
    left it only at lr 3e-3 after ~600 steps; 8 heads of 16 left it by step ~350 at lr 1e-3
    (examples/grounding_cpu/README.md has the measurements). The other decoder and tokenizer
    options are :class:`~core.interfaces.tiny.TinyOptions`'.
    """

    num_heads: int | None = Field(None, ge=1, description="default: hidden_size // 16")
    num_kv_heads: int | None = Field(None, ge=1, description="default: half of num_heads (at least 1)")
    mrope_section: list[int] | None = None
    vision_depth: int = Field(2, ge=1)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    def resolve_defaults(self) -> None:
        """Heads from ``hidden_size`` (head_dim 16) and half as many KV heads, where not given."""
        if self.num_heads is None:
            self.num_heads = max(1, self.hidden_size // 16)
        if self.num_kv_heads is None:
            self.num_kv_heads = max(1, self.num_heads // 2) if self.num_heads % 2 == 0 else self.num_heads

    @model_validator(mode="after")
    def _shapes(self) -> TinyQwenOptions:
        half = self.hidden_size // self.num_heads // 2
        if self.mrope_section is not None and (len(self.mrope_section) != 3 or sum(self.mrope_section) != half):
            raise ValueError(f"mrope_section {self.mrope_section} must be 3 ints summing to head_dim/2 = {half}")
        return self


class QwenVLFamily(TransformersFamily):
    """Shared behaviour of the Qwen-VL families (not registered itself).

    Loading, the pixel-bound options, vision modules and suppressed ids are
    :class:`~core.interfaces.TransformersFamily`'s, set by the class attributes below.
    """

    tiny_options = TinyQwenOptions  # model.tiny is validated against it at plan time

    Options = QwenVLOptions
    #: Training passes run one prompt per group (core.grpo.prefix); mRoPE from get_rope_index.
    prefix_sharing = True
    #: Generation prefills each prompt once, cache repeated per sample (core.plugins.builtin.prefill).
    shared_prefill = True
    #: Rollout decodes with a loop that drops finished rows (core.plugins.builtin.decode).
    compact_decode = True
    #: Text of the default system turn the family's chat template inserts (None: none).
    default_system: ClassVar[str | None] = "You are a helpful assistant."
    #: Vision patch size and default tiny image-area bounds (multiples of (patch * 2)^2).
    tiny_patch_size: ClassVar[int] = 14
    #: Whether the text RoPE interleaves the T/H/W sections (Qwen3-VL) or concatenates them.
    mrope_interleaved: ClassVar[bool] = False
    #: The tower is ``model.visual``; its projectors (``merger`` and, for Qwen3-VL, the
    #: ``deepstack_merger_list``) live inside it and are listed too.
    vision_towers = ("visual",)
    vision_projectors = ()
    vision_tower_parts = ("merger", "deepstack_merger_list")
    suppressed_tokens = VISION_TOKENS

    # ---- processing ------------------------------------------------------------------
    def resized_image_size(self, processor: Any, image: Image.Image) -> tuple[int, int]:
        """``(width, height)`` after the image processor's ``smart_resize``.

        Calls the ``smart_resize`` of the module that defines the processor's own class (the
        torchvision or the PIL backend), so the result is what the model saw.
        """
        ip = processor.image_processor
        smart_resize = sibling_function(ip, "smart_resize")
        if smart_resize is None:  # a subclass defined elsewhere: use the reference one
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        min_px, max_px = ip.size.get("shortest_edge"), ip.size.get("longest_edge")
        width, height = image.size
        h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=min_px, max_pixels=max_px)
        return int(w), int(h)

    # ---- offline tiny checkpoints ----------------------------------------------------
    @classmethod
    def _tiny_configs(cls, o: TinyQwenOptions, text: dict[str, Any], token_ids: dict[str, int]) -> Any:
        """The model config of the tiny architecture (per family)."""
        raise NotImplementedError

    @classmethod
    def _tiny_vision(cls, o: TinyQwenOptions, **extra: Any) -> dict[str, Any]:
        """The vision-config keys every Qwen-VL tower shares (2x2 merge, 2 frames), plus ``extra``."""
        return {"depth": o.vision_depth, "num_heads": o.vision_heads, "patch_size": cls.tiny_patch_size,
                "spatial_merge_size": 2, "temporal_patch_size": 2, **extra}

    @classmethod
    def _tiny_processor_class(cls) -> Any:
        """The family's real processor class (per family)."""
        raise NotImplementedError

    @classmethod
    def _tiny_video_processor(cls, min_pixels: int, max_pixels: int, **kw: Any) -> Any:
        """The video processor of the tiny checkpoint (Qwen2-VL's; a video may have twice the area)."""
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels * 2, **kw)

    @classmethod
    def _tiny_processor(cls, tokenizer: Any, min_pixels: int, max_pixels: int, chat_template: str) -> Any:
        """The real processor classes of the family around the tiny tokenizer."""
        from transformers import Qwen2VLImageProcessor

        kw = {"patch_size": cls.tiny_patch_size, "merge_size": 2, "temporal_patch_size": 2}
        return cls._tiny_processor_class()(
            image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **kw),
            tokenizer=tokenizer,
            video_processor=cls._tiny_video_processor(min_pixels, max_pixels, **kw),
            chat_template=chat_template,
        )

    @classmethod
    def _mrope_section(cls, half: int) -> list[int]:
        """The T/H/W split of ``head_dim / 2`` frequencies, scaled from the real checkpoints."""
        if cls.mrope_interleaved:  # Qwen3-VL: [24, 20, 20] of 64
            hw = max(1, round(half * 20 / 64))
            return [half - 2 * hw, hw, hw]
        t = max(1, half // 4)  # Qwen2/2.5-VL: [16, 24, 24] of 64
        h = (half - t) // 2
        return [t, h, half - t - h]

    @classmethod
    def build_tiny_checkpoint(cls, path: str | Path, **options: Any) -> Path:
        """Write a tiny random checkpoint of this architecture to ``path`` and return it.

        Text: ``hidden_size`` 64, 2 layers, ``hidden_size // 16`` heads (head_dim 16), ``rope_theta`` 3; vision:
        depth 2, hidden 32, spatial merge 2, real patch size; a tiny byte-level BPE tokenizer
        with the real Qwen special tokens and a Qwen chat template; the real image/video
        processor classes with small pixel bounds (a 56x56 image is 4 image tokens); EOS
        ``<|im_end|>``. Options: see :class:`TinyQwenOptions`. Reloads with
        ``AutoModelForImageTextToText`` / ``AutoProcessor`` offline.
        """
        o, path = TinyQwenOptions.for_build(cls, path, options)
        factor = cls.tiny_patch_size * 2  # patch * spatial merge
        min_px = o.min_pixels if o.min_pixels is not None else factor * factor
        max_px = o.max_pixels if o.max_pixels is not None else (2 * factor) ** 2

        template = qwen_chat_template(cls.default_system)
        from transformers import Qwen2Tokenizer
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        # The real Qwen tokenizer class and split pattern (digits one by one), so tiny and
        # real checkpoints tokenise boxes and numbers the same way.
        tok = o.tokenizer(QWEN_SPECIAL_TOKENS, ["Picture 1: Picture 2: Video 1:"],
                          pre_tokenizer_regex=PRETOKENIZE_REGEX, tokenizer_class=Qwen2Tokenizer,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.chat_template = template
        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
        token_ids = {
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
        }
        head_dim = o.hidden_size // o.num_heads
        rope: dict[str, Any] = {
            "rope_type": "default",
            "rope_theta": o.rope_theta,
            "mrope_section": o.mrope_section or cls._mrope_section(head_dim // 2),
        }
        if cls.mrope_interleaved:
            rope["mrope_interleaved"] = True
        text = o.text_config(
            len(tok), rope_parameters=rope,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        )
        config = cls._tiny_configs(o, text, token_ids)
        save_tiny_model(config, path, seed=o.seed, eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
        cls._tiny_processor(tok, min_px, max_px, template).save_pretrained(path)
        return path


class Qwen2VLFamily(QwenVLFamily):
    """Qwen2-VL: boxes in 0-1000 normalised coordinates."""

    name = "qwen2_vl"
    description = "Qwen2-VL (boxes 0-1000 normalised)"
    model_types = ("qwen2_vl",)
    box_convention = "normalized_1000"

    @classmethod
    def _tiny_configs(cls, o: TinyQwenOptions, text: dict[str, Any], token_ids: dict[str, int]) -> Any:
        from transformers import Qwen2VLConfig

        # Qwen2-VL's vision `hidden_size` is the merger output; `embed_dim` the tower's width.
        vision = cls._tiny_vision(o, embed_dim=o.vision_hidden_size, hidden_size=o.hidden_size, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)

    @classmethod
    def _tiny_processor_class(cls) -> Any:
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor


class Qwen25VLFamily(QwenVLFamily):
    """Qwen2.5-VL: boxes in absolute pixels of the resized image the model saw."""

    name = "qwen2_5_vl"
    description = "Qwen2.5-VL (boxes in resized-image pixels)"
    model_types = ("qwen2_5_vl",)
    box_convention = "absolute_resized"

    @classmethod
    def _tiny_configs(cls, o: TinyQwenOptions, text: dict[str, Any], token_ids: dict[str, int]) -> Any:
        from transformers import Qwen2_5_VLConfig

        vision = cls._tiny_vision(
            o, hidden_size=o.vision_hidden_size, intermediate_size=2 * o.vision_hidden_size,
            out_hidden_size=o.hidden_size,
            window_size=4 * cls.tiny_patch_size,  # 2x2 merged windows: exercises windowing
            fullatt_block_indexes=[o.vision_depth - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)

    @classmethod
    def _tiny_processor_class(cls) -> Any:
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor


class Qwen3VLFamily(QwenVLFamily):
    """Qwen3-VL: boxes in 0-1000 normalised coordinates; patch 16; interleaved M-RoPE."""

    name = "qwen3_vl"
    description = "Qwen3-VL (boxes 0-1000 normalised)"
    model_types = ("qwen3_vl",)
    box_convention = "normalized_1000"
    default_system = None
    tiny_patch_size = 16
    mrope_interleaved = True

    @classmethod
    def _tiny_configs(cls, o: TinyQwenOptions, text: dict[str, Any], token_ids: dict[str, int]) -> Any:
        from transformers import Qwen3VLConfig

        text = {**text, "head_dim": o.hidden_size // o.num_heads}
        vision = cls._tiny_vision(
            o, hidden_size=o.vision_hidden_size, intermediate_size=2 * o.vision_hidden_size,
            out_hidden_size=o.hidden_size,
            num_position_embeddings=64,  # an 8x8 grid, interpolated like the real 48x48
            deepstack_visual_indexes=[0],
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)

    @classmethod
    def _tiny_processor_class(cls) -> Any:
        from transformers import Qwen3VLProcessor

        return Qwen3VLProcessor

    @classmethod
    def _tiny_video_processor(cls, min_pixels: int, max_pixels: int, **kw: Any) -> Any:
        """Qwen3-VL's own video processor, which takes the area bounds as ``size``."""
        from transformers import Qwen3VLVideoProcessor

        return Qwen3VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 2}, **kw)


def qwen3_vl_available() -> tuple[bool, str]:
    """Whether the installed transformers has the Qwen3-VL classes, and if not, why not.

    Looks the modules up with ``importlib.util.find_spec`` so nothing heavy is imported.
    """
    mods = ("configuration_qwen3_vl", "modeling_qwen3_vl", "processing_qwen3_vl")
    if not all(transformers_has(f"qwen3_vl.{mod}") for mod in mods):
        return False, "the installed transformers has no Qwen3-VL classes (they need transformers>=4.57)"
    return True, ""
