"""Mistral 3 (Mistral-Small-3.1-24B-Instruct-2503 and kin): a Mistral decoder with a Pixtral vision tower.

The example family of ``docs/model_family_tutorial.md``: every hook of
:class:`~core.interfaces.TransformersFamily` this architecture needs is stated here, and nothing
else. What makes Mistral 3 differ from the defaults:

* **BOS**: its chat template writes ``<s>`` itself and its tokenizer also adds one when
  encoding, so a prompt tokenised the default way starts with two BOS tokens
  (:meth:`Mistral3Family.process`).
* **Image structure tokens**: the processor expands each ``[IMG]`` into rows of ``[IMG]`` tokens,
  each row ended by ``[IMG_BREAK]``, the last by ``[IMG_END]``. A sampled ``[IMG_BREAK]`` breaks
  the next forward like a sampled ``[IMG]`` does, and transformers' attribute lists do not
  name it (:attr:`Mistral3Family.suppressed_tokens`).
* **Its own resize**: the longest edge is capped at ``size.longest_edge`` and each side rounded
  *up* to a multiple of the processor's ``patch_size * spatial_merge_size`` (not the image
  processor's own ``patch_size``) (:meth:`Mistral3Family.resized_image_size`).
* ``size.longest_edge`` is an edge length, not an area, so the ``min_pixels`` / ``max_pixels``
  options of the Qwen-style families do not fit: this family has ``longest_edge``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from core.interfaces import TinyOptions, TransformersFamily, reload_tokenizer, save_tiny_model, sibling_function

if TYPE_CHECKING:
    from collections.abc import Sequence

    from PIL import Image

#: The special tokens of the real Mistral-Small-3.1 tokenizer that its chat template and
#: processor use (the tiny tokenizer carries the same strings).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
)
#: Tokens only the processor may write: generation must never emit one.
IMAGE_TOKENS: tuple[str, ...] = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")

#: Mistral-Small-3.1's chat template, reduced to what vlmr1 renders: BOS, an optional system
#: prompt, ``[INST]…[/INST]`` user turns with one ``[IMG]`` per image, assistant turns ending
#: in EOS. The model answers right after ``[/INST]``: the generation prompt adds nothing.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] %}"
    "[SYSTEM_PROMPT]{% if first is string %}{{ first }}{% else %}"
    "{% for c in first %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}[/SYSTEM_PROMPT]"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}[IMG]{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}[/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


class Mistral3Options(BaseModel):
    """Options of the Mistral 3 family (``model.options`` in a run config).

    ``longest_edge``: the longest image edge in pixels after resizing (the image processor's
    ``size.longest_edge``; Mistral-Small-3.1 ships 1540). ``None`` keeps the checkpoint's value.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not ignored
    longest_edge: int | None = Field(None, ge=1)


class TinyMistral3Options(TinyOptions):
    """Options of :meth:`Mistral3Family.build_tiny_checkpoint` (all overridable).

    ``patch_size`` / ``longest_edge``: the Pixtral patch and the largest image edge; with the
    2x2 patch merge an image of up to 56x56 pixels becomes up to 4x4 ``[IMG]`` tokens (plus one
    ``[IMG_BREAK]`` / ``[IMG_END]`` per row). The decoder and tokenizer options are
    :class:`~core.interfaces.tiny.TinyOptions`'.
    """

    vision_layers: int = Field(2, ge=1)
    patch_size: int = Field(7, ge=1)
    longest_edge: int = Field(56, ge=2)


class Mistral3Family(TransformersFamily):
    """Mistral 3 checkpoints (``Mistral3ForConditionalGeneration``, ``PixtralProcessor``).

    Boxes: Mistral 3 has no published grounding format, so the family states the one a fine-tune
    learns most directly: pixels of the resized image the model sees (``absolute_resized``,
    like Qwen2.5-VL); :meth:`resized_image_size` must therefore be the processor's exact resize.
    """

    name = "mistral3"
    description = "Mistral 3 / Mistral-Small-3.1 (Pixtral vision tower; boxes in resized-image pixels)"
    model_types = ("mistral3",)
    box_convention = "absolute_resized"
    Options = Mistral3Options
    tiny_options = TinyMistral3Options  # model.tiny is validated against it at plan time (--dry-run)
    # Module names in Mistral3ForConditionalGeneration: model.vision_tower, model.multi_modal_projector.
    vision_towers = ("vision_tower",)
    vision_projectors = ("multi_modal_projector",)
    # [IMG] and [IMG_END] are found through the processor's attributes; [IMG_BREAK] is not.
    suppressed_tokens = IMAGE_TOKENS
    # 1-D RoPE and causal text attention: the three speed-ups pass their conformance checks.
    prefix_sharing = True
    shared_prefill = True
    compact_decode = True

    # ---- loading ---------------------------------------------------------------------
    def load_processor(self, path: str | Path) -> Any:
        """``AutoProcessor`` (left padding) with ``options.longest_edge`` applied."""
        proc = super().load_processor(path)
        if self.options.longest_edge is not None:
            proc.image_processor.size = {"longest_edge": self.options.longest_edge}
        return proc

    # ---- processing ------------------------------------------------------------------
    def process(self, processor: Any, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> Any:
        """Tokenise rendered prompts without a second BOS (the chat template wrote one).

        transformers' own ``apply_chat_template(tokenize=True)`` applies the same rule.
        """
        kwargs: dict[str, Any] = {"add_special_tokens": False}
        if any(len(imgs) for imgs in images):
            kwargs["images"] = [list(imgs) for imgs in images]
        return processor(text=list(texts), padding=True, return_tensors="pt", **kwargs)

    def resized_image_size(self, processor: Any, image: Image.Image) -> tuple[int, int]:
        """``(width, height)`` after Pixtral's resize, computed by the processor's own helper.

        The helper is the ``get_resize_output_image_size`` beside the image processor's class;
        the rounding unit is what ``PixtralProcessor`` passes it: ``patch_size *
        spatial_merge_size``. The image is described by a zero-copy array of its shape.
        """
        import numpy as np

        resize = sibling_function(processor.image_processor, "get_resize_output_image_size")
        if resize is None:  # an image processor defined elsewhere: use the reference one
            from transformers.models.pixtral.image_processing_pixtral import get_resize_output_image_size as resize
        unit = processor.patch_size * processor.spatial_merge_size
        longest = processor.image_processor.size["longest_edge"]
        width, height = image.size
        shape_only = np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), (height, width, 3))
        h, w = resize(shape_only, size=(longest, longest), patch_size=(unit, unit), input_data_format="channels_last")
        return int(w), int(h)

    # ---- offline tiny checkpoints ----------------------------------------------------
    @classmethod
    def build_tiny_checkpoint(cls, path: str | Path, **options: Any) -> Path:
        """Write a tiny random Mistral 3 checkpoint to ``path`` and return it.

        Text: a Mistral decoder (hidden 64, 2 layers, ``rope_theta`` 3); vision: a Pixtral tower
        (hidden 32, 2 layers, patch 7) with the 2x2 patch merger; the real
        ``PixtralImageProcessor`` / ``PixtralProcessor``; a tiny byte-level BPE tokenizer with
        Mistral's special tokens that, like the real one, adds BOS when encoding; EOS ``</s>``.
        Options: :class:`TinyMistral3Options`. Reloads offline with
        ``AutoModelForImageTextToText`` / ``AutoProcessor``.
        """
        from transformers import Mistral3Config, PixtralImageProcessor, PixtralProcessor

        o, path = TinyMistral3Options.for_build(cls, path, options)
        tok = o.tokenizer(SPECIAL_TOKENS, ["[INST] [/INST] [IMG]"], eos_token="</s>", pad_token="<pad>",
                          bos_token="<s>", unk_token="<unk>")
        # Reloading with add_bos_token is how a transformers tokenizer gets its BOS post-processor.
        tok = reload_tokenizer(tok, add_bos_token=True)
        tok.chat_template = CHAT_TEMPLATE
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        config = Mistral3Config(
            vision_config=o.vit_config(o.vision_layers, model_type="pixtral", image_size=o.longest_edge,
                                       patch_size=o.patch_size,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            text_config=o.text_config(
                len(tok), model_type="mistral", head_dim=o.hidden_size // o.num_heads, sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": o.rope_theta},
                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
            ),
            image_token_index=ids["[IMG]"],
            spatial_merge_size=2,
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
        save_tiny_model(config, path, seed=o.seed, eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                        bos_token_id=ids["<s>"])
        PixtralProcessor(
            image_processor=PixtralImageProcessor(
                size={"longest_edge": o.longest_edge}, patch_size={"height": o.patch_size, "width": o.patch_size}
            ),
            tokenizer=tok,
            patch_size=o.patch_size,
            spatial_merge_size=2,
            chat_template=CHAT_TEMPLATE,
        ).save_pretrained(path)
        return path
