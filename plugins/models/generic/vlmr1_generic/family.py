"""The generic model family: any ``AutoModelForImageTextToText`` checkpoint.

SmolVLM / Idefics3, Gemma 3, LLaVA(-NeXT, -OneVision), Mistral 3, PaliGemma ... load through
``AutoModelForImageTextToText`` / ``AutoProcessor`` and their chat templates, so the defaults
of :class:`~core.interfaces.TransformersFamily` already carry most of the behaviour. What a dedicated
family knows and this one cannot:

* the **box convention** of the model's answers: ``unknown`` unless the config says otherwise
  (``options.box_convention``), so box rewards must be told;
* extra per-token inputs beyond ``token_type_ids`` / ``mm_token_type_ids``;
* model-specific generation defects (:class:`~core.interfaces.TransformersFamily` repairs the
  known one, see :func:`core.interfaces.compat.fix_multi_image_expansion`).

It is a **fallback**: it claims every ``model_type`` transformers maps to
``AutoModelForImageTextToText``, including those a dedicated family (Qwen-VL, InternVL, GLM-4V)
also claims; the plugin host must prefer the dedicated one (class attribute ``fallback``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.interfaces import TinyOptions, TransformersFamily, reload_tokenizer, save_tiny_model, single_token_ids

if TYPE_CHECKING:
    from PIL import Image

#: Chat template of the tiny LLaVA, in LLaVA-1.5's ``USER: <image>\n... ASSISTANT:``
#: format (images in message order; string contents and system turns accepted).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '\n' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<image>", "<pad>")

#: Chat template of the tiny Gemma 3, in Gemma's turn format (``<start_of_image>`` per image;
#: the processor expands it to ``<start_of_image>`` + soft tokens + ``<end_of_image>``).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)
GEMMA3_NAMED_TOKENS: dict[str, str] = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}


#: Processor attributes naming image structure tokens beyond TransformersFamily's list: Pixtral's
#: (Mistral 3's) row break ``[IMG_BREAK]``, which a random policy would otherwise sample (found by
#: the ``structure_suppressed`` conformance check on a Mistral 3 checkpoint).
EXTRA_PROCESSOR_TOKEN_ATTRS: tuple[str, ...] = ("image_break_token",)


@functools.lru_cache(maxsize=1)
def image_text_to_text_model_types() -> frozenset[str]:
    """Every ``model_type`` the installed transformers maps to ``AutoModelForImageTextToText``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return frozenset(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


class GenericOptions(BaseModel):
    """Options of the generic family (``model.options`` in a run config).

    ``box_convention``: how the model writes boxes, if known (``unknown``: rewards that need
    boxes in original pixels must refuse or be configured). ``absolute_resized`` is not
    offered: this family cannot know every processor's resize rule.
    ``processor_kwargs``: extra ``AutoProcessor.from_pretrained`` kwargs.
    ``call_kwargs``: extra kwargs for every processor call (e.g. SmolVLM's
    ``{"do_image_splitting": false}``).
    ``suppress_tokens``: extra token strings generation must never emit.
    ``vision_modules``: qualified module names of the vision tower/projector, overriding the
    detection by name (needed where a model uses names this family does not know).
    """

    model_config = ConfigDict(extra="forbid")
    box_convention: Literal["unknown", "normalized_1000", "absolute_original"] = "unknown"
    processor_kwargs: dict[str, Any] = Field(default_factory=dict)
    call_kwargs: dict[str, Any] = Field(default_factory=dict)
    suppress_tokens: list[str] = Field(default_factory=list)
    vision_modules: list[str] | None = None

    @model_validator(mode="after")
    def _no_reserved_call_kwargs(self) -> GenericOptions:
        reserved = {"text", "images", "padding", "return_tensors"} & set(self.call_kwargs)
        if reserved:
            raise ValueError(f"call_kwargs may not set {sorted(reserved)}: the engine passes them")
        return self


class TinyGenericOptions(TinyOptions):
    """Options of :meth:`GenericFamily.build_tiny_checkpoint` (all overridable).

    ``arch``: ``llava`` (CLIP vision + Llama, ``LlavaForConditionalGeneration``) or ``gemma3``
    (SigLIP vision + Gemma 3 with sliding-window layers and bidirectional attention over image
    tokens, driven by ``token_type_ids``). ``image_size`` / ``patch_size``: the vision input;
    LLaVA writes one ``<image>`` token per patch (28 / 14: 4), Gemma 3 average-pools the patch
    grid to ``mm_tokens_per_image`` = 4 soft tokens (28 / 7: 4x4 patches -> 2x2). ``rope_theta``
    is tiny on purpose so a 2-layer model can tell nearby positions apart. The decoder and
    tokenizer options are :class:`~core.interfaces.tiny.TinyOptions`'.
    """

    arch: Literal["llava", "gemma3"] = "llava"
    vision_layers: int = Field(2, ge=2)  # LLaVA reads the second-to-last vision layer
    image_size: int = Field(28, ge=2)
    patch_size: int | None = Field(None, ge=1, description="default: 14 (llava), 7 (gemma3)")

    @property
    def patch(self) -> int:
        """The patch size, with the per-architecture default."""
        return self.patch_size or (14 if self.arch == "llava" else 7)

    @model_validator(mode="after")
    def _shapes(self) -> TinyGenericOptions:
        grid, rest = divmod(self.image_size, self.patch)
        if rest:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch})")
        if self.arch == "gemma3" and grid % 2:
            raise ValueError(f"gemma3: the patch grid ({grid}) must be even (pooled to 2x2 image tokens)")
        return self


class GenericFamily(TransformersFamily):
    """Any ``AutoModelForImageTextToText`` checkpoint, as a fallback.

    Loading, prompting (the checkpoint's own chat template) and processing are transformers'
    defaults; vision modules are found by transformers' usual module names and suppressed ids
    come from the processor's and config's image/video token attributes (both
    :class:`~core.interfaces.TransformersFamily`'s defaults). What is left here: the options.
    """

    tiny_options = TinyGenericOptions  # model.tiny is validated against it at plan time

    name = "generic"
    description = "any AutoModelForImageTextToText checkpoint (fallback; box convention from options)"
    model_types = ()
    box_convention = "unknown"
    #: A fallback family: the plugin host prefers any non-fallback family claiming the same
    #: ``model_type`` (see the plugin README).
    fallback: ClassVar[bool] = True
    Options = GenericOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        # The convention is a per-checkpoint fact here, so it is an option, not a class fact.
        self.box_convention = self.options.box_convention  # type: ignore[misc]

    @classmethod
    def handles(cls, model_type: str) -> bool:
        """True for every ``model_type`` mapped to ``AutoModelForImageTextToText``."""
        return model_type in image_text_to_text_model_types()

    # ---- loading ---------------------------------------------------------------------
    def check_checkpoint(self, path: str | Path) -> Any:
        """Refuse a checkpoint that is not a decoder-only ``AutoModelForImageTextToText`` VLM.

        Encoder-decoder models (BLIP, Florence-2, Pix2Struct ...) are refused: GRPO's training
        forward appends completions to the prompt, which only decoder-only models accept.
        """
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path))
        if not self.handles(cfg.model_type):
            raise ValueError(
                f"{path}: config.model_type {cfg.model_type!r} is not an AutoModelForImageTextToText model in "
                f"this transformers; model family {self.name!r} cannot load it"
            )
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(
                f"{path}: {cfg.model_type!r} is an encoder-decoder model; vlmr1 trains decoder-only VLMs"
            )
        return cfg

    def processor_init_kwargs(self) -> dict[str, Any]:
        """``options.processor_kwargs``."""
        return dict(self.options.processor_kwargs)

    def processor_call_kwargs(self) -> dict[str, Any]:
        """``options.call_kwargs``, on every processor call."""
        return dict(self.options.call_kwargs)

    # ---- processing ------------------------------------------------------------------
    def process(self, processor: Any, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> Any:
        """Tokenise prompts and preprocess images, passing images as one list per prompt.

        Nested lists are the batched multi-image format every transformers processor accepts;
        some (Gemma 3, which counts images per prompt) reject the flat list the base class
        passes once a batch mixes prompts with different image counts. Prompts rendered with
        a BOS already in them are tokenised without adding another.
        """
        kwargs = dict(self.processor_call_kwargs())
        if any(len(imgs) for imgs in images):
            kwargs["images"] = [list(imgs) for imgs in images]
        # transformers' own rule (ProcessorMixin.apply_chat_template): a rendered prompt that
        # already starts with BOS (Gemma's, Llama 3's templates) must not get a second one.
        bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
        if bos and texts and all(t.startswith(bos) for t in texts):
            kwargs.setdefault("add_special_tokens", False)
        return processor(text=list(texts), padding=True, return_tensors="pt", **kwargs)

    # ---- facts for training ----------------------------------------------------------
    def vision_module_names(self, model: Any) -> list[str]:
        """``options.vision_modules``, else the shallowest module of each known tower/projector name.

        Raises a ValueError naming the option when nothing is found (rather than letting
        frozen-vision training or LoRA silently cover the vision tower).
        """
        if self.options.vision_modules is not None:
            present = {n for n, _ in model.named_modules()}
            missing = [n for n in self.options.vision_modules if n not in present]
            if missing:
                raise ValueError(f"model.options.vision_modules: {missing} not found in {type(model).__name__}")
            return list(self.options.vision_modules)
        try:
            return super().vision_module_names(model)
        except ValueError as exc:  # a model with names this family does not know: say what to set
            raise ValueError(f"{exc}; set model.options.vision_modules") from None

    def suppressed_token_ids(self, processor: Any, model: Any) -> list[int]:
        """Vision placeholder ids from the processor's and config's token attributes.

        Strings (``processor.image_token`` ..., and :data:`EXTRA_PROCESSOR_TOKEN_ATTRS`) count only
        when they are one vocabulary entry;
        ids (``config.image_token_id`` ...) only when inside the vocabulary. Plus
        ``options.suppress_tokens``, each of which must be one vocabulary entry.
        """
        tok = getattr(processor, "tokenizer", processor)
        found = single_token_ids(tok, self.options.suppress_tokens)
        unknown = [t for t in self.options.suppress_tokens if t not in {tok.convert_ids_to_tokens(i) for i in found}]
        if unknown:
            raise ValueError(f"model.options.suppress_tokens: {unknown} are not single tokens of this tokenizer")
        extra = [getattr(processor, a, None) for a in EXTRA_PROCESSOR_TOKEN_ATTRS]
        found |= single_token_ids(tok, [t for t in extra if isinstance(t, str)])
        return sorted(set(super().suppressed_token_ids(processor, model)) | found)

    # ---- offline tiny checkpoints ----------------------------------------------------
    @classmethod
    def build_tiny_checkpoint(cls, path: str | Path, **options: Any) -> Path:
        """Write a tiny random checkpoint of an ``AutoModelForImageTextToText`` architecture.

        ``arch: llava`` (default): a tiny CLIP vision tower (hidden 32, 2 layers, 28x28 input,
        patch 14: 4 ``<image>`` tokens, CLS dropped as in LLaVA-1.5) and a tiny Llama decoder;
        the real ``CLIPImageProcessor`` / ``LlavaProcessor``; a LLaVA-1.5 style chat template;
        EOS ``</s>``. ``arch: gemma3``: a tiny SigLIP tower (28x28, patch 7, pooled to 4 soft
        tokens) and a Gemma 3 decoder (one sliding-window and one global layer, window 16); the
        real ``Gemma3ImageProcessor`` / ``Gemma3Processor``; Gemma's turn template; EOS
        ``<eos>`` / ``<end_of_turn>``. Both: hidden 64, 2 layers, ``rope_theta`` 3, a tiny
        byte-level BPE tokenizer with the real special tokens. Options:
        :class:`TinyGenericOptions`. Reloads offline with ``AutoModelForImageTextToText`` /
        ``AutoProcessor``.
        """
        o, path = TinyGenericOptions.for_build(cls, path, options)
        (_tiny_llava if o.arch == "llava" else _tiny_gemma3)(o, path)
        return path


def _tiny_tokenizer(o: TinyGenericOptions, specials: tuple[str, ...], corpus: list[str], *, eos: str, pad: str,
                    bos: str, named: dict[str, str] | None = None) -> Any:
    """A tiny byte-level BPE tokenizer that, like Llama's and Gemma's, prepends BOS when encoding.

    Reloading with ``add_bos_token`` / a dict ``extra_special_tokens`` is how a transformers
    tokenizer gets its BOS post-processor and named tokens (``tokenizer.boi_token`` ...).
    """
    tok = o.tokenizer(specials, corpus, eos_token=eos, pad_token=pad, bos_token=bos, unk_token="<unk>")
    kwargs: dict[str, Any] = {"add_bos_token": True}
    if named:
        kwargs["extra_special_tokens"] = dict(named)
    return reload_tokenizer(tok, **kwargs)


def _tiny_llava(o: TinyGenericOptions, path: Path) -> None:
    """A tiny LLaVA-1.5 (see :meth:`GenericFamily.build_tiny_checkpoint`)."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    tok = _tiny_tokenizer(o, LLAVA_SPECIAL_TOKENS, ["USER: ASSISTANT:"], eos="</s>", pad="<pad>", bos="<s>")
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
    grid = o.image_size // o.patch
    config = LlavaConfig(
        vision_config=o.vit_config(o.vision_layers, model_type="clip_vision_model", image_size=o.image_size,
                                   patch_size=o.patch, projection_dim=o.vision_hidden_size),
        text_config=o.text_config(
            len(tok), model_type="llama",
            rope_parameters={"rope_type": "default", "rope_theta": o.rope_theta},
            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        ),
        image_token_index=ids["<image>"],
        image_seq_length=grid * grid,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    save_tiny_model(config, path, seed=o.seed, eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                    bos_token_id=ids["<s>"])
    # LLaVA-1.5's preprocessing (CLIP: shortest edge, centre crop), at the tiny size.
    LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": o.image_size}, crop_size={"height": o.image_size, "width": o.image_size}
        ),
        tokenizer=tok,
        patch_size=o.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token (dropped by the "default" strategy)
        image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(path)


def _tiny_gemma3(o: TinyGenericOptions, path: Path) -> None:
    """A tiny Gemma 3 (see :meth:`GenericFamily.build_tiny_checkpoint`)."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    # Gemma3Processor reads named tokens (tokenizer.boi_token ...).
    tok = _tiny_tokenizer(o, GEMMA3_SPECIAL_TOKENS, ["user model"], eos="<eos>", pad="<pad>", bos="<bos>",
                          named=GEMMA3_NAMED_TOKENS)
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIAL_TOKENS}
    rope = {"rope_type": "default", "rope_theta": o.rope_theta}
    eos = [ids["<eos>"], ids["<end_of_turn>"]]
    layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(o.num_layers)]
    config = Gemma3Config(
        text_config=o.text_config(
            len(tok), model_type="gemma3_text", head_dim=o.hidden_size // o.num_heads,
            query_pre_attn_scalar=o.hidden_size // o.num_heads, sliding_window=16, layer_types=layer_types,
            rope_parameters={"full_attention": rope, "sliding_attention": dict(rope)},
            bos_token_id=ids["<bos>"], eos_token_id=eos, pad_token_id=ids["<pad>"],
        ),
        vision_config=o.vit_config(o.vision_layers, model_type="siglip_vision_model", image_size=o.image_size,
                                   patch_size=o.patch),
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    save_tiny_model(config, path, seed=o.seed, eos_token_id=eos, pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"])
    Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": o.image_size, "width": o.image_size}),
        tokenizer=tok,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=4,
    ).save_pretrained(path)

