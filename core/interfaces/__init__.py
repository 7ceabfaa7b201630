"""The abstract interfaces plugins implement. Import them from here."""

from core.interfaces.base import Component, NestedComponent, NoOptions
from core.interfaces.device import Device
from core.interfaces.hf_family import PixelBoundsOptions, TransformersFamily
from core.interfaces.model import BoxConvention, ModelFamily
from core.interfaces.reward import (
    BoxTransform,
    Reward,
    RewardBatch,
    RewardContext,
    RewardItem,
    identity_box_transform,
)
from core.interfaces.rollout import Completion, PromptInput, RolloutContext, RolloutEngine, SamplingParams
from core.interfaces.task import DataError, Sample, TaskFormat

__all__ = [
    "BoxConvention",
    "BoxTransform",
    "Completion",
    "Component",
    "DataError",
    "Device",
    "ModelFamily",
    "NestedComponent",
    "NoOptions",
    "PixelBoundsOptions",
    "PromptInput",
    "Reward",
    "RewardBatch",
    "RewardContext",
    "RewardItem",
    "RolloutContext",
    "RolloutEngine",
    "SamplingParams",
    "Sample",
    "TaskFormat",
    "TransformersFamily",
    "identity_box_transform",
]
