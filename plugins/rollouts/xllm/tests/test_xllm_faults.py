"""The ``openai_server`` engine against small stdlib HTTP servers on 127.0.0.1.

Servers that are down, slow, return garbage, fail once, refuse ``n`` or ignore it: each must
end in a clear error or a successful retry, never a hang (every test is bounded).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from pydantic import ValidationError
from vlmr1_xllm import OpenAIServerRollout, ServerError
from vlmr1_xllm.engine import RequestRejected

from core.interfaces import PromptInput, RolloutContext, SamplingParams, build_tiny_tokenizer
from core.plugins import PluginHost

GREEDY = SamplingParams(n=1, max_new_tokens=8, do_sample=False)


def ok_answer(n: int = 1, text: str = "red", finish: str = "stop", token_ids=None) -> dict:
    choices = []
    for i in range(n):
        c = {"index": i, "message": {"role": "assistant", "content": f"{text}{i}" if n > 1 else text},
             "finish_reason": finish}
        if token_ids is not None:
            c["token_ids"] = token_ids
        choices.append(c)
    return {"id": "x", "object": "chat.completion", "choices": choices}


@contextmanager
def fake_server(respond):
    """A threaded HTTP server; ``respond(method, path, body, hit_no, headers)`` -> ``(status, payload, headers)``."""
    hits: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            with lock:
                hits.append({"method": self.command, "path": self.path, "body": body,
                             "headers": dict(self.headers)})
                no = len(hits)
            status, payload, headers = respond(self.command, self.path, body, no)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        do_GET = do_POST = _handle  # noqa: N815

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def engine(url: str, **opts) -> OpenAIServerRollout:
    opts = {"base_url": url + "/v1", "model": "m", "max_retries": 2, "backoff_s": 0.01, "timeout_s": 5.0,
            "connect_timeout_s": 2.0, **opts}
    return OpenAIServerRollout.from_options(opts)


def prompt(n_images: int = 1) -> PromptInput:
    imgs = [Image.new("RGB", (20 + 8 * i, 16), (40 * i, 200, 10)) for i in range(n_images)]
    content = [{"type": "text", "text": "Look:"}] + [{"type": "image"}] * n_images + [
        {"type": "text", "text": "colour?"}]
    return PromptInput(messages=[{"role": "user", "content": content}], text="(rendered)", images=imgs)


def chat_only(answer):
    """respond() that answers chat requests with ``answer(body, hit_no)`` and /health with ok."""

    def respond(method, path, body, no):
        if path == "/health":
            return 200, {"status": "ok"}, None
        return answer(body, no)

    return respond


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(["<|endoftext|>", "<|im_end|>"], eos_token="<|im_end|>", pad_token="<|endoftext|>")


# ---- faults ------------------------------------------------------------------------------------
def test_server_down_names_url_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = engine(f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=rf"server at http://127\.0\.0\.1:{port}/v1/chat/completions failed after "
                                          r"3 attempt\(s\): connection failed \(ConnectError"):
        eng.generate([prompt()], GREEDY)
    assert time.monotonic() - t0 < 5
    assert eng.stats["requests"] == 3 and eng.stats["retries"] == 2


def test_slow_server_times_out_without_hanging():
    def slow(body, no):
        time.sleep(3)
        return 200, ok_answer(), None

    with fake_server(chat_only(slow)) as (url, hits):
        eng = engine(url, timeout_s=0.3, max_retries=1)
        t0 = time.monotonic()
        with pytest.raises(ServerError, match=r"failed after 2 attempt\(s\): timed out \(ReadTimeout; timeout_s=0.3"):
            eng.generate([prompt()], GREEDY)
        assert time.monotonic() - t0 < 2.5
        assert len(hits) == 2


@pytest.mark.parametrize(("payload", "why"), [
    (b"<html>502 Bad Gateway</html>", "answer is not JSON: '<html>502 Bad Gateway</html>'"),
    ({"object": "error"}, "unexpected answer (no 'choices' list)"),
    ({"choices": []}, "unexpected answer (empty 'choices')"),
    ({"choices": [{"text": "completions-style"}]}, "unexpected answer (a choice has no 'message')"),
])
def test_garbage_is_retried_then_reported(payload, why):
    with fake_server(chat_only(lambda body, no: (200, payload, None))) as (url, hits):
        eng = engine(url, max_retries=2)
        with pytest.raises(ServerError, match=r"failed after 3 attempt\(s\): ") as info:
            eng.generate([prompt()], GREEDY)
        assert why in str(info.value)
        assert url in str(info.value)
        assert len(hits) == 3


def test_transient_5xx_is_retried_then_succeeds(tok):
    def flaky(body, no):
        if no == 1:
            return 500, {"error": {"message": "CUDA out of memory"}}, None
        if no == 2:
            return 503, b"busy", {"Retry-After": "0.05"}
        return 200, ok_answer(text="blue", token_ids=[5, 6, 1]), None

    with fake_server(chat_only(flaky)) as (url, hits):
        eng = engine(url, max_retries=3)
        eng.setup(RolloutContext(model=None, processor=tok, family=None, device=None))
        out = eng.generate([prompt()], GREEDY)
    assert [[(c.ids, c.text, c.truncated) for c in g] for g in out] == [[([5, 6, 1], "blue", False)]]
    assert len(hits) == 3 and eng.stats["retries"] == 2


def test_client_error_is_not_retried():
    with fake_server(chat_only(lambda b, n: (400, {"error": {"message": "image too large"}}, None))) as (url, hits):
        eng = engine(url, max_retries=3)
        with pytest.raises(RequestRejected, match=rf"server at {url}/v1/chat/completions rejected the request: "
                                                  r"HTTP 400: image too large"):
            eng.generate([prompt()], GREEDY)
        assert len(hits) == 1


# ---- n -----------------------------------------------------------------------------------------
def test_server_ignoring_n_is_topped_up():
    with fake_server(chat_only(lambda body, no: (200, ok_answer(1, text=f"a{no}"), None))) as (url, hits):
        eng = engine(url)
        out = eng.generate([prompt()], SamplingParams(n=3, max_new_tokens=4))
        assert [c.text for c in out[0]] == ["a1", "a2", "a3"]
        assert [h["body"]["n"] for h in hits] == [3, 1, 1]
        assert eng.stats["n_fallbacks"] == 1
        # Learnt: later calls send one request per completion, concurrently.
        out = eng.generate([prompt(), prompt(2)], SamplingParams(n=2, max_new_tokens=4))
        assert [len(g) for g in out] == [2, 2]
        assert [h["body"]["n"] for h in hits[3:]] == [1, 1, 1, 1]


def test_server_refusing_n_falls_back():
    def refuse(body, no):
        if body["n"] > 1:
            return 400, {"error": {"message": "n > 1 is not supported"}}, None
        return 200, ok_answer(1, text=f"b{no}"), None

    with fake_server(chat_only(refuse)) as (url, hits):
        out = engine(url).generate([prompt()], SamplingParams(n=2, max_new_tokens=4))
        assert [c.text for c in out[0]] == ["b2", "b3"]
        assert [h["body"]["n"] for h in hits] == [2, 1, 1]
        with pytest.raises(RequestRejected, match="n > 1 is not supported"):
            engine(url, use_n="always").generate([prompt()], SamplingParams(n=2, max_new_tokens=4))


def test_n_supported_uses_one_request_per_prompt():
    with fake_server(chat_only(lambda body, no: (200, ok_answer(body["n"]), None))) as (url, hits):
        out = engine(url).generate([prompt(), prompt(2), prompt(3)], SamplingParams(n=4, max_new_tokens=4))
        assert [[c.text for c in g] for g in out] == [["red0", "red1", "red2", "red3"]] * 3
        assert sorted(h["body"]["n"] for h in hits) == [4, 4, 4]


def test_prompt_seeds_are_sent():
    with fake_server(chat_only(lambda body, no: (200, ok_answer(body["n"]), None))) as (url, hits):
        seeded = prompt()
        seeded.seed = 5
        engine(url).generate([seeded, prompt()], SamplingParams(n=3, max_new_tokens=4))
        assert sorted((h["body"].get("seed", -1), h["body"]["n"]) for h in hits) == [(-1, 3), (5, 3)]
        hits.clear()
        engine(url, use_n="never").generate([seeded], SamplingParams(n=3, max_new_tokens=4))
        assert sorted(h["body"]["seed"] for h in hits) == [5, 6, 7]  # distinct seeds for single requests
        hits.clear()
        engine(url, send_seed=False).generate([seeded], SamplingParams(n=2, max_new_tokens=4))
        assert "seed" not in hits[0]["body"]


def test_requests_run_concurrently():
    def slowish(body, no):
        time.sleep(0.4)
        return 200, ok_answer(), None

    with fake_server(chat_only(slowish)) as (url, hits):
        t0 = time.monotonic()
        out = engine(url, concurrency=8).generate([prompt() for _ in range(8)], GREEDY)
        elapsed = time.monotonic() - t0
    assert len(out) == 8 and len(hits) == 8
    assert elapsed < 1.6, f"8 requests of 0.4 s took {elapsed:.2f} s: not concurrent"


# ---- request building and answers ---------------------------------------------------------------
def test_request_body_and_model_discovery():
    def respond(method, path, body, no):
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "served-model", "object": "model"}]}, None
        return 200, ok_answer(body["n"]), None

    with fake_server(respond) as (url, hits):
        eng = engine(url, model=None, extra_body={"min_p": 0.05})
        p = prompt(2)
        eng.generate([p], SamplingParams(n=2, max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=5,
                                         repetition_penalty=1.1))
        eng.generate([p], GREEDY)
    assert [(h["method"], h["path"]) for h in hits] == [
        ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/chat/completions")]
    sampled, greedy = hits[1]["body"], hits[2]["body"]
    assert {k: v for k, v in sampled.items() if k != "messages"} == {
        "model": "served-model", "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "n": 2,
        "repetition_penalty": 1.1, "return_token_ids": True, "min_p": 0.05}
    assert {k: v for k, v in greedy.items() if k != "messages"} == {
        "model": "served-model", "max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "n": 1,
        "return_token_ids": True, "min_p": 0.05}
    parts = sampled["messages"][0]["content"]
    assert [q["type"] for q in parts] == ["text", "image_url", "image_url", "text"]
    for q, img in zip([parts[1], parts[2]], p.images, strict=True):
        header, b64 = q["image_url"]["url"].split(",", 1)
        assert header == "data:image/png;base64"
        assert Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes() == img.tobytes()


@pytest.mark.parametrize(("field", "sent"), [
    ("structured_outputs", {"structured_outputs": {"choice": ["red", "blue"]}}),
    ("guided_choice", {"guided_choice": ["red", "blue"]}),
])
def test_choices_are_sent_as_guided_choice(field, sent):
    with fake_server(chat_only(lambda body, no: (200, ok_answer(text="blue"), None))) as (url, hits):
        got = engine(url, choices=["red", "blue"], choice_field=field).generate([prompt()], GREEDY)
    assert got[0][0].text == "blue"
    body = hits[0]["body"]
    assert {k: body[k] for k in sent} == sent
    assert not {"structured_outputs", "guided_choice"} - set(sent) & set(body)  # only the chosen field


def test_a_server_ignoring_the_choice_is_an_error():
    """A server that does not know the field answers free text: named, with the other field to try."""
    answers = iter([ok_answer(text="a red circle"), ok_answer(text="re", finish="length")])
    with fake_server(chat_only(lambda body, no: (200, next(answers), None))) as (url, hits):
        eng = engine(url, choices=["red", "blue"], concurrency=1)
        with pytest.raises(ServerError, match=r"answered 'a red circle', none of rollout.options.choices.*"
                                              r"choice_field=guided_choice"):
            eng.generate([prompt()], GREEDY)
        assert eng.generate([prompt()], GREEDY)[0][0].truncated  # cut by max_tokens: not a violation
    with fake_server(chat_only(lambda body, no: (200, ok_answer(text="a red circle"), None))) as (url, hits):
        assert engine(url).generate([prompt()], GREEDY)[0][0].text == "a red circle"  # no choices: free text


def test_completion_ids_from_server_or_retokenised(tok):
    eos = tok.eos_token_id
    answers = iter([
        ok_answer(text="red circle", finish="stop"),                       # no ids: re-tokenise + EOS
        ok_answer(text="red circle", finish="length"),                     # truncated: no EOS
        ok_answer(text="red", finish="stop", token_ids=[7, 8, eos]),       # server ids used as given
        ok_answer(text="red", finish="stop", token_ids=[7, 8]),            # EOS missing: appended
    ])
    with fake_server(chat_only(lambda body, no: (200, next(answers), None))) as (url, hits):
        eng = engine(url, concurrency=1)
        eng.setup(RolloutContext(model=None, processor=tok, family=None, device=None))
        got = [eng.generate([prompt()], GREEDY)[0][0] for _ in range(4)]
    words = tok("red circle", add_special_tokens=False)["input_ids"]
    assert [(c.ids, c.truncated) for c in got] == [
        (words + [eos], False), (words, True), ([7, 8, eos], False), ([7, 8, eos], False)]
    assert [c.text for c in got] == ["red circle", "red circle", "red", "red"]


def test_api_key_from_environment(monkeypatch):
    with fake_server(chat_only(lambda body, no: (200, ok_answer(), None))) as (url, hits):
        eng = engine(url, api_key_env="VLMR1_TEST_KEY")
        monkeypatch.delenv("VLMR1_TEST_KEY", raising=False)
        with pytest.raises(ServerError, match="environment variable VLMR1_TEST_KEY is not set"):
            eng.setup(RolloutContext(model=None, processor=None, family=None, device=None))
        monkeypatch.setenv("VLMR1_TEST_KEY", "s3cret")
        eng.generate([prompt()], GREEDY)
    assert hits[0]["headers"]["Authorization"] == "Bearer s3cret"


def test_options_are_validated():
    with pytest.raises(ValidationError, match="must start with http:// or https://"):
        OpenAIServerRollout.from_options({"base_url": "127.0.0.1:8000"})
    with pytest.raises(ValidationError, match="refresh_every needs checkpoint_dir"):
        OpenAIServerRollout.from_options({"base_url": "http://h", "refresh_every": 2})
    with pytest.raises(ValidationError, match="refresh_every needs reload_command or reload_url"):
        OpenAIServerRollout.from_options({"base_url": "http://h", "refresh_every": 2, "checkpoint_dir": "/tmp/x"})
    with pytest.raises(ValidationError, match="timeout_sec"):
        OpenAIServerRollout.from_options({"base_url": "http://h", "timeout_sec": 3})
    with pytest.raises(ValidationError, match="choices"):
        OpenAIServerRollout.from_options({"base_url": "http://h", "choices": []})
    with pytest.raises(ValidationError, match="choice_field"):
        OpenAIServerRollout.from_options({"base_url": "http://h", "choice_field": "regex"})
    eng = OpenAIServerRollout.from_options({"base_url": "http://h:1/v1/"})
    assert eng.chat_url == "http://h:1/v1/chat/completions" and eng.root == "http://h:1"


def test_registered_as_rollout_engine():
    entry = PluginHost("xllm").registry.resolve("rollouts", "openai_server")
    assert entry.cls is OpenAIServerRollout and entry.provider == "vlmr1-plugin-xllm"


# ---- weight refresh counter --------------------------------------------------------------------
class SavingStub:
    """Stands in for the policy: ``save_pretrained`` writes a config.json and records the call."""

    def __init__(self):
        self.saved = []

    def save_pretrained(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        self.saved.append(path.name)


def test_refresh_every_k_steps(tmp_path):
    log = tmp_path / "reloads.txt"
    script = ("import os, sys; ok = os.path.isfile(os.path.join(sys.argv[1], 'config.json')); "
              f"open({str(log)!r}, 'a').write(sys.argv[1] + ' ' + sys.argv[2] + ' ' + str(ok) + '\\n')")
    with fake_server(chat_only(lambda body, no: (200, {"status": "loaded"}, None))) as (url, hits):
        eng = engine(url, refresh_every=3, checkpoint_dir=str(tmp_path / "ckpt"),
                     reload_command=f'{sys.executable} -c "{script}" {{checkpoint}} {{step}}',
                     reload_url=url + "/reload", reload_body={"path": "{checkpoint}", "lora_name": "policy"})
        model = SavingStub()
        staleness = []
        for _ in range(7):
            eng.sync_weights(model)
            staleness.append(eng.steps_since_refresh)
    assert staleness == [1, 2, 0, 1, 2, 0, 1]  # never more than K - 1 = 2 steps behind
    assert eng.refreshes == 2 and model.saved == ["step-0000003", "step-0000006"]
    ckpt = tmp_path / "ckpt"
    assert log.read_text().splitlines() == [f"{ckpt / 'step-0000003'} 3 True", f"{ckpt / 'step-0000006'} 6 True"]
    reloads = [h["body"] for h in hits if h["path"] == "/reload"]
    assert reloads == [{"path": str(ckpt / "step-0000003"), "lora_name": "policy"},
                       {"path": str(ckpt / "step-0000006"), "lora_name": "policy"}]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-0000006"]  # the older copy is removed
    assert eng.metrics()["rollout/server_staleness_steps"] == 1.0


def test_no_refresh_without_refresh_every():
    eng = OpenAIServerRollout.from_options({"base_url": "http://127.0.0.1:9"})
    model = SavingStub()
    for _ in range(5):
        eng.sync_weights(model)
    assert model.saved == [] and eng.refreshes == 0 and eng.steps_since_refresh == 5


def test_failing_reload_command_is_reported(tmp_path):
    eng = engine("http://127.0.0.1:9", refresh_every=1, checkpoint_dir=str(tmp_path),
                 reload_command=f"{sys.executable} -c \"import sys; sys.exit('server refused {{checkpoint}}')\"")
    with pytest.raises(ServerError, match=r"reload_command .* exited with 1: server refused .*step-0000001"):
        eng.sync_weights(SavingStub())
