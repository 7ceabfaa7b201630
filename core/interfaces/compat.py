"""Workarounds for defects in the installed transformers that more than one model family needs.

Kept in core so plugins do not duplicate them (plugins never import each other). Each
workaround probes for the defect first and is a no-op where transformers is already right.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def image_token_id(config: Any) -> int | None:
    """The image placeholder id of a VLM config (``image_token_id`` or ``image_token_index``)."""
    for attr in ("image_token_id", "image_token_index"):
        val = getattr(config, attr, None)
        if isinstance(val, int):
            return val
    return None


def multi_image_expansion_ok(model: Any) -> bool | None:
    """Whether ``generate(num_return_sequences=n)`` gives every copy of a prompt all its images.

    ``generate`` encodes images once and expands the encoder outputs per returned sequence
    with ``model._expand_multimodal_outputs``; the copies of a prompt with images ``[A, B]``
    need ``[A, B, A, B]``. Some model-specific overrides in transformers 5.23 (GLM-4V's, for
    one) interleave per image (``[A, A, B, B]``). Probes the helper on two one-token images
    without running the model. ``None``: this model cannot be probed this way.
    """
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    expand = getattr(model, "_expand_multimodal_outputs", None)
    tid = image_token_id(model.config)
    if expand is None or tid is None:
        return None
    a, b = torch.zeros(1, 1), torch.ones(1, 1)
    try:
        out = expand(torch.tensor([[tid, tid]]), {"image": BaseModelOutputWithPooling(pooler_output=[a, b])},
                     expand_size=2)
        got = [float(t.reshape(-1)[0]) for t in out["image"].pooler_output]
    except Exception as exc:  # a model-specific helper with other inputs: cannot probe it
        log.debug("cannot probe %s._expand_multimodal_outputs: %s", type(model).__name__, exc)
        return None
    return got == [0.0, 1.0, 0.0, 1.0]


def fix_multi_image_expansion(model: Any) -> bool:
    """Replace a per-image-interleaving ``_expand_multimodal_outputs`` on ``model``; True if patched.

    Binds transformers' generic ``GenerationMixin._expand_multimodal_outputs`` (correct for
    groups) to the instance. Raises if the probe still fails afterwards.
    """
    import types

    from transformers.generation.utils import GenerationMixin

    if multi_image_expansion_ok(model) is not False:
        return False
    model._expand_multimodal_outputs = types.MethodType(GenerationMixin._expand_multimodal_outputs, model)
    if multi_image_expansion_ok(model) is not True:
        raise RuntimeError(
            f"{type(model).__name__}: generate() would give the copies of a multi-image prompt the wrong "
            "images, and patching `_expand_multimodal_outputs` did not fix it in this transformers version"
        )
    return True
