"""Guided choice in the built-in rollout engine: a random tiny model only ever emits a listed answer + EOS."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from core.interfaces import PromptInput, RolloutContext, SamplingParams
from core.plugins.builtin.rollout import TransformersRollout, eos_token_ids


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    """The shared tiny Qwen2.5-VL (tests/conftest.py): family, model, processor."""
    return tiny_qwen


def _prompt(fam, proc) -> PromptInput:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What colour is this image?"}, {"type": "image"}]}]
    return PromptInput(msgs, fam.render_prompt(proc, msgs), [Image.new("RGB", (28, 28), (0, 0, 255))])


@pytest.mark.parametrize("do_sample", [True, False])
def test_only_listed_answers_are_generated(tiny, do_sample):
    fam, model, proc = tiny
    choices = ["red", "green", "blue", "yellow", "light blue"]  # "light blue": a multi-token choice
    engine = TransformersRollout.from_options({"choices": choices})
    engine.setup(RolloutContext(model, proc, fam, torch.device("cpu"), fam.suppressed_token_ids(proc, model)))
    torch.manual_seed(0)
    sp = SamplingParams(n=64, max_new_tokens=16, do_sample=do_sample, temperature=1.5)
    groups = engine.generate([_prompt(fam, proc), _prompt(fam, proc)], sp)
    eos = eos_token_ids(model, proc)
    seen = set()
    for group in groups:
        assert len(group) == 64
        for c in group:
            assert c.text.strip() in choices, c.text
            assert not c.truncated and c.ids[-1] in eos
            seen.add(c.text.strip())
    if do_sample:  # the random model's own preferences decide the mix, but sampling covers several answers
        assert len(seen) >= 3, seen


def test_without_choices_a_random_model_rarely_says_a_colour(tiny):
    # The control: the constraint above is what makes every completion an answer.
    fam, model, proc = tiny
    engine = TransformersRollout.from_options({})
    engine.setup(RolloutContext(model, proc, fam, torch.device("cpu"), fam.suppressed_token_ids(proc, model)))
    torch.manual_seed(0)
    group = engine.generate([_prompt(fam, proc)], SamplingParams(n=64, max_new_tokens=2, do_sample=True))[0]
    hits = sum(c.text.strip() in ("red", "green", "blue", "yellow") for c in group)
    assert hits < 16, [c.text for c in group]


def test_a_choice_longer_than_the_token_budget_is_a_clear_error(tiny):
    fam, model, proc = tiny
    engine = TransformersRollout.from_options({"choices": ["red", "light blue"]})
    engine.setup(RolloutContext(model, proc, fam, torch.device("cpu"), fam.suppressed_token_ids(proc, model)))
    with pytest.raises(ValueError, match="'light blue' is .* tokens with its EOS, more than the 3 new tokens"):
        engine.generate([_prompt(fam, proc)], SamplingParams(n=2, max_new_tokens=3, do_sample=True))
