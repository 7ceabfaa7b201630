"""Model family for the transformers-native InternVL (``InternVLForConditionalGeneration``).

The ``*-hf`` checkpoints (``OpenGVLab/InternVL3-2B-hf``, ``OpenGVLab/InternVL3_5-1B-HF`` ...)
carry ``model_type: internvl`` and load through ``AutoModelForImageTextToText`` /
``AutoProcessor`` without ``trust_remote_code``. An image becomes ``<img>`` + ``image_seq_length``
x ``<IMG_CONTEXT>`` per tile + ``</img>``; the tiles come from the image processor's
``crop_to_patches`` (dynamic tiling) option, which :class:`InternVLFamily` pins on every call.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.interfaces import ModelFamily

if TYPE_CHECKING:
    import torch
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
        if self.min_patches is not None and self.max_patches is not None and self.min_patches > self.max_patches:
            raise ValueError(f"min_patches ({self.min_patches}) must not exceed max_patches ({self.max_patches})")
        return self


class TinyInternVLOptions(BaseModel):
    """Options of :meth:`InternVLFamily.build_tiny_checkpoint` (all overridable).

    ``image_size`` / ``patch_size``: the vision input (tile) size and patch; a tile yields
    ``(image_size / patch_size)**2 / 4`` image tokens after InternVL's 2x2 pixel shuffle
    (56 / 14: 4 tokens). ``rope_theta`` is tiny on purpose: with the real 1e6 a 2-layer,
    16-dim-head model cannot tell nearby positions apart.
    """

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=1)
    rope_theta: float = Field(3.0, gt=0)
    vision_hidden_size: int = Field(32, ge=8)
    vision_layers: int = Field(2, ge=1)
    vision_heads: int = Field(2, ge=1)
    image_size: int = Field(56, ge=4)
    patch_size: int = Field(14, ge=1)
    max_patches: int = Field(12, ge=1)
    vocab_size: int = Field(512, ge=300)
    extra_corpus: list[str] = Field(default_factory=list)
    seed: int = 0

    @model_validator(mode="after")
    def _shapes(self) -> TinyInternVLOptions:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError("vision_hidden_size must be divisible by vision_heads")
        grid, rest = divmod(self.image_size, self.patch_size)
        if rest or grid % 2:
            # The 2x2 pixel shuffle needs an even patch grid.
            raise ValueError(
                f"image_size ({self.image_size}) must be an even multiple of patch_size ({self.patch_size})"
            )
        return self


def single_token_ids(tokenizer: Any, tokens: tuple[str, ...] | list[str]) -> set[int]:
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


class InternVLFamily(ModelFamily):
    """InternVL3 / InternVL3.5 ``*-hf`` checkpoints (``InternVLForConditionalGeneration``).

    Boxes: InternVL answers grounding prompts as ``<ref>obj</ref><box>[[x1, y1, x2, y2]]</box>``
    with coordinates normalised to 0-1000 of the original image (independent of tiling), so
    ``box_convention`` is ``normalized_1000``.
    """

    name = "internvl"
    description = "InternVL3/3.5 *-hf (transformers-native; boxes 0-1000 normalised)"
    model_types = ("internvl",)
    box_convention = "normalized_1000"
    # The InternVL processor returns no per-token type ids; 1-D RoPE needs nothing extra.
    per_token_keys = ()
    #: Training passes run one prompt per group (core.grpo.prefix); 1-D positions.
    prefix_sharing = True
    Options = InternVLOptions

    # ---- loading ---------------------------------------------------------------------
    def load_model(
        self, path: str | Path, *, dtype: torch.dtype, attn_implementation: str | None = None
    ) -> Any:
        """Load with ``AutoModelForImageTextToText`` after checking ``config.model_type``."""
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(path)).model_type
        if not self.handles(model_type):
            raise ValueError(
                f"{path}: config.model_type is {model_type!r}, but model family {self.name!r} "
                f"handles {list(self.model_types)} (the remote-code InternVL checkpoints without "
                f"'-hf' are not supported: use the transformers-native '*-hf' ones)"
            )
        return super().load_model(path, dtype=dtype, attn_implementation=attn_implementation)

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
        size = ip.size
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        tile_h, tile_w = int(get("height")), int(get("width"))
        opts = self._tile_kwargs()
        max_p = opts.get("max_patches", ip.max_patches)
        if not opts["crop_to_patches"] or max_p <= 1:
            return tile_w, tile_h
        module = importlib.import_module(type(ip).__module__)
        canvas = getattr(module, "get_optimal_tiled_canvas", None)
        if canvas is None:  # an image processor defined elsewhere: use the reference one
            from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas as canvas
        width, height = image.size
        cols, rows = canvas((height, width), (tile_h, tile_w), opts.get("min_patches", ip.min_patches), max_p)
        return cols * tile_w, rows * tile_h

    # ---- facts for training ----------------------------------------------------------
    def vision_module_names(self, model: Any) -> list[str]:
        """The vision tower and the multimodal projector (``model.vision_tower``, ...).

        Names come from ``named_modules()``, so wrapped models (PEFT, DDP) work too.
        """
        names = [n for n, _ in model.named_modules()]
        out = []
        for leaf in ("vision_tower", "multi_modal_projector"):
            hits = [n for n in names if n.rsplit(".", 1)[-1] == leaf]
            if not hits:
                raise ValueError(f"model family {self.name!r}: no `{leaf}` module in {type(model).__name__}")
            out.append(min(hits, key=lambda n: n.count(".")))
        return out

    def suppressed_token_ids(self, processor: Any, model: Any) -> list[int]:
        """Ids of ``<IMG_CONTEXT>``, ``<img>``, ``</img>`` and ``<video>``.

        Taken from the model config (``image_token_id``), the processor's named tokens and the
        tokenizer, never hard-coded, so the tiny and the real vocabularies both work.
        """
        tok = getattr(processor, "tokenizer", processor)
        ids: set[int] = set()
        cfg_id = getattr(getattr(model, "config", None), "image_token_id", None)
        if isinstance(cfg_id, int):
            ids.add(cfg_id)
        named = [getattr(processor, a, None) for a in ("image_token", "start_image_token", "end_image_token",
                                                       "video_token")]
        ids |= single_token_ids(tok, [t for t in named if isinstance(t, str)] + list(VISION_TOKENS))
        return sorted(ids)

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
        import tempfile

        import torch
        from transformers import (
            AutoModelForImageTextToText,
            AutoTokenizer,
            GenerationConfig,
            GotOcr2ImageProcessor,
            InternVLConfig,
            InternVLProcessor,
            InternVLVideoProcessor,
        )

        from core.testing.tiny import build_tiny_tokenizer

        try:
            o = TinyInternVLOptions.model_validate(options)
        except Exception as exc:  # pydantic's message names the bad option
            raise ValueError(f"{cls.__name__}.build_tiny_checkpoint: invalid options: {exc}") from exc
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)

        from transformers import Qwen2Tokenizer
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        # InternVL3's language model is Qwen2.5: the real Qwen tokenizer class and split
        # pattern (digits one by one), so tiny and real checkpoints tokenise boxes alike.
        tok = build_tiny_tokenizer(
            list(INTERNVL_SPECIAL_TOKENS),
            pre_tokenizer_regex=PRETOKENIZE_REGEX,
            tokenizer_class=Qwen2Tokenizer,
            extra_corpus=["<ref>object</ref><box>[[10, 20, 300, 400]]</box>", *o.extra_corpus],
            vocab_size=o.vocab_size,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        )
        # The processor reads named tokens (tokenizer.context_image_token ...). Reloading with a
        # dict `extra_special_tokens` is how the official conversion script sets them.
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            tok = AutoTokenizer.from_pretrained(tmp, extra_special_tokens=dict(INTERNVL_NAMED_TOKENS))
        tok.chat_template = CHAT_TEMPLATE
        ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIAL_TOKENS}
        image_seq_length = (o.image_size // o.patch_size) ** 2 // 4

        config = InternVLConfig(
            vision_config={
                "hidden_size": o.vision_hidden_size,
                "num_hidden_layers": o.vision_layers,
                "num_attention_heads": o.vision_heads,
                "intermediate_size": 2 * o.vision_hidden_size,
                "image_size": o.image_size,
                "patch_size": o.patch_size,
            },
            text_config={
                "model_type": "qwen2",
                "vocab_size": len(tok),
                "hidden_size": o.hidden_size,
                "intermediate_size": o.intermediate_size,
                "num_hidden_layers": o.num_layers,
                "num_attention_heads": o.num_heads,
                "num_key_value_heads": o.num_kv_heads,
                "max_position_embeddings": 4096,
                "rope_parameters": {"rope_type": "default", "rope_theta": o.rope_theta},
                "bos_token_id": ids["<|endoftext|>"],
                "eos_token_id": ids["<|im_end|>"],
                "pad_token_id": ids["<|endoftext|>"],
            },
            image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=image_seq_length,
            downsample_ratio=0.5,
        )
        torch.manual_seed(o.seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        model.generation_config = GenerationConfig(
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=ids["<|endoftext|>"],
            do_sample=True,
            temperature=1.0,
        )
        model.save_pretrained(path)

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
