"""Model family for GLM-4.1V, GLM-4.5V and GLM-4.6V (transformers-native, no remote code).

The three share one design, close to Qwen2-VL's: a ViT with 2x2 patch merging and dynamic
resolution (``smart_resize``), one ``<|image|>`` placeholder per merged patch inside
``<|begin_of_image|>…<|end_of_image|>``, and 3-D multimodal RoPE in the decoder driven by the
processor's ``mm_token_type_ids``. They differ in the decoder (dense GLM-4 for GLM-4.1V and
GLM-4.6V-Flash, GLM-4.5-Air MoE for GLM-4.5V / GLM-4.6V) and in the processor class.

=============  ===================================  ====================================
model_type     checkpoints                          classes
=============  ===================================  ====================================
``glm4v``      zai-org/GLM-4.1V-9B-Thinking/-Base   ``Glm4vForConditionalGeneration``
``glm4v_moe``  zai-org/GLM-4.5V                     ``Glm4vMoeForConditionalGeneration``
``glm46v``     zai-org/GLM-4.6V, GLM-4.6V-Flash     ``Glm46VForConditionalGeneration``
=============  ===================================  ====================================
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.compat import fix_multi_image_expansion
from core.interfaces import ModelFamily

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: Special tokens of the real GLM-4.1V / 4.5V tokenizers that the processor, the chat
#: template and grounding answers use (tiny checkpoints carry the same strings).
GLM_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
)

#: Tokens generation must never emit: a sampled ``<|image|>`` breaks the next forward
#: ("Image features and image tokens do not match") and the begin/end markers change the
#: multimodal RoPE segmentation. ``<|begin_of_box|>`` is NOT here: GLM writes it in answers.
VISION_TOKENS: tuple[str, ...] = (
    "<|image|>",
    "<|video|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

#: A chat template in the format of GLM-4.1V-9B-Thinking's (``[gMASK]<sop>`` prefix, role
#: tokens, ``<|begin_of_image|><|image|><|end_of_image|>`` per image). Used only for tiny
#: checkpoints; real checkpoints bring their own template, which ``render_prompt`` uses.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}<|system|>{{ '\n' }}"
    "{%- if msg.content is string %}{{ msg.content }}{%- else %}"
    "{%- for item in msg.content %}{%- if item.type == 'text' %}{{ item.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{%- elif msg.role == 'user' %}<|user|>{{ '\n' }}"
    "{%- if msg.content is string %}{{ msg.content }}{%- else %}"
    "{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'image' or 'image' in item %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>{{ '\n' }}"
    "{%- if msg.content is string %}{{ msg.content }}{%- else %}"
    "{%- for item in msg.content %}{%- if item.type == 'text' %}{{ item.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{{ '\n' }}{%- endif %}"
)

Variant = Literal["glm4v", "glm4v_moe", "glm46v"]


class GLM4VOptions(BaseModel):
    """Options of the GLM-4V family (``model.options`` in a run config).

    ``min_pixels`` / ``max_pixels`` bound the image area after ``smart_resize`` (the image
    processor's ``size.shortest_edge`` / ``size.longest_edge``; GLM counts each image as two
    temporal frames, so the effective single-image area bound is half of ``max_pixels``).
    ``None`` keeps the checkpoint's values.
    """

    model_config = ConfigDict(extra="forbid")
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> GLM4VOptions:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        return self


class TinyGLM4VOptions(BaseModel):
    """Options of :meth:`GLM4VFamily.build_tiny_checkpoint` (all overridable).

    ``variant`` picks the architecture (``glm4v`` dense, ``glm4v_moe`` with a tiny MoE decoder,
    ``glm46v``). ``partial_rotary_factor`` 0.5 and the T/H/W ``mrope_section`` split follow the
    real checkpoints (scaled to the tiny head); ``rope_theta`` is tiny on purpose so a 2-layer
    model can tell nearby positions apart.
    """

    model_config = ConfigDict(extra="forbid")
    variant: Variant = "glm4v"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=1)
    rope_theta: float = Field(3.0, gt=0)
    partial_rotary_factor: float = Field(0.5, gt=0, le=1)
    mrope_section: list[int] | None = None
    num_experts: int = Field(4, ge=1)
    experts_per_token: int = Field(2, ge=1)
    vision_hidden_size: int = Field(32, ge=8)
    vision_depth: int = Field(2, ge=1)
    vision_heads: int = Field(2, ge=1)
    vocab_size: int = Field(512, ge=300)
    extra_corpus: list[str] = Field(default_factory=list)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    seed: int = 0

    def rotary_half(self) -> int:
        """Number of rotary frequencies: ``head_dim * partial_rotary_factor / 2``."""
        return int(self.hidden_size // self.num_heads * self.partial_rotary_factor) // 2

    @model_validator(mode="after")
    def _shapes(self) -> TinyGLM4VOptions:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError("vision_hidden_size must be divisible by vision_heads")
        if self.experts_per_token > self.num_experts:
            raise ValueError("experts_per_token must not exceed num_experts")
        half = self.rotary_half()
        if half < 3:
            raise ValueError("head_dim * partial_rotary_factor must be at least 6 (3 M-RoPE sections)")
        if self.mrope_section is not None and (len(self.mrope_section) != 3 or sum(self.mrope_section) != half):
            raise ValueError(
                f"mrope_section {self.mrope_section} must be 3 ints summing to "
                f"head_dim * partial_rotary_factor / 2 = {half}"
            )
        return self


def _transformers_has(model_type: str) -> bool:
    """Whether ``transformers.models.<model_type>`` exists (looked up without importing it)."""
    from importlib.util import find_spec

    try:
        return find_spec(f"transformers.models.{model_type}") is not None
    except ModuleNotFoundError:
        return False


def glm4v_available() -> tuple[bool, str]:
    """Whether the installed transformers has the GLM-4.1V classes, and if not, why not."""
    if not _transformers_has("glm4v"):
        return False, ("the installed transformers has no GLM-4.1V classes (transformers.models.glm4v; "
                       "they need transformers>=4.53): the glm4v model family is unavailable")
    return True, ""


def single_token_ids(tokenizer: Any, tokens: tuple[str, ...] | list[str]) -> set[int]:
    """Ids of those ``tokens`` that are one vocabulary entry each (others are skipped)."""
    ids: set[int] = set()
    for t in tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and tokenizer.convert_ids_to_tokens(i) == t:
            ids.add(i)
    return ids


class GLM4VFamily(ModelFamily):
    """GLM-4.1V / GLM-4.5V / GLM-4.6V.

    Boxes: GLM-V answers grounding prompts with ``<|begin_of_box|>[x1, y1, x2, y2]<|end_of_box|>``
    in coordinates normalised to 0-1000 of the image width/height (zai-org's GLM-V grounding
    documentation), so ``box_convention`` is ``normalized_1000``.
    """

    name = "glm4v"
    description = "GLM-4.1V / GLM-4.5V / GLM-4.6V (boxes 0-1000 normalised)"
    model_types = ("glm4v", "glm4v_moe", "glm46v")
    box_convention = "normalized_1000"
    # The GLM processors return `mm_token_type_ids`; the training forward needs it (extended
    # with zeros over the completion) to rebuild the same 3-D RoPE positions generation used.
    per_token_keys = ("mm_token_type_ids",)
    #: Training passes run one prompt per group (core.grpo.prefix); positions from get_rope_index.
    prefix_sharing = True
    Options = GLM4VOptions

    @classmethod
    def handles(cls, model_type: str) -> bool:
        """One of :attr:`model_types` whose classes the installed transformers provides."""
        return model_type in cls.model_types and _transformers_has(model_type)

    # ---- loading ---------------------------------------------------------------------
    def load_model(
        self, path: str | Path, *, dtype: torch.dtype, attn_implementation: str | None = None
    ) -> Any:
        """Load with ``AutoModelForImageTextToText`` after checking ``config.model_type``.

        Also repairs multi-image expansion in ``generate`` where this transformers needs it
        (:func:`fix_multi_image_expansion`): GRPO samples n completions per prompt with
        ``num_return_sequences``, and every one of them must see the prompt's own images.
        """
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(path)).model_type
        if not self.handles(model_type):
            raise ValueError(
                f"{path}: config.model_type is {model_type!r}, but model family {self.name!r} "
                f"handles {list(self.model_types)}"
            )
        model = super().load_model(path, dtype=dtype, attn_implementation=attn_implementation)
        fix_multi_image_expansion(model)
        return model

    def load_processor(self, path: str | Path) -> Any:
        """``AutoProcessor`` (left padding) with ``min_pixels`` / ``max_pixels`` applied to ``size``.

        The GLM image processors take the area bounds only as ``size`` (no ``min_pixels``
        kwarg), so they are set on the loaded image processor, whose ``size`` every call uses.
        """
        proc = super().load_processor(path)
        if self.options.min_pixels is not None or self.options.max_pixels is not None:
            ip = proc.image_processor
            size = dict(ip.size.items()) if hasattr(ip.size, "items") else {
                "shortest_edge": ip.size.shortest_edge, "longest_edge": ip.size.longest_edge}
            if self.options.min_pixels is not None:
                size["shortest_edge"] = self.options.min_pixels
            if self.options.max_pixels is not None:
                size["longest_edge"] = self.options.max_pixels
            ip.size = size if isinstance(ip.size, dict) else type(ip.size)(**size)
        return proc

    # ---- processing ------------------------------------------------------------------
    def resized_image_size(self, processor: Any, image: Image.Image) -> tuple[int, int]:
        """``(width, height)`` after the image processor's own ``smart_resize``.

        Calls the ``smart_resize`` of the module that defines the processor's class (GLM-4.1V
        and GLM-4.6V each have one), with an image counted as ``temporal_patch_size`` frames
        as the processor does. Boxes are 0-1000 normalised, so rewards do not need this.
        """
        ip = processor.image_processor
        module = importlib.import_module(type(ip).__module__)
        smart_resize = getattr(module, "smart_resize", None)
        if smart_resize is None:  # an image processor defined elsewhere: use the reference one
            from transformers.models.glm4v.image_processing_glm4v import smart_resize
        size = ip.size
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        width, height = image.size
        tp = ip.temporal_patch_size
        h, w = smart_resize(num_frames=tp, height=height, width=width, temporal_factor=tp,
                            factor=ip.patch_size * ip.merge_size,
                            min_pixels=get("shortest_edge"), max_pixels=get("longest_edge"))
        return int(w), int(h)

    # ---- facts for training ----------------------------------------------------------
    def vision_module_names(self, model: Any) -> list[str]:
        """The vision tower (``model.visual``) and its patch merger (``model.visual.merger``).

        Names come from ``named_modules()``, so wrapped models (PEFT, DDP) work too.
        """
        names = [n for n, _ in model.named_modules()]
        towers = [n for n in names if n.rsplit(".", 1)[-1] == "visual"]
        if not towers:
            raise ValueError(f"model family {self.name!r}: no `visual` module in {type(model).__name__}")
        tower = min(towers, key=lambda n: n.count("."))
        merger = f"{tower}.merger"
        return [tower, merger] if merger in set(names) else [tower]

    def suppressed_token_ids(self, processor: Any, model: Any) -> list[int]:
        """Ids of ``<|image|>``, ``<|video|>`` and the image/video begin/end markers.

        Taken from the model config (``image_token_id`` ...) and the tokenizer, never
        hard-coded, so the tiny and the real vocabularies both work.
        """
        ids: set[int] = set()
        cfg = getattr(model, "config", None)
        for attr in ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                     "video_start_token_id", "video_end_token_id"):
            val = getattr(cfg, attr, None)
            if isinstance(val, int):
                ids.add(val)
        tok = getattr(processor, "tokenizer", processor)
        named = [getattr(processor, a, None) for a in ("image_token", "video_token")]
        ids |= single_token_ids(tok, [t for t in named if isinstance(t, str)] + list(VISION_TOKENS))
        return sorted(ids)

    # ---- offline tiny checkpoints ----------------------------------------------------
    @staticmethod
    def _mrope_section(half: int) -> list[int]:
        """The T/H/W split of the rotary frequencies, scaled from the real ``[8, 12, 12]`` of 32."""
        t = max(1, half // 4)
        h = (half - t) // 2
        return [t, h, half - t - h]

    @classmethod
    def build_tiny_checkpoint(cls, path: str | Path, **options: Any) -> Path:
        """Write a tiny random GLM-4V checkpoint to ``path`` and return it.

        Text: hidden 64, 2 layers, 4 heads (head_dim 16, half of it rotary as in the real
        models), ``rope_theta`` 3; for ``variant: glm4v_moe`` a MoE decoder (4 experts, top 2,
        one shared expert, first layer dense). Vision: depth 2, hidden 32, patch 14, 2x2 merge,
        a 4x4 learned position grid (interpolated like the real 24x24). The real image/video
        processor and processor classes with small pixel bounds (a 56x56 image is 4 image
        tokens), a tiny byte-level BPE tokenizer with GLM's special tokens, a GLM-4.1V-style
        chat template; EOS ``<|endoftext|>``, ``<|user|>``, ``<|observation|>`` as in GLM-4.1V.
        Options: :class:`TinyGLM4VOptions`. Reloads offline with
        ``AutoModelForImageTextToText`` / ``AutoProcessor``.
        """
        import torch
        from transformers import AutoModelForImageTextToText, GenerationConfig

        from core.testing.tiny import build_tiny_tokenizer

        try:
            o = TinyGLM4VOptions.model_validate(options)
        except Exception as exc:  # pydantic's message names the bad option
            raise ValueError(f"{cls.__name__}.build_tiny_checkpoint: invalid options: {exc}") from exc
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        patch, merge = 14, 2
        factor = patch * merge
        # GLM's smart_resize counts an image as 2 frames: the bounds are 2x the image area.
        min_px = o.min_pixels if o.min_pixels is not None else 2 * factor * factor
        max_px = o.max_pixels if o.max_pixels is not None else 2 * (2 * factor) ** 2

        tok = build_tiny_tokenizer(
            list(GLM_SPECIAL_TOKENS),
            extra_corpus=["<|begin_of_box|>[100, 200, 300, 400]<|end_of_box|>", *o.extra_corpus],
            vocab_size=o.vocab_size,
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )
        tok.chat_template = CHAT_TEMPLATE
        ids = {t: tok.convert_tokens_to_ids(t) for t in GLM_SPECIAL_TOKENS}
        text: dict[str, Any] = {
            "vocab_size": len(tok),
            "hidden_size": o.hidden_size,
            "intermediate_size": o.intermediate_size,
            "num_hidden_layers": o.num_layers,
            "num_attention_heads": o.num_heads,
            "num_key_value_heads": o.num_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": o.rope_theta,
                "partial_rotary_factor": o.partial_rotary_factor,
                "mrope_section": o.mrope_section or cls._mrope_section(o.rotary_half()),
            },
            "eos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
        }
        vision = {
            "depth": o.vision_depth,
            "hidden_size": o.vision_hidden_size,
            "num_heads": o.vision_heads,
            "intermediate_size": 2 * o.vision_hidden_size,
            "out_hidden_size": o.hidden_size,
            "patch_size": patch,
            "spatial_merge_size": merge,
            "temporal_patch_size": 2,
            "image_size": 4 * patch,  # a 4x4 learned position grid, interpolated per image
        }
        token_ids = {
            "image_token_id": ids["<|image|>"],
            "video_token_id": ids["<|video|>"],
            "image_start_token_id": ids["<|begin_of_image|>"],
            "image_end_token_id": ids["<|end_of_image|>"],
            "video_start_token_id": ids["<|begin_of_video|>"],
            "video_end_token_id": ids["<|end_of_video|>"],
        }
        if o.variant == "glm4v":
            from transformers import Glm4vConfig as ConfigCls
            from transformers import Glm4vImageProcessor as ImageCls
            from transformers import Glm4vProcessor as ProcessorCls
            from transformers import Glm4vVideoProcessor as VideoCls
        elif o.variant == "glm4v_moe":
            from transformers import Glm4vImageProcessor as ImageCls
            from transformers import Glm4vMoeConfig as ConfigCls
            from transformers import Glm4vProcessor as ProcessorCls  # GLM-4.5V ships the GLM-4.1V processor
            from transformers import Glm4vVideoProcessor as VideoCls

            text.update(
                n_routed_experts=o.num_experts,
                num_experts_per_tok=o.experts_per_token,
                n_shared_experts=1,
                moe_intermediate_size=o.intermediate_size // 2,
                first_k_dense_replace=1,
                attention_bias=True,
            )
        else:
            from transformers import Glm46VConfig as ConfigCls
            from transformers import Glm46VImageProcessor as ImageCls
            from transformers import Glm46VProcessor as ProcessorCls
            from transformers import Glm46VVideoProcessor as VideoCls

            text["model_type"] = "glm4v_text"
            vision["model_type"] = "glm4v_vision"
        config = ConfigCls(text_config=text, vision_config=vision, **token_ids)
        torch.manual_seed(o.seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        model.generation_config = GenerationConfig(
            eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
            pad_token_id=ids["<|endoftext|>"],
            do_sample=True,
            temperature=1.0,
        )
        model.save_pretrained(path)
        kw = {"patch_size": patch, "merge_size": merge, "temporal_patch_size": 2}
        ProcessorCls(
            image_processor=ImageCls(size={"shortest_edge": min_px, "longest_edge": max_px}, **kw),
            tokenizer=tok,
            video_processor=VideoCls(size={"shortest_edge": min_px, "longest_edge": 2 * max_px}, **kw),
            chat_template=CHAT_TEMPLATE,
        ).save_pretrained(path)
        return path
