"""Offline building blocks for tiny, randomly initialised test checkpoints.

Nothing can be downloaded in tests or in the CPU quickstart, so model families build their
tiny checkpoints from parts made here. :func:`build_tiny_tokenizer` trains a small byte-level
BPE tokenizer with the ``tokenizers`` library on a built-in corpus (chat-template words,
reasoning/answer tags, digits, JSON/box punctuation, colours, shapes, question words) plus
whatever a family adds, and wraps it in a ``transformers.PreTrainedTokenizerFast`` that
saves and reloads through ``AutoTokenizer`` / ``AutoProcessor`` like a real one.
The rest of a family's builder is shared too: :class:`TinyOptions` (the options every tiny
build has, their checks, and the decoder / ViT config dicts), :func:`save_tiny_model` and
:func:`reload_tokenizer`, so a family's ``build_tiny_checkpoint`` states only its architecture.

Example (a family's tiny builder)::

    tok = build_tiny_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"],
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tok.convert_tokens_to_ids("<|image_pad|>")  # one id; the token is never split
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_T = TypeVar("_T", bound="TinyOptions")

#: Words every tiny tokenizer learns, so typical prompts and answers tokenise into few ids.
BASE_CORPUS: tuple[str, ...] = (
    # chat template and roles
    "system user assistant You are a helpful assistant.",
    # R1-style reasoning/answer tags and their usual instruction text
    "<think> </think> <answer> </answer> <think>reasoning</think><answer>answer</answer>",
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
    # digits and numbers, JSON and box punctuation
    "0 1 2 3 4 5 6 7 8 9 10 12 28 56 100 1000 0.5 3.14 -1",
    '[ ] { } ( ) , : ; . " \' ? ! = + - * / < > _ # @ % &',
    '[{"bbox_2d": [10, 20, 30, 40], "label": "red circle"}]',
    '{"bbox_2d": [0, 0, 56, 56], "label": "object"}',
    # question words and common short English
    "What Which Where How Who Why When Is Are Does Do Can Please the a an of in on is are this that",
    "what which where how who why when colour color shape image picture answer question object box",
    "Locate the object and output its bbox coordinates in JSON format.",
    "What colour is this image? What shape is in the picture? How many objects are there?",
    # colours, shapes, yes/no, letters
    "red green blue yellow purple orange black white",
    "circle square triangle rectangle star ellipse line dot",
    "yes no Yes No true false none",
    "A B C D E (A) (B) (C) (D) (E) A. B. C. D. E.",
)


def build_tiny_tokenizer(
    special_tokens: Sequence[str],
    extra_corpus: Iterable[str] = (),
    vocab_size: int = 512,
    *,
    eos_token: str | None = None,
    pad_token: str | None = None,
    bos_token: str | None = None,
    unk_token: str | None = None,
    model_max_length: int = 4096,
    pre_tokenizer_regex: str | None = None,
    tokenizer_class: type | None = None,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer offline and wrap it for transformers.

    Args:
        special_tokens: tokens that must each be ONE id and never be split or merged (chat
            markers, image placeholders ...). They get the first ids, in the order given, and
            are dropped by ``decode(..., skip_special_tokens=True)``.
        extra_corpus: family-specific text added to :data:`BASE_CORPUS` (e.g. template words).
        vocab_size: target vocabulary size including the 256 byte symbols and the special
            tokens (the trainer may stop earlier when the corpus has no more merges).
        eos_token: the EOS token (must be one of ``special_tokens``); likewise
        pad_token: the padding token,
        bos_token: the BOS token (most chat models have none) and
        unk_token: the UNK token (byte-level BPE never needs one).
        model_max_length: stored in the tokenizer config.
        pre_tokenizer_regex: the split pattern applied before the byte-level mapping, to
            match a real family's tokenizer (e.g. Qwen2's, which splits digits one by one, so
            the tiny vocabulary can be loaded by that family's tokenizer class). Default:
            the GPT-2 pattern built into ``ByteLevel``.
        tokenizer_class: a transformers byte-level BPE tokenizer class built from
            ``vocab=`` and ``merges=`` (e.g. ``Qwen2Tokenizer``) to return instead of the
            generic ``PreTrainedTokenizerFast``, so the checkpoint reloads as that class like
            a real one. Such a class installs its own pre-tokenizer: pass the matching
            ``pre_tokenizer_regex``; a mismatch is detected on the corpus and raised.

    Returns:
        A ``PreTrainedTokenizerFast``. Byte-level BPE has no unknown input: every string
        encodes, and ``decode(encode(s))`` returns ``s`` exactly (no whitespace clean-up).

    Raises:
        ValueError: duplicate special tokens, a named token missing from ``special_tokens``
            and the vocabulary, or a ``vocab_size`` too small for the byte alphabet.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(special_tokens)
    if len(set(specials)) != len(specials):
        dupes = sorted({t for t in specials if specials.count(t) > 1})
        raise ValueError(f"build_tiny_tokenizer: duplicate special_tokens {dupes}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"build_tiny_tokenizer: vocab_size={vocab_size} is smaller than the 256 byte symbols "
            f"plus {len(specials)} special tokens"
        )
    for role, tok in (("eos_token", eos_token), ("pad_token", pad_token),
                      ("bos_token", bos_token), ("unk_token", unk_token)):
        if tok is not None and tok not in specials:
            raise ValueError(f"build_tiny_tokenizer: {role}={tok!r} is not one of special_tokens")

    # Byte-level BPE (GPT-2/Qwen style): the byte alphabet covers every input, so there is no
    # UNK and decoding is an exact inverse of encoding.
    tk = Tokenizer(models.BPE())
    if pre_tokenizer_regex is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pre_tokenizer_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    corpus = list(BASE_CORPUS) + [str(t) for t in extra_corpus]
    # Repeat the corpus a little so frequent words win merges over one-off strings.
    tk.train_from_iterator(corpus * 4, trainer=trainer)

    common = dict(
        eos_token=eos_token,
        pad_token=pad_token,
        bos_token=bos_token,
        unk_token=unk_token,
        extra_special_tokens=[t for t in specials if t not in {eos_token, pad_token, bos_token, unk_token}],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    generic = PreTrainedTokenizerFast(tokenizer_object=tk, **common)
    if tokenizer_class is None:
        return generic
    state = json.loads(tk.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = tokenizer_class(vocab=state["vocab"], merges=merges, **common)
    probe = [*corpus, "".join(specials) + " 0123 x\n\n  y"]
    if [tok(t)["input_ids"] for t in probe] != [generic(t)["input_ids"] for t in probe]:
        raise ValueError(
            f"build_tiny_tokenizer: {tokenizer_class.__name__} tokenises differently from the trained "
            "tokenizer; pass the pre_tokenizer_regex that class uses"
        )
    return tok


def reload_tokenizer(tokenizer: Any, **kwargs: Any) -> Any:
    """Save ``tokenizer`` and load it back through ``AutoTokenizer`` with ``kwargs``.

    How a transformers tokenizer gets what only loading sets up: named tokens
    (``extra_special_tokens={"image_token": ...}``, read by processors as
    ``tokenizer.image_token``), a BOS post-processor (``add_bos_token=True``) ...
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, **kwargs)


class TinyOptions(BaseModel):
    """The options every family's ``build_tiny_checkpoint`` shares; subclass to add its own.

    A decoder of ``num_layers`` x ``hidden_size`` with ``num_heads`` / ``num_kv_heads``, a
    vision tower of width ``vision_hidden_size``, a tokenizer of ``vocab_size`` trained on
    :data:`BASE_CORPUS` plus ``extra_corpus``, weights drawn with ``seed``. ``rope_theta`` is
    tiny on purpose: with the real 1e6 a 2-layer, 16-dim-head model cannot tell nearby
    positions apart. A subclass whose defaults depend on other options fills them in
    :meth:`resolve_defaults`; its own checks go in its own ``model_validator`` (run after these).
    """

    # Upper bounds keep a "tiny" build tiny: hidden_size=1e9 used to start allocating, then crash.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    hidden_size: int = Field(64, ge=8, le=4096)
    num_layers: int = Field(2, ge=1, le=64)
    num_heads: int = Field(4, ge=1, le=256)
    num_kv_heads: int = Field(2, ge=1, le=256)
    intermediate_size: int = Field(128, ge=1, le=16384)
    rope_theta: float = Field(3.0, gt=0, le=1e9)
    vision_hidden_size: int = Field(32, ge=8, le=4096)
    vision_heads: int = Field(2, ge=1, le=256)
    vocab_size: int = Field(512, ge=300, le=65536)
    extra_corpus: list[str] = Field(default_factory=list, max_length=100_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    #: Largest value of any whole-number option of a subclass (vision depth, patch size ...).
    MAX_INT_OPTION: ClassVar[int] = 1 << 16
    #: Parameters a tiny build may have (the decoder's embeddings and layers, estimated).
    MAX_PARAMETERS: ClassVar[int] = 1_000_000_000

    @model_validator(mode="after")
    def _bounded(self) -> TinyOptions:
        for name in type(self).model_fields:
            v = getattr(self, name)
            items = v if isinstance(v, list) else [v]
            # Pixel bounds are areas (a real recipe's max_pixels is 12845056); the seed is any 32-bit number.
            limit = 1 << 28 if name.endswith("pixels") else None if name == "seed" else self.MAX_INT_OPTION
            if limit is not None and any(isinstance(x, int) and not isinstance(x, bool) and abs(x) > limit
                                         for x in items):
                raise ValueError(f"{name}={v} is not a tiny-checkpoint size (at most {limit})")
        h, inter = self.hidden_size, self.intermediate_size
        params = 2 * self.vocab_size * h + self.num_layers * (4 * h * h + 3 * h * inter)
        if params > self.MAX_PARAMETERS:
            raise ValueError(f"these sizes make a decoder of about {params / 1e9:.1f}B parameters, not a tiny "
                             f"checkpoint (at most {self.MAX_PARAMETERS / 1e9:g}B)")
        return self

    def resolve_defaults(self) -> None:
        """Fill options whose defaults depend on others (before the shape checks); default none."""

    @model_validator(mode="after")
    def _check_heads(self) -> TinyOptions:
        self.resolve_defaults()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError("vision_hidden_size must be divisible by vision_heads")
        return self

    @classmethod
    def for_build(cls: type[_T], owner: type, path: str | Path, options: Mapping[str, Any]) -> tuple[_T, Path]:
        """Validate ``options`` for ``owner.build_tiny_checkpoint`` and create ``path``.

        Raises ``ValueError`` naming the builder and the bad option.
        """
        try:
            opts = cls.model_validate(dict(options))
        except Exception as exc:  # pydantic's message names the bad option
            raise ValueError(f"{owner.__name__}.build_tiny_checkpoint: invalid options: {exc}") from exc
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        return opts, path

    def tokenizer(self, special_tokens: Sequence[str], corpus: Iterable[str] = (), **kwargs: Any) -> Any:
        """:func:`build_tiny_tokenizer` with these options' ``vocab_size`` and ``extra_corpus``.

        ``corpus``: the family's own words (added before ``extra_corpus``); ``kwargs`` go to
        :func:`build_tiny_tokenizer` (``eos_token``, ``tokenizer_class`` ...).
        """
        return build_tiny_tokenizer(special_tokens, extra_corpus=[*corpus, *self.extra_corpus],
                                    vocab_size=self.vocab_size, **kwargs)

    def vit_config(self, num_layers: int, **extra: Any) -> dict[str, Any]:
        """A ViT-style ``vision_config`` (CLIP, SigLIP, InternViT keys) of ``num_layers``, plus ``extra``."""
        return {
            "hidden_size": self.vision_hidden_size,
            "intermediate_size": 2 * self.vision_hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": self.vision_heads,
            **extra,
        }

    def text_config(self, vocab_size: int, **extra: Any) -> dict[str, Any]:
        """The decoder part of a model config (``text_config``), plus ``extra`` keys."""
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": 4096,
            **extra,
        }


def save_tiny_model(config: Any, path: str | Path, *, seed: int, **generation: Any) -> Any:
    """Initialise ``AutoModelForImageTextToText`` from ``config`` with ``seed``, save it, return it.

    Its generation config samples at temperature 1 (like the real chat checkpoints) with the
    ``generation`` ids (``eos_token_id``, ``pad_token_id`` ...).
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**generation, do_sample=True, temperature=1.0)
    model.save_pretrained(path)
    return model
