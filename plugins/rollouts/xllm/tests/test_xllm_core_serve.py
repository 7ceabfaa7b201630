"""The ``openai_server`` engine against a real ``python -m core.serve`` subprocess on 127.0.0.1.

Greedy completions through the server equal the built-in TransformersRollout's on the same
tiny Qwen2.5-VL checkpoint (one and two images); ``refresh_every`` makes the server load the
policy's new weights through ``/v1/load_checkpoint``.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from vlmr1_xllm import OpenAIServerRollout

from core.interfaces import PromptInput, RolloutContext, SamplingParams
from core.plugins import PluginHost
from core.plugins.builtin.rollout import TransformersRollout
from core.serving import ServerProcess
from core.testing.procs import scaled

GREEDY = SamplingParams(n=2, max_new_tokens=10, do_sample=False)
GREEDY1 = SamplingParams(n=1, max_new_tokens=10, do_sample=False)


@pytest.fixture(scope="module")
def family_cls():
    try:
        return PluginHost("qwen-vl").registry.get("models", "qwen2_5_vl")
    except Exception as exc:
        pytest.skip(f"needs the qwen2_5_vl model family (vlmr1-plugin-qwen-vl): {exc}")


@pytest.fixture(scope="module")
def ckpt(family_cls, tmp_path_factory):
    return family_cls.build_tiny_checkpoint(tmp_path_factory.mktemp("xllm") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    with ServerProcess(ckpt, ["--plugins", "qwen-vl", "--allow-reload"], startup_timeout=scaled(300)) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(family_cls, ckpt):
    fam = family_cls()
    model = fam.load_model(ckpt, dtype=torch.float32)
    model.eval()
    proc = fam.load_processor(ckpt)
    ctx = RolloutContext(model=model, processor=proc, family=fam, device=torch.device("cpu"),
                         suppressed_token_ids=fam.suppressed_token_ids(proc, model))
    builtin = TransformersRollout.from_options({"prompt_batch_size": 1})
    builtin.setup(ctx)
    return fam, proc, model, ctx, builtin


def prompts(fam, proc) -> list[PromptInput]:
    red = Image.new("RGB", (56, 56), (230, 20, 20))
    blue = Image.new("RGB", (84, 56), (20, 20, 230))
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this image?"}]}]
    two = [{"role": "user", "content": [{"type": "text", "text": "Picture 1:"}, {"type": "image"},
                                        {"type": "text", "text": "Picture 2:"}, {"type": "image"},
                                        {"type": "text", "text": "Which one is blue?"}]}]
    return [PromptInput(one, fam.render_prompt(proc, one), [red]),
            PromptInput(two, fam.render_prompt(proc, two), [red, blue])]


def engine(server, ctx, **opts) -> OpenAIServerRollout:
    eng = OpenAIServerRollout.from_options({"base_url": server.url, "timeout_s": 60, "max_retries": 1, **opts})
    eng.setup(ctx)
    return eng


def as_tuples(groups):
    return [[(c.ids, c.text, c.truncated) for c in g] for g in groups]


def test_greedy_through_server_equals_builtin(server, local):
    fam, proc, model, ctx, builtin = local
    ps = prompts(fam, proc)
    # One prompt per call, as the server does; greedy n=2 is the same answer twice.
    expected = [builtin.generate([p], GREEDY1)[0] * 2 for p in ps]
    eng = engine(server, ctx)
    got = eng.generate(ps, GREEDY)
    assert eng.model_id() == "tiny"
    assert as_tuples(got) == as_tuples(expected)
    assert all(len(g) == 2 for g in got)
    assert eng.stats["retries"] == 0


def test_seeded_sampling_is_reproducible(server, local):
    fam, proc, model, ctx, builtin = local
    eng = engine(server, ctx)
    sampled = SamplingParams(n=3, max_new_tokens=8, temperature=1.0)

    def run(seed):
        ps = prompts(fam, proc)
        for p in ps:
            p.seed = seed
        return as_tuples(eng.generate(ps, sampled))

    first = run(11)
    assert run(11) == first and run(12) != first
    assert len({tuple(c[0]) for c in first[0]}) > 1  # the three samples differ


def test_retokenised_ids_without_server_token_ids(server, local):
    fam, proc, model, ctx, builtin = local
    eng = engine(server, ctx, request_token_ids=False)
    got = eng.generate(prompts(fam, proc), SamplingParams(n=1, max_new_tokens=10, do_sample=False))
    tok = proc.tokenizer
    for (c,) in got:
        ids = tok(c.text, add_special_tokens=False)["input_ids"]
        assert c.ids == (ids if c.truncated else ids + [tok.eos_token_id])


@pytest.mark.parametrize("field", ["structured_outputs", "guided_choice"])
def test_choices_through_server_equal_builtin_choices(server, local, field):
    """``choices`` sent as either field: core.serve decodes with the built-in engine's own constraint."""
    fam, proc, model, ctx, builtin = local
    choices = ["red", "blue", "dark green", "yellow"]
    constrained = TransformersRollout.from_options({"prompt_batch_size": 1, "choices": choices})
    constrained.setup(ctx)
    ps = prompts(fam, proc)
    expected = [constrained.generate([p], GREEDY1)[0] for p in ps]
    got = engine(server, ctx, choices=choices, choice_field=field).generate(ps, GREEDY1)
    assert as_tuples(got) == as_tuples(expected)
    assert all(c.text in choices for g in got for c in g)
    sampled = engine(server, ctx, choices=choices, choice_field=field).generate(
        ps, SamplingParams(n=4, max_new_tokens=10, temperature=1.0))
    assert all(c.text in choices and not c.truncated for g in sampled for c in g)


def test_refresh_loads_new_policy_weights(server, local, ckpt, tmp_path):
    fam, proc, model, ctx, builtin = local
    ps = prompts(fam, proc)
    before = as_tuples(builtin.generate([ps[0]], GREEDY1))
    policy = fam.load_model(ckpt, dtype=torch.float32)
    policy.eval()
    # An "optimizer step" that certainly changes greedy answers: new random output weights.
    with torch.no_grad():
        torch.manual_seed(1)
        policy.get_output_embeddings().weight.normal_(0, 1.0)
    new_ctx = RolloutContext(model=policy, processor=proc, family=fam, device=torch.device("cpu"),
                             suppressed_token_ids=ctx.suppressed_token_ids)
    new_builtin = TransformersRollout.from_options({"prompt_batch_size": 1})
    new_builtin.setup(new_ctx)
    after = as_tuples(new_builtin.generate([ps[0]], GREEDY1))
    assert after != before
    eng = engine(server, new_ctx, refresh_every=2, checkpoint_dir=str(tmp_path / "refresh"),
                 reload_url=server.url + "/load_checkpoint")
    try:
        eng.sync_weights(policy)  # step 1 of K=2: the server still has the old weights
        assert eng.steps_since_refresh == 1
        assert as_tuples(eng.generate([ps[0]], GREEDY1)) == before
        eng.sync_weights(policy)  # step 2: saved and reloaded
        assert eng.refreshes == 1 and eng.steps_since_refresh == 0
        assert as_tuples(eng.generate([ps[0]], GREEDY1)) == after
    finally:  # leave the shared server as it was
        eng.client.post(server.url + "/load_checkpoint", json={"checkpoint": str(ckpt)}, timeout=60)
    assert as_tuples(eng.generate([ps[0]], GREEDY1)) == before
