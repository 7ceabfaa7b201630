"""Model family for the transformers-native InternVL (``InternVLForConditionalGeneration``).

The ``*-hf`` checkpoints (``OpenGVLab/InternVL3-2B-hf``, ``OpenGVLab/InternVL3_5-1B-HF`` ...)
carry ``model_type: internvl`` and load through ``AutoModelForImageTextToText`` /
``AutoProcessor`` without ``trust_remote_code``. An image becomes ``<img>`` + ``image_seq_length``
x ``<IMG_CONTEXT>`` per tile + ``</img>``; the tiles come from the image processor's
``crop_to_patches`` (dynamic tiling) option, which :class:`InternVLFamily` pins on every call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.interfaces import (
    TinyOptions,
    TransformersFamily,
    check_ordered,
    reload_tokenizer,
    save_tiny_model,
    sibling_function,
    size_value,
)

if TYPE_CHECKING:
    from PIL import Image

#: Special tokens of the real InternVL3 ``*-hf`` tokenizers (Qwen2.5 vocabulary plus the
#: InternVL additions) that the processor, chat template and grounding answers use.
INTERNVL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

#: The named tokens the InternVL processor reads from its tokenizer
#: (``tokenizer.start_image_token`` ...), as the official conversion script sets them.
INTERNVL_NAMED_TOKENS: dict[str, str] = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

#: Tokens generation must never emit: a sampled ``<IMG_CONTEXT>`` makes the next forward fail
#: ("Image features and image tokens do not match"); the others open/close image spans.
#: ``<ref>``/``<box>`` are NOT here: InternVL writes them in grounding answers.
VISION_TOKENS: tuple[str, ...] = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")

#: The chat template of the InternVL3 ``*-hf`` processors (transformers' conversion script):
#: ChatML, one ``<IMG_CONTEXT>`` line per image, no default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


class InternVLOptions(BaseModel):
    """Options of the InternVL family (``model.options`` in a run config).

    ``crop_to_patches``: split each image into up to ``max_patches`` tiles of the vision input
    size (plus a thumbnail) instead of one resized tile. The InternVL processor's own call
    default is ``True`` while its image processor's is ``False``; this option removes that
    ambiguity by being passed explicitly on every processor call. Default ``False``: one tile
    per image, so a prompt's length does not depend on the image's aspect ratio.
    ``min_patches`` / ``max_patches``: tile-count bounds when cropping (``None`` keeps the
    checkpoint's values, 1 and 12 for InternVL3).
    """

    model_config = ConfigDict(extra="forbid")
    crop_to_patches: bool = False
    min_patches: int | None = Field(None, ge=1)
    max_patches: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> InternVLOptions:
        check_ordered(self, "min_patches", "max_patches")
        return self


class TinyInternVLOptions(TinyOptions):
    """Options of :meth:`InternVLFamily.build_tiny_checkpoint` (all overridable).

    ``image_size`` / ``patch_size``: the vision input (tile) size and patch; a tile yields
    ``(image_size / patch_size)**2 / 4`` image tokens after InternVL's 2x2 pixel shuffle
    (56 / 14: 4 tokens). The decoder and tokenizer options are
    :class:`~core.interfaces.tiny.TinyOptions`'.
    """

    vision_layers: int = Field(2, ge=1)
    image_size: int = Field(56, ge=4)
    patch_size: int = Field(14, ge=1)
    max_patches: int = Field(12, ge=1)

    @model_validator(mode="after")
    def _shapes(self) -> TinyInternVLOptions:
        grid, rest = divmod(self.image_size, self.patch_size)
        if rest or grid % 2:
            # The 2x2 pixel shuffle needs an even patch grid.
            raise ValueError(
                f"image_size ({self.image_size}) must be an even multiple of patch_size ({self.patch_size})"
            )
        return self


class InternVLFamily(TransformersFamily):
    """InternVL3 / InternVL3.5 ``*-hf`` checkpoints (``InternVLForConditionalGeneration``).

    Boxes: InternVL answers grounding prompts as ``<ref>obj</ref><box>[[x1, y1, x2, y2]]</box>``
    with coordinates normalised to 0-1000 of the original image (independent of tiling), so
    ``box_convention`` is ``normalized_1000``.
    """

    tiny_options = TinyInternVLOptions  # model.tiny is validated against it at plan time

    name = "internvl"
    description = "InternVL3/3.5 *-hf (transformers-native; boxes 0-1000 normalised)"
    model_types = ("internvl",)
    box_convention = "normalized_1000"
    # The InternVL processor returns no per-token type ids; 1-D RoPE needs nothing extra.
    per_token_keys = ()
    #: Training passes run one prompt per group (core.grpo.prefix); 1-D positions.
    prefix_sharing = True
    #: Generation prefills each prompt once, cache repeated per sample (core.plugins.builtin.prefill).
    shared_prefill = True
    #: Rollout decodes with a loop that drops finished rows (core.plugins.builtin.decode).
    compact_decode = True
    Options = InternVLOptions
    model_type_hint = (
        "the remote-code InternVL checkpoints without '-hf' are not supported: use the transformers-native "
        "'*-hf' ones"
    )
    vision_towers = ("vision_tower",)
    vision_projectors = ("multi_modal_projector",)
    suppressed_tokens = VISION_TOKENS

    # ---- loading ---------------------------------------------------------------------
    def _tile_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"crop_to_patches": self.options.crop_to_patches}
        if self.options.min_patches is not None:
            kwargs["min_patches"] = self.options.min_patches
        if self.options.max_patches is not None:
            kwargs["max_patches"] = self.options.max_patches
        return kwargs

    def processor_init_kwargs(self) -> dict[str, Any]:
        """The tile options, so the loaded processor's defaults agree with every call."""
        return self._tile_kwargs()

    def processor_call_kwargs(self) -> dict[str, Any]:
        """The tile options, passed explicitly on every processor call.

        ``InternVLProcessor`` defaults ``crop_to_patches`` to ``True`` in its call kwargs
        regardless of the image processor's setting, so the option is never left implicit.
        """
        return self._tile_kwargs()

    def load_processor(self, path: str | Path) -> Any:
        """``AutoProcessor`` (left padding) with the tile options on the image processor too."""
        proc = super().load_processor(path)
        for key, val in self._tile_kwargs().items():
            setattr(proc.image_processor, key, val)
        return proc

    # ---- processing ------------------------------------------------------------------
    def resized_image_size(self, processor: Any, image: Image.Image) -> tuple[int, int]:
        """``(width, height)`` of the canvas the tiles are cut from.

        One tile: the vision input size. With ``crop_to_patches``: the tile grid chosen by the
        image processor's own ``get_optimal_tiled_canvas`` times the tile size (the thumbnail
        is an extra downscaled view and not counted). Boxes are 0-1000 normalised, so rewards
        do not need this; it is reported for completeness.
        """
        ip = processor.image_processor
        tile_h, tile_w = int(size_value(ip.size, "height")), int(size_value(ip.size, "width"))
        opts = self._tile_kwargs()
        max_p = opts.get("max_patches", ip.max_patches)
        if not opts["crop_to_patches"] or max_p <= 1:
            return tile_w, tile_h
        canvas = sibling_function(ip, "get_optimal_tiled_canvas")
        if canvas is None:  # an image processor defined elsewhere: use the reference one
            from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas as canvas
        width, height = image.size
        cols, rows = canvas((height, width), (tile_h, tile_w), opts.get("min_patches", ip.min_patches), max_p)
        return cols * tile_w, rows * tile_h

    # ---- offline tiny checkpoints ----------------------------------------------------
    @classmethod
    def build_tiny_checkpoint(cls, path: str | Path, **options: Any) -> Path:
        """Write a tiny random InternVL checkpoint to ``path`` and return it.

        Text: a Qwen2 decoder (hidden 64, 2 layers, 4 heads, ``rope_theta`` 3), as in
        InternVL3; vision: the InternVL ViT (hidden 32, 2 layers) on 56x56 tiles with patch 14,
        so one tile is 4 ``<IMG_CONTEXT>`` tokens; the real ``GotOcr2ImageProcessor``,
        ``InternVLVideoProcessor`` and ``InternVLProcessor``, a tiny byte-level BPE tokenizer
        with InternVL's special and named tokens, and the ``*-hf`` chat template. EOS
        ``<|im_end|>``. Options: :class:`TinyInternVLOptions`. Reloads offline with
        ``AutoModelForImageTextToText`` / ``AutoProcessor``.
        """
        from transformers import (
            GotOcr2ImageProcessor,
            InternVLConfig,
            InternVLProcessor,
            InternVLVideoProcessor,
            Qwen2Tokenizer,
        )
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        o, path = TinyInternVLOptions.for_build(cls, path, options)

        # InternVL3's language model is Qwen2.5: the real Qwen tokenizer class and split
        # pattern (digits one by one), so tiny and real checkpoints tokenise boxes alike.
        tok = o.tokenizer(INTERNVL_SPECIAL_TOKENS, ["<ref>object</ref><box>[[10, 20, 300, 400]]</box>"],
                          pre_tokenizer_regex=PRETOKENIZE_REGEX, tokenizer_class=Qwen2Tokenizer,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
        # The processor reads named tokens (tokenizer.context_image_token ...). Reloading with a
        # dict `extra_special_tokens` is how the official conversion script sets them.
        tok = reload_tokenizer(tok, extra_special_tokens=dict(INTERNVL_NAMED_TOKENS))
        tok.chat_template = CHAT_TEMPLATE
        ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIAL_TOKENS}
        image_seq_length = (o.image_size // o.patch_size) ** 2 // 4

        config = InternVLConfig(
            vision_config=o.vit_config(o.vision_layers, image_size=o.image_size, patch_size=o.patch_size),
            text_config=o.text_config(
                len(tok), model_type="qwen2",
                rope_parameters={"rope_type": "default", "rope_theta": o.rope_theta},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            ),
            image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=image_seq_length,
            downsample_ratio=0.5,
        )
        save_tiny_model(config, path, seed=o.seed, eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])

        # InternVL3's preprocessing (ImageNet mean/std, bicubic), at the tiny tile size.
        norm = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
        tile = {"height": o.image_size, "width": o.image_size}
        InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(
                size=tile, crop_to_patches=False, min_patches=1, max_patches=o.max_patches, **norm
            ),
            tokenizer=tok,
            video_processor=InternVLVideoProcessor(size=tile, **norm),
            image_seq_length=image_seq_length,
            chat_template=CHAT_TEMPLATE,
        ).save_pretrained(path)
        return path
