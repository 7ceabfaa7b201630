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

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from core.interfaces import (
    PixelBoundsOptions,
    TinyOptions,
    TransformersFamily,
    save_tiny_model,
    sibling_function,
    size_value,
    transformers_has,
)

if TYPE_CHECKING:
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


class GLM4VOptions(PixelBoundsOptions):
    """Options of the GLM-4V family (``model.options`` in a run config).

    ``min_pixels`` / ``max_pixels`` bound the image area after ``smart_resize`` (the image
    processor's ``size.shortest_edge`` / ``size.longest_edge``; GLM counts each image as two
    temporal frames, so the effective single-image area bound is half of ``max_pixels``).
    ``None`` keeps the checkpoint's values.
    """


class TinyGLM4VOptions(TinyOptions):
    """Options of :meth:`GLM4VFamily.build_tiny_checkpoint` (all overridable).

    ``variant`` picks the architecture (``glm4v`` dense, ``glm4v_moe`` with a tiny MoE decoder,
    ``glm46v``). ``partial_rotary_factor`` 0.5 and the T/H/W ``mrope_section`` split follow the
    real checkpoints (scaled to the tiny head); ``rope_theta`` is tiny on purpose so a 2-layer
    model can tell nearby positions apart. The other decoder and tokenizer options are
    :class:`~core.interfaces.tiny.TinyOptions`'.
    """

    variant: Variant = "glm4v"
    partial_rotary_factor: float = Field(0.5, gt=0, le=1)
    mrope_section: list[int] | None = None
    num_experts: int = Field(4, ge=1)
    experts_per_token: int = Field(2, ge=1)
    vision_depth: int = Field(2, ge=1)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    def rotary_half(self) -> int:
        """Number of rotary frequencies: ``head_dim * partial_rotary_factor / 2``."""
        return int(self.hidden_size // self.num_heads * self.partial_rotary_factor) // 2

    @model_validator(mode="after")
    def _shapes(self) -> TinyGLM4VOptions:
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


def glm4v_available() -> tuple[bool, str]:
    """Whether the installed transformers has the GLM-4.1V classes, and if not, why not."""
    if not transformers_has("glm4v"):
        return False, ("the installed transformers has no GLM-4.1V classes (transformers.models.glm4v; "
                       "they need transformers>=4.53): the glm4v model family is unavailable")
    return True, ""


class GLM4VFamily(TransformersFamily):
    """GLM-4.1V / GLM-4.5V / GLM-4.6V.

    Boxes: GLM-V answers grounding prompts with ``<|begin_of_box|>[x1, y1, x2, y2]<|end_of_box|>``
    in coordinates normalised to 0-1000 of the image width/height (zai-org's GLM-V grounding
    documentation), so ``box_convention`` is ``normalized_1000``.
    """

    tiny_options = TinyGLM4VOptions  # model.tiny is validated against it at plan time

    name = "glm4v"
    description = "GLM-4.1V / GLM-4.5V / GLM-4.6V (boxes 0-1000 normalised)"
    model_types = ("glm4v", "glm4v_moe", "glm46v")
    box_convention = "normalized_1000"
    # The GLM processors return `mm_token_type_ids`; the training forward needs it (extended
    # with zeros over the completion) to rebuild the same 3-D RoPE positions generation used.
    per_token_keys = ("mm_token_type_ids",)
    #: Training passes run one prompt per group (core.grpo.prefix); positions from get_rope_index.
    prefix_sharing = True
    #: Generation prefills each prompt once, cache repeated per sample (core.plugins.builtin.prefill).
    shared_prefill = True
    #: Rollout decodes with a loop that drops finished rows (core.plugins.builtin.decode).
    compact_decode = True
    Options = GLM4VOptions
    # Loading, the pixel-bound options (GLM's image processors take them only as ``size``),
    # the generate() multi-image repair, vision modules and suppressed ids:
    # TransformersFamily's, with these names.
    vision_towers = ("visual",)
    vision_projectors = ()
    vision_tower_parts = ("merger",)
    suppressed_tokens = VISION_TOKENS

    @classmethod
    def handles(cls, model_type: str) -> bool:
        """One of :attr:`model_types` whose classes the installed transformers provides."""
        return model_type in cls.model_types and transformers_has(model_type)

    # ---- processing ------------------------------------------------------------------
    def resized_image_size(self, processor: Any, image: Image.Image) -> tuple[int, int]:
        """``(width, height)`` after the image processor's own ``smart_resize``.

        Calls the ``smart_resize`` of the module that defines the processor's class (GLM-4.1V
        and GLM-4.6V each have one), with an image counted as ``temporal_patch_size`` frames
        as the processor does. Boxes are 0-1000 normalised, so rewards do not need this.
        """
        ip = processor.image_processor
        smart_resize = sibling_function(ip, "smart_resize")
        if smart_resize is None:  # an image processor defined elsewhere: use the reference one
            from transformers.models.glm4v.image_processing_glm4v import smart_resize
        width, height = image.size
        tp = ip.temporal_patch_size
        h, w = smart_resize(num_frames=tp, height=height, width=width, temporal_factor=tp,
                            factor=ip.patch_size * ip.merge_size, min_pixels=size_value(ip.size, "shortest_edge"),
                            max_pixels=size_value(ip.size, "longest_edge"))
        return int(w), int(h)

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
        o, path = TinyGLM4VOptions.for_build(cls, path, options)
        patch, merge = 14, 2
        factor = patch * merge
        # GLM's smart_resize counts an image as 2 frames: the bounds are 2x the image area.
        min_px = o.min_pixels if o.min_pixels is not None else 2 * factor * factor
        max_px = o.max_pixels if o.max_pixels is not None else 2 * (2 * factor) ** 2

        tok = o.tokenizer(GLM_SPECIAL_TOKENS, ["<|begin_of_box|>[100, 200, 300, 400]<|end_of_box|>"],
                          eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tok.chat_template = CHAT_TEMPLATE
        ids = {t: tok.convert_tokens_to_ids(t) for t in GLM_SPECIAL_TOKENS}
        rope = {
            "rope_type": "default",
            "rope_theta": o.rope_theta,
            "partial_rotary_factor": o.partial_rotary_factor,
            "mrope_section": o.mrope_section or cls._mrope_section(o.rotary_half()),
        }
        text = o.text_config(len(tok), rope_parameters=rope, eos_token_id=ids["<|endoftext|>"],
                             pad_token_id=ids["<|endoftext|>"])
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
        save_tiny_model(config, path, seed=o.seed, pad_token_id=ids["<|endoftext|>"],
                        eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]])
        kw = {"patch_size": patch, "merge_size": merge, "temporal_patch_size": 2}
        ProcessorCls(
            image_processor=ImageCls(size={"shortest_edge": min_px, "longest_edge": max_px}, **kw),
            tokenizer=tok,
            video_processor=VideoCls(size={"shortest_edge": min_px, "longest_edge": 2 * max_px}, **kw),
            chat_template=CHAT_TEMPLATE,
        ).save_pretrained(path)
        return path
