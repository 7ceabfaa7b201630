"""The plugin API: everything a plugin may use from core, in one namespace.

A plugin imports only this package and :mod:`core.hookspecs` (as ``import pytest`` is the
facade over ``_pytest``)::

    from core.interfaces import Reward, RewardBatch, hookimpl, iou, parse_box

What is here: the interface base classes (``ModelFamily``, ``Reward``, ``TaskFormat``,
``Device``, ``RolloutEngine``) and their data types; ``hookimpl``; box parsing and IoU (one
convention for rewards and the evaluator); OpenAI message conversion (for engines that talk to
OpenAI-compatible servers); the helpers transformers-native model families share, including
the offline tiny-checkpoint builders; the rollout helpers every engine needs (EOS ids,
cutting completions at EOS); :func:`open_image`, the one way to open an image (allowed
formats only). The submodules are implementation detail: import the names from
here. Importing this package loads pydantic and pluggy, never torch or transformers.
"""

from core.hookspecs import hookimpl
from core.interfaces.base import Component, NestedComponent, NoOptions
from core.interfaces.boxes import DetObject, area, as_box, iou, last_answer, normalize_label, parse_box, parse_objects
from core.interfaces.compat import fix_multi_image_expansion, image_token_id, multi_image_expansion_ok
from core.interfaces.device import Device
from core.interfaces.hf_family import (
    PixelBoundsOptions,
    TransformersFamily,
    check_ordered,
    set_pixel_bounds,
    sibling_function,
    single_token_ids,
    size_value,
    transformers_has,
)
from core.interfaces.images import IMAGE_FORMATS, ImageFormatError, open_image
from core.interfaces.model import BoxConvention, ModelFamily
from core.interfaces.openai_messages import (
    RequestError,
    chat_to_openai_messages,
    data_url_to_image,
    image_to_data_url,
    openai_to_chat_messages,
)
from core.interfaces.reward import (
    BoxTransform,
    Reward,
    RewardBatch,
    RewardContext,
    RewardItem,
    identity_box_transform,
)
from core.interfaces.rollout import (
    Completion,
    PromptInput,
    RolloutContext,
    RolloutEngine,
    RolloutError,
    RolloutSetupError,
    SamplingParams,
    eos_token_ids,
    split_completions,
)
from core.interfaces.task import DataError, Sample, TaskFormat
from core.interfaces.tiny import TinyOptions, build_tiny_tokenizer, reload_tokenizer, save_tiny_model

__all__ = [
    # interfaces and their data types
    "BoxConvention",
    "BoxTransform",
    "Completion",
    "Component",
    "DataError",
    "Device",
    "ModelFamily",
    "NestedComponent",
    "NoOptions",
    "PromptInput",
    "Reward",
    "RewardBatch",
    "RewardContext",
    "RewardItem",
    "RolloutContext",
    "RolloutEngine",
    "RolloutError",
    "RolloutSetupError",
    "Sample",
    "SamplingParams",
    "TaskFormat",
    "identity_box_transform",
    # registration
    "hookimpl",
    # boxes
    "DetObject",
    "area",
    "as_box",
    "iou",
    "last_answer",
    "normalize_label",
    "parse_box",
    "parse_objects",
    # images (an allow-list of formats)
    "IMAGE_FORMATS",
    "ImageFormatError",
    "open_image",
    # OpenAI messages
    "RequestError",
    "chat_to_openai_messages",
    "data_url_to_image",
    "image_to_data_url",
    "openai_to_chat_messages",
    # transformers-native model families
    "PixelBoundsOptions",
    "TransformersFamily",
    "check_ordered",
    "fix_multi_image_expansion",
    "image_token_id",
    "multi_image_expansion_ok",
    "set_pixel_bounds",
    "sibling_function",
    "single_token_ids",
    "size_value",
    "transformers_has",
    # tiny offline checkpoints
    "TinyOptions",
    "build_tiny_tokenizer",
    "reload_tokenizer",
    "save_tiny_model",
    # rollout helpers
    "eos_token_ids",
    "split_completions",
]
