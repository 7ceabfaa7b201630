"""Tests of the ``vllm`` rollout engine that need neither vLLM nor a GPU.

vLLM is replaced by a fake module (``sys.modules["vllm"]``) that records the calls the engine
makes (sleep / wake / weight loading / generate), and TRL's ``VLLMClient`` by a recording
stand-in; the request building, answer conversion, PEFT weight naming and option checks are
exercised for real. The one test that drives real vLLM skips where vllm or a GPU is absent.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from vlmr1_vllm import VLLMRollout
from vlmr1_vllm.engine import (
    completion_from_vllm,
    named_weights,
    server_messages,
    vllm_inputs,
    vllm_sampling_kwargs,
)

from core.interfaces import (
    Completion,
    PromptInput,
    RolloutContext,
    SamplingParams,
    build_tiny_tokenizer,
    eos_token_ids,
)
from core.plugins import PluginHost

CUDA = types.SimpleNamespace(type="cuda", index=0)  # the engine only reads .type


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(["<|endoftext|>", "<|im_end|>"], eos_token="<|im_end|>", pad_token="<|endoftext|>")


class TinyPolicy(torch.nn.Module):
    """A small module with HF-like attributes (name_or_path, save via state dict)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3, 2)
        self.head = torch.nn.Linear(2, 4, bias=False)
        self.name_or_path = "/ckpt/tiny"


def prompt(n_images: int = 1, text: str = "<prompt>") -> PromptInput:
    imgs = [Image.new("RGB", (8 + i, 8), (i * 50, 0, 0)) for i in range(n_images)]
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": "colour?"}]
    return PromptInput([{"role": "user", "content": content}], text, imgs)


# ---- without vllm ------------------------------------------------------------------------------
def test_missing_vllm_names_the_extra(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "vllm", None)
    eng = VLLMRollout()
    with pytest.raises(ImportError, match=r"pip install 'vlmr1-plugin-vllm\[vllm\]'"):
        eng.setup(RolloutContext(model=TinyPolicy(), processor=tok, family=None, device=CUDA))


def test_registered_without_importing_vllm():
    before = sys.modules.get("vllm")
    host = PluginHost("vllm")
    entry = host.registry.resolve("rollouts", "vllm")
    assert entry.cls is VLLMRollout and entry.provider == "vlmr1-plugin-vllm"
    assert sys.modules.get("vllm") is before  # listing/registering the plugin imported nothing


@pytest.mark.parametrize(("opts", "fragment"), [
    ({"mode": "server"}, "mode 'server' needs base_url"),
    ({"base_url": "http://h:8000"}, "base_url is only used in mode 'server'"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size 1"),
    ({"mode": "server", "base_url": "h:8000"}, "must start with http://"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"sleep_level": 3}, "sleep_level"),
    ({"gpu_mem": 0.5}, "gpu_mem"),
])
def test_options_validated(opts, fragment):
    with pytest.raises(ValidationError, match=fragment):
        VLLMRollout.from_options(opts)


def test_sampling_kwargs():
    s = SamplingParams(n=4, max_new_tokens=32, temperature=0.9, top_p=0.95, top_k=20, repetition_penalty=1.05)
    assert vllm_sampling_kwargs(s, [7, 3], extra={"min_p": 0.1}) == {
        "n": 4, "max_tokens": 32, "temperature": 0.9, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05,
        "logprobs": 0, "logit_bias": {7: -100.0, 3: -100.0}, "min_p": 0.1}
    greedy = SamplingParams(n=1, max_new_tokens=8, do_sample=False, temperature=0.7, top_k=5)
    assert vllm_sampling_kwargs(greedy, logprobs=False) == {
        "n": 1, "max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}


def test_inputs_and_server_messages():
    p = prompt(2, text="<|vision_start|><|image_pad|><|vision_end|>x")
    assert vllm_inputs([p, PromptInput([], "text only")]) == [
        {"prompt": p.text, "multi_modal_data": {"image": p.images}}, {"prompt": "text only"}]
    msgs = server_messages(p)
    assert msgs[0]["content"][:2] == [{"type": "image", "image": p.images[0]}, {"type": "image", "image": p.images[1]}]
    assert p.messages[0]["content"][0] == {"type": "image"}  # the prompt itself is untouched
    with pytest.raises(ValueError, match="more image placeholders than its 1 image"):
        server_messages(PromptInput(p.messages, p.text, p.images[:1]))
    with pytest.raises(ValueError, match="3 image\\(s\\) but 2 image placeholder"):
        server_messages(PromptInput(p.messages, p.text, [*p.images, p.images[0]]))


def _out(ids, finish, stop_reason=None, logprobs=None, text="t"):
    return types.SimpleNamespace(token_ids=ids, finish_reason=finish, stop_reason=stop_reason, text=text,
                                 logprobs=logprobs)


def test_completion_from_vllm():
    eos = {1, 0}
    lp = [{5: types.SimpleNamespace(logprob=-0.5)}, {1: types.SimpleNamespace(logprob=-0.25)}]
    assert completion_from_vllm(_out([5, 1], "stop", logprobs=lp), eos, 1) == Completion(
        [5, 1], "t", False, [-0.5, -0.25])
    assert completion_from_vllm(_out([5, 6], "length"), eos, 1) == Completion([5, 6], "t", True)
    assert completion_from_vllm(_out([5], "stop"), eos, 1) == Completion([5, 1], "t", False)  # EOS not reported
    assert completion_from_vllm(_out([5], "stop", stop_reason="###"), eos, 1) == Completion([5], "t", False)


def test_named_weights_plain_and_peft():
    from peft import LoraConfig, get_peft_model

    plain = TinyPolicy()
    base = {n: p.detach().clone() for n, p in plain.named_parameters()}
    assert [n for n, _ in named_weights(plain)] == ["proj.weight", "proj.bias", "head.weight"]

    lora = get_peft_model(TinyPolicy(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                                   init_lora_weights=False))
    layer = lora.base_model.model.proj
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    merged = base["proj.weight"] + (4 / 2) * b @ a  # W + (alpha / r) B A
    got = {n: t.clone() for n, t in named_weights(lora)}
    assert list(got) == ["proj.weight", "proj.bias", "head.weight"]
    torch.testing.assert_close(got["proj.weight"], merged)
    torch.testing.assert_close(got["head.weight"], base["head.weight"])
    torch.testing.assert_close(layer.base_layer.weight, base["proj.weight"])  # unmerged again afterwards


# ---- colocate orchestration with a fake vllm ------------------------------------------------------
def make_fake_vllm(calls: list, eos_id: int):
    class FakeSamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class FakeLLM:
        def __init__(self, **kw):
            calls.append(("LLM", kw))
            runner = types.SimpleNamespace(load_weights=lambda items: calls.extend(("load", n) for n, _ in items))
            # vLLM 0.32: the encoder-cache reset lives on the engine (LLM has none), the mm-cache reset on LLM.
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=runner))),
                reset_encoder_cache=lambda: calls.append(("reset_encoder",)))

        def reset_mm_cache(self):
            calls.append(("reset_mm",))

        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self, tags):
            calls.append(("wake", tuple(tags)))

        def reset_prefix_cache(self):
            calls.append(("reset",))

        def generate(self, inputs, sampling_params, use_tqdm):
            assert len(sampling_params) == len(inputs)  # one SamplingParams per prompt (own seed)
            n = sampling_params[0].kw["n"]
            calls.append(("generate", len(inputs), n))
            calls.append(("seeds", [sp.kw.get("seed") for sp in sampling_params]))
            return [types.SimpleNamespace(outputs=[_out([10 + j, eos_id], "stop", text=f"p{i}c{j}") for j in range(n)])
                    for i in range(len(inputs))]

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod._fake = FakeLLM, FakeSamplingParams, True
    return mod


def run_colocate(monkeypatch, tok, **opts):
    calls: list = []
    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm(calls, tok.eos_token_id))
    policy = TinyPolicy()
    eng = VLLMRollout.from_options(opts)
    eng.setup(RolloutContext(model=policy, processor=tok, family=None, device=CUDA, suppressed_token_ids=[9]))
    seeded = prompt(2)
    seeded.seed = 42
    out1 = eng.generate([prompt(), seeded], SamplingParams(n=2, max_new_tokens=4))
    eng.sync_weights(policy)
    eng.generate([prompt()], SamplingParams(n=1, max_new_tokens=4))
    return calls, out1


LOADS = [("load", "proj.weight"), ("load", "proj.bias"), ("load", "head.weight"), ("reset",), ("reset_encoder",),
         ("reset_mm",)]


def test_colocate_sleep_level_2_repushes_weights_every_rollout(monkeypatch, tok):
    calls, out1 = run_colocate(monkeypatch, tok)
    init = calls[0]
    assert init[0] == "LLM" and init[1]["model"] == "/ckpt/tiny" and init[1]["enable_sleep_mode"] is True
    assert init[1]["distributed_executor_backend"] == "external_launcher"
    assert init[1]["limit_mm_per_prompt"] == {"image": 4} and init[1]["gpu_memory_utilization"] == 0.3
    rollout = [("wake", ("weights",)), *LOADS, ("wake", ("kv_cache",))]
    assert calls[1:] == [("sleep", 2), *rollout, ("generate", 2, 2), ("seeds", [None, 42]), ("sleep", 2),
                         *rollout, ("generate", 1, 1), ("seeds", [None]), ("sleep", 2)]
    # The text is the tokenizer's decode of the ids (as the built-in engine's), not vLLM's detokenizer output.
    t10, t11 = (tok.decode([i, tok.eos_token_id], skip_special_tokens=True) for i in (10, 11))
    assert [[(c.ids, c.text, c.truncated) for c in g] for g in out1] == [
        [([10, tok.eos_token_id], t10, False), ([11, tok.eos_token_id], t11, False)]] * 2


def test_colocate_sleep_level_1_keeps_weights_until_sync(monkeypatch, tok):
    calls, _ = run_colocate(monkeypatch, tok, sleep_level=1)
    gen1, gen2 = [("generate", 2, 2), ("seeds", [None, 42])], [("generate", 1, 1), ("seeds", [None])]
    assert calls[1:] == [("sleep", 1),
                         ("wake", ("weights",)), ("wake", ("kv_cache",)), *gen1, ("sleep", 1),
                         ("wake", ("weights",)), *LOADS, ("wake", ("kv_cache",)), *gen2, ("sleep", 1)]


def test_colocate_without_sleep(monkeypatch, tok):
    calls, _ = run_colocate(monkeypatch, tok, enable_sleep_mode=False)
    assert calls[1:] == [("generate", 2, 2), ("seeds", [None, 42]), *LOADS, ("generate", 1, 1), ("seeds", [None])]


def test_colocate_on_cpu_with_a_gpu_build_names_the_option(monkeypatch, tok):
    from core.interfaces import RolloutSetupError

    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm([], 1))
    monkeypatch.setattr(VLLMRollout, "_vllm_device_type", lambda self: "cuda")
    with pytest.raises(RolloutSetupError, match=r"rollout.options.mode: colocate .* uses cpu, but the installed "
                                                r"vLLM is a cuda build") as info:
        VLLMRollout().setup(RolloutContext(model=TinyPolicy(), processor=tok, family=None,
                                           device=torch.device("cpu")))
    from core.cli import exit_code

    assert exit_code(info.value) == 2  # bad input: one error line, no traceback


def test_colocate_on_vllms_cpu_build(monkeypatch, tok, capsys, tmp_path):
    # vLLM's CPU build: sleep mode off with a note, KV cache and thread binding set, no per-prompt seeds
    # (send_seed false), rollouts in the trainer's dtype, weights synced by vLLM's reload_weights from memory,
    # then the prefix, encoder and multimodal caches reset; the trainer keeps its torch thread count and a
    # working torch.set_num_threads after vLLM's start.

    calls: list = []
    fake = make_fake_vllm(calls, tok.eos_token_id)
    reloaded: dict = {}

    def collective_rpc(self, method, kwargs):
        # From memory: a weights_path would repoint vLLM's model config (and its processor) at that folder.
        assert "weights_path" not in kwargs and kwargs["is_checkpoint_format"] is True
        calls.append(("rpc", method))
        reloaded.update({n: t.clone() for n, t in kwargs["weights_iterator"]})

    fake.LLM.collective_rpc = collective_rpc
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(VLLMRollout, "_vllm_device_type", lambda self: "cpu")
    for var in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    real_llm = fake.LLM.__init__

    def init(self, **kw):  # vLLM's CPU worker changes torch's thread count, then makes set_num_threads a no-op
        torch.set_num_threads(threads + 1)
        torch.set_num_threads = lambda n: None
        real_llm(self, **kw)

    fake.LLM.__init__ = init
    policy = TinyPolicy()
    eng = VLLMRollout.from_options({"send_seed": False, "cpu_kvcache_space_gib": 2, "cpu_omp_threads_bind": "0-1"})
    real_set = torch.set_num_threads
    try:
        eng.setup(RolloutContext(model=policy, processor=tok, family=None, device=torch.device("cpu")))
        assert torch.set_num_threads is real_set, "vLLM's no-op set_num_threads left in place"
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads = real_set
        torch.set_num_threads(threads)
    assert "enable_sleep_mode: vLLM's CPU build has no sleep mode" in capsys.readouterr().err
    assert calls[0][1]["enable_sleep_mode"] is False and calls[0][1]["logprobs_mode"] == "processed_logprobs"
    assert calls[0][1]["dtype"] == "float32"  # the trainer's precision, not the CPU build's bfloat16 for "auto"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2" and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    seeded = prompt()
    seeded.seed = 42
    eng.generate([seeded], SamplingParams(n=2, max_new_tokens=4))
    with torch.no_grad():
        policy.head.weight.add_(1.0)
    eng.sync_weights(policy)
    eng.generate([seeded], SamplingParams(n=2, max_new_tokens=4))
    assert calls[1:] == [("generate", 1, 2), ("seeds", [None]), ("rpc", "reload_weights"), ("reset",),
                         ("reset_encoder",), ("reset_mm",), ("generate", 1, 2), ("seeds", [None])]
    torch.testing.assert_close(reloaded["head.weight"], policy.head.weight.detach())
    assert "rollout/weight_sync_s" in eng.metrics()


def test_send_seed_false_is_accepted_in_colocate_but_not_with_server_api_trl():
    assert VLLMRollout.from_options({"send_seed": False}).options.send_seed is False
    with pytest.raises(ValidationError, match="send_seed"):
        VLLMRollout.from_options({"mode": "server", "base_url": "http://h:1", "send_seed": False})


def test_appended_eos_gets_a_nan_logprob():
    lp = [{5: types.SimpleNamespace(logprob=-0.5)}]
    c = completion_from_vllm(_out([5], "stop", logprobs=lp), {1}, 1)
    assert c.ids == [5, 1] and c.logprobs[0] == -0.5 and math.isnan(c.logprobs[1])


# ---- server mode with a recording client ------------------------------------------------------------
class FakeClient:
    def __init__(self, eos_id):
        self.calls, self.eos_id = [], eos_id

    def init_communicator(self, device):
        self.calls.append(("init_communicator", device))

    def chat(self, messages, **kw):
        self.calls.append(("chat", messages, kw))
        n = kw["n"]
        ids = [[20 + j, self.eos_id] if j % 2 == 0 else [30, 31, 32] for _ in messages for j in range(n)]
        lps = [[[-0.1 * (k + 1)] for k in range(len(x))] for x in ids]
        return {"prompt_ids": [[1]] * len(messages), "completion_ids": ids, "logprobs": lps}

    def update_named_params(self, metadata, params):
        self.calls.append(("update", metadata, [n for n, _ in params]))

    def reset_prefix_cache(self):
        self.calls.append(("reset",))


def test_server_mode_chat_and_weight_sync(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm([], tok.eos_token_id))
    client = FakeClient(tok.eos_token_id)
    monkeypatch.setattr(VLLMRollout, "_make_client", lambda self: client)
    eng = VLLMRollout.from_options({"mode": "server", "base_url": "http://10.0.0.2:8000"})
    policy = TinyPolicy()
    eng.setup(RolloutContext(model=policy, processor=tok, family=None, device=CUDA, suppressed_token_ids=[9]))
    assert client.calls == [("init_communicator", CUDA)]
    p1, p2 = prompt(), prompt(2)
    out = eng.generate([p1, p2], SamplingParams(n=2, max_new_tokens=3, temperature=0.8))
    _, messages, kw = client.calls[1]
    assert messages == [server_messages(p1), server_messages(p2)]
    assert kw == {"n": 2, "max_tokens": 3, "temperature": 0.8, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
                  "logprobs": 0, "generation_kwargs": {"logit_bias": {9: -100.0}}}
    eos = tok.eos_token_id
    assert [[(c.ids, c.truncated) for c in g] for g in out] == [[([20, eos], False), ([30, 31, 32], True)]] * 2
    assert out[0][1].text == tok.decode([30, 31, 32], skip_special_tokens=True)
    assert out[0][1].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    eng.sync_weights(policy)
    assert client.calls[2:] == [
        ("update", [("proj.weight", "float32", [2, 3]), ("proj.bias", "float32", [2]),
                    ("head.weight", "float32", [4, 2])], ["proj.weight", "proj.bias", "head.weight"]),
        ("reset",)]


# ---- real vLLM (GPU machines with the [vllm] extra) -------------------------------------------------
@pytest.mark.gpu
def test_real_vllm_colocate_on_gpu(tmp_path):
    vllm = pytest.importorskip("vllm", reason="needs vllm (pip install 'vlmr1-plugin-vllm[vllm]')")
    if getattr(vllm, "_fake", False):
        pytest.skip("a fake vllm is loaded")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    try:
        fam_cls = PluginHost("qwen-vl").registry.get("models", "qwen2_5_vl")
    except Exception as exc:
        pytest.skip(f"needs the qwen2_5_vl model family: {exc}")
    fam = fam_cls()
    ckpt = fam_cls.build_tiny_checkpoint(tmp_path / "tiny")
    model = fam.load_model(ckpt, dtype=torch.bfloat16).to("cuda")
    proc = fam.load_processor(ckpt)
    eng = VLLMRollout.from_options({"gpu_memory_utilization": 0.2, "enforce_eager": True})
    eng.setup(RolloutContext(model=model, processor=proc, family=fam, device=torch.device("cuda", 0),
                             suppressed_token_ids=fam.suppressed_token_ids(proc, model)))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    p = PromptInput(msgs, fam.render_prompt(proc, msgs), [Image.new("RGB", (56, 56), (255, 0, 0))])
    greedy = SamplingParams(n=2, max_new_tokens=8, do_sample=False)
    first = eng.generate([p], greedy)
    assert len(first) == 1 and len(first[0]) == 2 and first[0][0].ids == first[0][1].ids
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)
    eng.sync_weights(model)
    assert eng.generate([p], greedy)[0][0].ids != first[0][0].ids


# ---- server_api "vllm" against a stand-in HTTP server on 127.0.0.1 --------------------------------
class _StubVLLM:
    """A real HTTP server with the routes of `vllm serve` (dev mode) the engine uses; records requests.

    Answers are shaped like vLLM 0.32's (checked against the real server in test_vllm_cpu_server.py).
    """

    def __init__(self, eos: int):
        import http.server
        import threading

        self.requests: list[tuple[str, dict | None]] = []
        stub = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj, code=200):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send({"data": [{"id": "/ckpt/tiny"}]})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                stub.requests.append((self.path, body))
                if self.path == "/v1/chat/completions":
                    choices = [{"index": j, "message": {"role": "assistant", "content": "x"},
                                "token_ids": [20 + j, eos] if j % 2 == 0 else [30, 31, 32],
                                "finish_reason": "stop" if j % 2 == 0 else "length", "stop_reason": None,
                                "logprobs": {"content": [{"token": "t", "logprob": -0.5}]}} for j in range(body["n"])]
                    self._send({"id": "c", "choices": choices, "prompt_token_ids": [1, 2]})
                elif self.path == "/collective_rpc":
                    self._send({"results": [None]})
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_api_vllm_over_http(monkeypatch, tok, tmp_path):
    from safetensors.torch import load_file

    monkeypatch.setitem(sys.modules, "vllm", None)  # the training process needs no vllm for this API
    stub = _StubVLLM(tok.eos_token_id)
    try:
        eng = VLLMRollout.from_options({"mode": "server", "base_url": stub.url, "server_api": "vllm",
                                        "weight_sync_dir": str(tmp_path / "sync"), "choices": ["red", "blue"],
                                        "choices_via": "structured_outputs"})
        policy = TinyPolicy()
        eng.setup(RolloutContext(model=policy, processor=tok, family=None, device=torch.device("cpu"),
                                 suppressed_token_ids=[9]))
        # setup pushes the policy: a running server may still hold an earlier run's weights.
        assert [r for r, _ in stub.requests if r != "/v1/models"][:3] == [
            "/collective_rpc", "/reset_prefix_cache", "/reset_encoder_cache"]
        p1, p2 = prompt(), prompt(2)
        p1.seed = 7
        out = eng.generate([p1, p2], SamplingParams(n=2, max_new_tokens=3, temperature=0.8))
        eos = tok.eos_token_id
        assert [[(c.ids, c.truncated) for c in g] for g in out] == [[([20, eos], False), ([30, 31, 32], True)]] * 2
        assert out[0][1].text == tok.decode([30, 31, 32], skip_special_tokens=True)
        lp = out[0][0].logprobs  # one per id: the EOS the engine appended has none (NaN)
        assert lp[0] == -0.5 and math.isnan(lp[1])
        bodies = [b for r, b in stub.requests if r == "/v1/chat/completions"]
        b1 = next(b for b in bodies if b.get("seed") == 7)
        assert b1["model"] == "/ckpt/tiny" and b1["n"] == 2 and b1["max_tokens"] == 3 and b1["temperature"] == 0.8
        assert b1["return_token_ids"] is True and b1["logprobs"] is True and b1["logit_bias"] == {"9": -100.0}
        assert b1["structured_outputs"] == {"choice": ["red", "blue"]}
        parts = b1["messages"][0]["content"]
        assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert parts[1] == {"type": "text", "text": "colour?"}
        assert sum(p["type"] == "image_url" for b in bodies for p in b["messages"][0]["content"]) == 3
        stub.requests.clear()
        eng.sync_weights(policy)
        assert [r for r, _ in stub.requests] == ["/collective_rpc", "/reset_prefix_cache", "/reset_encoder_cache"]
        assert stub.requests[0][1] == {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "sync")}}
        saved = load_file(str(tmp_path / "sync/model.safetensors"))
        assert set(saved) == {"proj.weight", "proj.bias", "head.weight"}
        assert torch.equal(saved["head.weight"], policy.head.weight)
        assert eng.metrics()["rollout/weight_sync_mib"] > 0
    finally:
        stub.close()


def test_server_api_vllm_options():
    with pytest.raises(ValidationError, match="choices: only used with mode 'colocate' or server_api 'vllm'"):
        VLLMRollout.from_options({"mode": "server", "base_url": "http://h:1", "choices": ["a"]})
    assert VLLMRollout.from_options({"choices": ["a"]}).options.choices_via == "token_ids"
    with pytest.raises(ValidationError, match="weight_sync_dir"):
        VLLMRollout.from_options({"mode": "server", "base_url": "http://h:1", "weight_sync_dir": "/x"})
    eng = VLLMRollout.from_options({"mode": "server", "base_url": "http://127.0.0.1:9", "server_api": "vllm",
                                    "server_timeout_s": 1})
    with pytest.raises(ConnectionError, match="not ready after 1 s"):
        eng.setup(RolloutContext(model=TinyPolicy(), processor=None, family=None, device=torch.device("cpu")))


def test_choices_as_token_ids_over_http(monkeypatch, tok):
    # choices_via token_ids (default): the request carries the canonical token sequences for the plugin's
    # logits processor (vllm_xargs) and the EOS ids as stop tokens, not vLLM's text-level guided choice; a
    # server that ignores them (the stub answers other ids) is an error naming the flag, not a silent success.
    monkeypatch.setitem(sys.modules, "vllm", None)
    stub = _StubVLLM(tok.eos_token_id)
    try:
        eng = VLLMRollout.from_options({"mode": "server", "base_url": stub.url, "server_api": "vllm",
                                        "choices": ["red", "blue"]})
        eng.setup(RolloutContext(model=TinyPolicy(), processor=tok, family=None, device=torch.device("cpu")))
        with pytest.raises(RuntimeError, match="none of the choices' token sequences .* --logits-processors "
                                               "vlmr1_vllm.logits:ChoiceLogitsProcessor"):
            eng.generate([prompt()], SamplingParams(n=2, max_new_tokens=8))
        body = next(b for r, b in stub.requests if r == "/v1/chat/completions")
        eos = min(eos_token_ids(TinyPolicy(), tok))  # the built-in engine's choice terminator
        want = [tok.encode(c, add_special_tokens=False) + [eos] for c in ("red", "blue")]
        assert json.loads(body["vllm_xargs"]["vlmr1_choice_ids"]) == want
        assert "structured_outputs" not in body and tok.eos_token_id in body["stop_token_ids"]
        longest = max(len(w) for w in want)
        with pytest.raises(ValueError, match=f"is {longest} tokens with its EOS, more than the {longest - 1} new"):
            eng.generate([prompt()], SamplingParams(n=2, max_new_tokens=longest - 1))
    finally:
        stub.close()


def test_choice_sequences_and_trie(tok):
    from vlmr1_vllm.choices import build_trie, choice_sequences, encode_sequences, is_choice

    seqs = choice_sequences(["red", "blue"], tok, {tok.eos_token_id, 5000})
    assert seqs == [tok.encode(c, add_special_tokens=False) + [tok.eos_token_id] for c in ("red", "blue")]
    assert json.loads(encode_sequences(seqs)) == seqs
    trie = build_trie([[1, 2, 9], [1, 3, 9], [4, 9]])
    assert trie == {(): [1, 4], (1,): [2, 3], (1, 2): [9], (1, 3): [9], (4,): [9]}
    assert is_choice([1, 3, 9], [[1, 2, 9], [1, 3, 9]]) and not is_choice([1, 3], [[1, 3, 9]])
