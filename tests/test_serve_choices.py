"""Guided choice in ``core.serve``: the built-in engine's ``choices``, per request.

A request's ``structured_outputs: {"choice": [...]}`` (vLLM >= 0.10.2) or ``guided_choice``
(older vLLM) must give exactly what :class:`~core.plugins.builtin.rollout.TransformersRollout`
with ``choices`` gives for the same prompt; other constraints are refused, never ignored. End to
end: a short quickstart run, evaluated with the quickstart config through ``core.serve`` and the
``openai_server`` engine (``rollout.options.choices`` travelling as the guided choice), scores
what the built-in engine scores, answer for answer.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from core.interfaces import PromptInput, RequestError, RolloutContext, SamplingParams, chat_to_openai_messages
from core.plugins import PluginHost
from core.plugins.builtin.rollout import TransformersRollout
from core.serving import ModelServer, ServerLimits
from core.testing.procs import scaled

#: What the quickstart config needs: the model family, its task and its reward.
PLUGINS = "qwen-vl,synthetic,text"
CHOICES = ["red", "blue", "dark green", "yellow"]
QUESTION = [{"role": "user", "content": [{"type": "text", "text": "What colour is this image?"}, {"type": "image"}]}]
TEXT_ONLY = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]


def _family_cls():
    try:
        return PluginHost("qwen-vl").registry.get("models", "qwen2_5_vl")
    except Exception as exc:  # the plugin is not installed
        pytest.skip(f"needs the qwen2_5_vl model family (vlmr1-plugin-qwen-vl): {exc}")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return _family_cls().build_tiny_checkpoint(tmp_path_factory.mktemp("choices") / "tiny")


@pytest.fixture(scope="module")
def ms(tiny_ckpt):
    server = ModelServer.from_checkpoint(tiny_ckpt, plugins="qwen-vl", limits=ServerLimits(max_tokens=32),
                                         max_batch_size=8)
    yield server
    server.close()


@pytest.fixture(scope="module")
def builtin(tiny_ckpt):
    """``expected(messages, images, choices)``: the built-in engine's greedy answer, one prompt per call."""
    import torch

    from core.plugins.builtin.cpu import CPUDevice
    from core.runtime.loader import load_checkpoint

    # Loaded as the server loads it (the one loader), so both sides run the same weights and dtype.
    b = load_checkpoint(tiny_ckpt, _family_cls()(), CPUDevice())
    fam, proc = b.family, b.processor
    ctx = RolloutContext(model=b.model, processor=proc, family=fam, device=torch.device("cpu"),
                         suppressed_token_ids=b.suppressed)

    def expected(messages, images, choices=None, max_new_tokens=12):
        eng = TransformersRollout.from_options({"prompt_batch_size": 1, "choices": choices})
        eng.setup(ctx)
        return eng.generate([PromptInput(messages, fam.render_prompt(proc, messages), list(images))],
                            SamplingParams(n=1, max_new_tokens=max_new_tokens, do_sample=False))[0][0]

    return expected


def _images():
    return [Image.new("RGB", (56, 56), (220, 30, 30)), Image.new("RGB", (56, 56), (30, 30, 220))]


def _body(messages, images, **extra):
    return {"messages": chat_to_openai_messages(messages, images), "temperature": 0, "max_tokens": 12,
            "return_token_ids": True, **extra}


def _wait_for(cond, what, timeout=120.0):
    deadline = time.monotonic() + scaled(timeout)
    while not cond():
        assert time.monotonic() < deadline, \
            f"timed out after {scaled(timeout):.0f} s waiting for {what} (machine busy?)"
        time.sleep(0.02)


@pytest.mark.parametrize("field", ["structured_outputs", "guided_choice"])
def test_guided_choice_equals_the_builtin_engine_with_choices(ms, builtin, field):
    constraint = {"structured_outputs": {"choice": CHOICES}} if field == "structured_outputs" \
        else {"guided_choice": CHOICES}
    red, blue = _images()
    for messages, images in ((QUESTION, [red]), (QUESTION, [blue]), (TEXT_ONLY, [])):
        want = builtin(messages, images, CHOICES)
        free = builtin(messages, images)
        out = ms.chat_completion(_body(messages, images, n=2, **constraint))
        assert [c["message"]["content"] for c in out["choices"]] == [want.text] * 2
        assert out["choices"][0]["token_ids"] == want.ids
        assert out["choices"][0]["finish_reason"] == "stop" and want.text in CHOICES
        assert free.text not in CHOICES  # the random tiny model answers free text without the constraint
        assert ms.chat_completion(_body(messages, images))["choices"][0]["message"]["content"] == free.text


def test_sampled_and_streamed_answers_stay_in_the_choices(ms, builtin):
    red, _ = _images()
    out = ms.chat_completion(_body(QUESTION, [red], temperature=1.0, n=8, seed=5, guided_choice=CHOICES))
    texts = [c["message"]["content"] for c in out["choices"]]
    assert len(texts) == 8 and set(texts) <= set(CHOICES) and len(set(texts)) > 1
    body = _body(QUESTION, [red], structured_outputs={"choice": CHOICES}, stream=True)
    del body["return_token_ids"]
    chunks = list(ms.chat_completion_stream(body))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == builtin(QUESTION, [red], CHOICES).text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_only_requests_with_the_same_choices_share_a_batch(ms, builtin):
    red, blue = _images()
    other = ["cyan", "magenta"]
    jobs = [({"guided_choice": CHOICES}, red), ({"guided_choice": CHOICES}, blue),
            ({"structured_outputs": {"choice": other}}, red), ({}, blue)]
    want = [builtin(QUESTION, [img], c.get("guided_choice") or (c.get("structured_outputs") or {}).get("choice"))
            for c, img in jobs]
    results: list = [None] * len(jobs)

    def run(i):
        constraint, img = jobs[i]
        results[i] = ms.chat_completion(_body(QUESTION, [img], **constraint))["choices"][0]["message"]["content"]

    before = ms.stats()
    with ms.batcher.paused():
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        _wait_for(lambda: ms.stats()["pending"] == len(jobs), "the requests to be queued")
    for t in threads:
        t.join(120)
    assert results == [w.text for w in want]
    assert results[2] in other
    assert ms.stats()["generate_calls"] - before["generate_calls"] == 3  # CHOICES x2, other, free text


def test_a_reload_rebuilds_the_choice_engines(ms, builtin, tiny_ckpt):
    red, _ = _images()
    first = ms.chat_completion(_body(QUESTION, [red], guided_choice=CHOICES))["choices"][0]["message"]["content"]
    assert ms.batcher._choice_engines
    ms.load_checkpoint({"checkpoint": str(tiny_ckpt)})
    assert not ms.batcher._choice_engines  # tokenised with the old processor: dropped
    again = ms.chat_completion(_body(QUESTION, [red], guided_choice=CHOICES))["choices"][0]["message"]["content"]
    assert again == first == builtin(QUESTION, [red], CHOICES).text


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"guided_json": {"type": "object"}}, "guided_json: not supported by core.serve"),
    ({"guided_regex": "[a-z]+"}, "guided_regex: not supported"),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs.regex: not supported"),
    ({"structured_outputs": {"choice": ["red"], "json": {}}}, "structured_outputs.json: not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format: type 'json_object' is not supported"),
    ({"guided_choice": ["red"], "structured_outputs": {"choice": ["red"]}}, "not both"),
    ({"guided_choice": []}, "guided_choice: must be a non-empty list of strings"),
    ({"structured_outputs": {"choice": "red"}}, "structured_outputs.choice: must be a non-empty list of strings"),
    ({"guided_choice": [1, 2]}, "guided_choice.0"),
    ({"guided_choice": ["red", "a much longer answer than four tokens"], "max_tokens": 4},
     "tokens with its EOS, more than max_tokens=4"),
    ({"guided_choice": [str(i) for i in range(5)]}, "5 choices exceed this server's limit of 4 (--max-choices)"),
])
def test_unsupported_or_bad_constraints_are_refused(ms, extra, fragment):
    limits, ms.limits = ms.limits, ServerLimits(max_tokens=32, max_choices=4)
    try:
        with pytest.raises(RequestError) as info:
            ms.chat_completion(_body(TEXT_ONLY, [], **extra))
    finally:
        ms.limits = limits
    assert info.value.status == 400 and fragment in str(info.value)


def test_a_text_response_format_is_plain_decoding(ms, builtin):
    out = ms.chat_completion(_body(TEXT_ONLY, [], response_format={"type": "text"}))
    assert out["choices"][0]["message"]["content"] == builtin(TEXT_ONLY, []).text


# ---- end to end: the quickstart checkpoint, served -------------------------------------------------
def test_quickstart_checkpoint_served_with_choices_scores_what_the_builtin_engine_scores(tmp_path):
    """The README's ``core.evaluate --rollout openai_server rollout.options.base_url=...`` on the quickstart config."""
    try:
        PluginHost(PLUGINS + ",xllm").registry.get("rollouts", "openai_server")
    except Exception as exc:
        pytest.skip(f"needs the openai_server rollout engine (vlmr1-plugin-xllm): {exc}")
    from core.evaluate import main as evaluate
    from core.serving import ServerProcess
    from core.train import main as train

    plugins = PLUGINS
    config = str(Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "config.yaml")
    run = tmp_path / "quickstart"
    # A shortened quickstart (60 of 200 steps): training reward reaches 1.0 by step ~50.
    assert train(["--config", config, "--plugins", plugins, "train.max_steps=60", "train.warmup_steps=5",
                  "eval.enabled=false", f"logging.output_dir={run}"]) == 0
    ckpt = run / "checkpoint-60"
    common = ["--config", config, "--checkpoint", str(ckpt), "--quiet"]
    assert evaluate([*common, "--out", str(tmp_path / "local"), "--plugins", plugins]) == 0
    with ServerProcess(ckpt, ["--plugins", "qwen-vl"], startup_timeout=scaled(300)) as srv:
        assert evaluate([*common, "--out", str(tmp_path / "served"), "--plugins", plugins + ",xllm",
                         "--rollout", "openai_server", f"rollout.options.base_url={srv.url}",
                         "rollout.options.max_retries=0"]) == 0

    def read(name):
        rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        return [r["completion"] for r in rows], summary["datasets"]["synthetic_color"]["exact_match"]

    (local, local_acc), (served, served_acc) = read("local"), read("served")
    assert len(served) == 64 and set(served) <= {"red", "green", "blue", "yellow"}
    assert served == local and served_acc == local_acc
    assert served_acc["accuracy"] >= 0.9  # measured 1.00 (the 200-step quickstart: 1.00 too)
