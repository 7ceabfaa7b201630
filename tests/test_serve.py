"""``python -m core.serve`` as a real subprocess on 127.0.0.1 over a tiny Qwen2.5-VL checkpoint.

Greedy answers must equal the built-in TransformersRollout's (same family rendering, same
images, one prompt per generate call); errors must be OpenAI-shaped and name the field.
"""

from __future__ import annotations

import json

import httpx
import pytest
from PIL import Image

from core.interfaces import PromptInput, RolloutContext, SamplingParams
from core.interfaces.openai_messages import (
    RequestError,
    chat_to_openai_messages,
    data_url_to_image,
    image_to_data_url,
    openai_to_chat_messages,
)
from core.plugins import PluginHost
from core.plugins.builtin.rollout import TransformersRollout
from core.serve import ServerProcess, main

TIMEOUT = httpx.Timeout(60.0, connect=5.0)


def _family_cls():
    reg = PluginHost("qwen-vl").registry
    return reg.get("models", "qwen2_5_vl")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    try:
        fam = _family_cls()
    except Exception as exc:  # the plugin is not installed
        pytest.skip(f"needs the qwen2_5_vl model family (vlmr1-plugin-qwen-vl): {exc}")
    return fam.build_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-q25")


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    # No --family: the family must be found from config.model_type.
    with ServerProcess(tiny_ckpt, ["--plugins", "qwen-vl", "--max-tokens-limit", "64"], startup_timeout=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(tiny_ckpt):
    """The same checkpoint in process, with the built-in rollout engine."""
    import torch

    fam = _family_cls()()
    model = fam.load_model(tiny_ckpt, dtype=torch.float32)
    model.eval()
    proc = fam.load_processor(tiny_ckpt)
    eng = TransformersRollout()
    eng.setup(RolloutContext(model=model, processor=proc, family=fam, device=torch.device("cpu"),
                             suppressed_token_ids=fam.suppressed_token_ids(proc, model)))
    return fam, proc, eng


def _images():
    red = Image.new("RGB", (56, 56), (220, 30, 30))
    grad = Image.frombytes("RGB", (84, 56), bytes((x * 3 + y) % 256 for y in range(56) for x in range(84)
                                                   for _ in range(3)))
    return red, grad


CASES = {
    "one_image": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]}],
                  1),
    "two_images": ([{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
                    {"role": "user", "content": [{"type": "text", "text": "Picture 1:"}, {"type": "image"},
                                                 {"type": "text", "text": "Picture 2:"}, {"type": "image"},
                                                 {"type": "text", "text": "Which is red?"}]}], 2),
}


def _post(srv, body):
    return httpx.post(srv.url + "/chat/completions", json=body, timeout=TIMEOUT)


def test_health_models_and_family_from_model_type(server):
    assert "(qwen2_5_vl, cpu)" in server.banner
    assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    models = httpx.get(server.url + "/models", timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == ["tiny-q25"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_equals_builtin_engine(server, local, case):
    fam, proc, eng = local
    messages, n_img = CASES[case]
    images = list(_images()[:n_img])
    expected = eng.generate([PromptInput(messages, fam.render_prompt(proc, messages), images)],
                            SamplingParams(n=1, max_new_tokens=12, do_sample=False))[0][0]
    r = _post(server, {"model": "tiny-q25", "messages": chat_to_openai_messages(messages, images),
                       "temperature": 0, "max_tokens": 12, "n": 3, "return_token_ids": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "tiny-q25"
    assert len(out["choices"]) == 3  # greedy n=3: three identical answers
    for i, ch in enumerate(out["choices"]):
        assert ch["index"] == i
        assert ch["token_ids"] == expected.ids
        assert ch["message"] == {"role": "assistant", "content": expected.text}
        assert ch["finish_reason"] == ("length" if expected.truncated else "stop")
    inputs = fam.process(proc, [fam.render_prompt(proc, messages)], [images])
    assert out["prompt_token_ids"] == inputs["input_ids"][0].tolist()
    assert out["usage"] == {"prompt_tokens": len(out["prompt_token_ids"]), "completion_tokens": 3 * len(expected.ids),
                            "total_tokens": len(out["prompt_token_ids"]) + 3 * len(expected.ids)}


def test_sampling_parameters_are_honoured(server):
    red, grad = _images()
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_to_data_url(grad)}}, {"type": "text", "text": "Describe."}]}]
    base = {"messages": msgs, "max_tokens": 10, "return_token_ids": True}
    greedy = _post(server, {**base, "temperature": 0}).json()["choices"][0]["token_ids"]
    s1 = _post(server, {**base, "temperature": 1.0, "n": 4, "seed": 7}).json()["choices"]
    s2 = _post(server, {**base, "temperature": 1.0, "n": 4, "seed": 7}).json()["choices"]
    s3 = _post(server, {**base, "temperature": 1.0, "n": 4, "seed": 8}).json()["choices"]
    ids = lambda chs: [c["token_ids"] for c in chs]  # noqa: E731
    assert len(s1) == 4 and ids(s1) == ids(s2)  # same seed, same samples
    assert ids(s1) != ids(s3)
    assert len({tuple(x) for x in ids(s1)}) > 1  # a random tiny model samples different completions
    # A vanishing nucleus (top_p) or top_k = 1 leaves only the argmax token: sampling = greedy.
    nucleus = _post(server, {**base, "temperature": 1.0, "top_p": 1e-6, "n": 2, "seed": 1}).json()["choices"]
    assert ids(nucleus) == [greedy, greedy]
    topk = _post(server, {**base, "temperature": 1.5, "top_k": 1, "seed": 2}).json()["choices"]
    assert ids(topk) == [greedy]
    short = _post(server, {**base, "temperature": 0, "max_completion_tokens": 3}).json()
    assert short["choices"][0]["token_ids"] == greedy[:3] and short["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://h/x.png"}}]}]},
     400, "messages[0].content[0].image_url: only base64 data URLs"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     400, "messages[0].content[0].image_url: invalid base64"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": "data:image/png;base64,aGVsbG8="}]}]},  # a bare URL string is accepted
     400, "does not hold a readable image"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role: 'tool' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "unsupported content part type 'audio'"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "The model `gpt-4` does not exist"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "streaming is not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "exceeds this server's limit 64"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature:"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["\n"]}, 400, "stop sequences are not supported"),
])
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    r = _post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["code"] == status


def test_invalid_json_and_unknown_routes(server):
    r = httpx.post(server.url + "/chat/completions", content=b"{not json", timeout=TIMEOUT,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/nope", timeout=TIMEOUT).status_code == 404
    assert httpx.post(server.url + "/completions", json={}, timeout=TIMEOUT).status_code == 404
    no_reload = httpx.post(server.url + "/load_checkpoint", json={"checkpoint": "/x"}, timeout=TIMEOUT)
    assert no_reload.status_code == 404 and "--allow-reload" in no_reload.json()["error"]["message"]
    # The server still answers after the errors.
    ok = _post(server, {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


# ---- no server needed ----------------------------------------------------------------------------
def test_message_conversion_round_trip():
    red, grad = _images()
    messages, _ = CASES["two_images"]
    oa = chat_to_openai_messages(messages, [red, grad])
    parts = oa[1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    back, imgs = openai_to_chat_messages(oa)
    assert back == messages
    assert [i.tobytes() for i in imgs] == [red.tobytes(), grad.tobytes()]  # PNG is lossless
    assert openai_to_chat_messages([{"role": "developer", "content": "be brief"}])[0] == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]}]
    with pytest.raises(ValueError, match="more image placeholders than the 1 image"):
        chat_to_openai_messages(messages, [red])
    with pytest.raises(ValueError, match="3 image\\(s\\) given but the messages hold 2"):
        chat_to_openai_messages(messages, [red, grad, red])
    jpeg = data_url_to_image(image_to_data_url(grad, "jpeg"))
    assert jpeg.size == grad.size and jpeg.mode == "RGB"
    with pytest.raises(RequestError, match="not base64-encoded"):
        data_url_to_image("data:image/png,abc")


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--plugins", "none"]) == 2
    assert "no config.json there" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_vlm"}))
    assert main([str(tmp_path), "--plugins", "none"]) == 2
    assert "no installed model family handles model_type 'no_such_vlm'" in capsys.readouterr().err
    assert main([str(tmp_path), "--plugins", "none", "--family-options", "{bad"]) == 2
    assert "--family-options is not valid JSON" in capsys.readouterr().err


class _StubServer:
    """A ModelServer stand-in for the HTTP layer: one answer, one crash."""

    def models(self):
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    def chat_completion(self, body):
        if body.get("crash"):
            raise ZeroDivisionError("boom")
        return {"object": "chat.completion", "choices": []}


def test_http_layer_api_key_and_internal_errors():
    import threading

    from core.serve import make_http_server

    httpd = make_http_server(_StubServer(), "127.0.0.1", 0, api_key="k3y", quiet=True, max_request_bytes=1000)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200  # health needs no key
        r = httpx.get(url + "/v1/models", timeout=TIMEOUT)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer k3y"}
        assert httpx.get(url + "/v1/models", headers=auth, timeout=TIMEOUT).json()["data"][0]["id"] == "stub"
        r = httpx.post(url + "/v1/chat/completions", json={"crash": True}, headers=auth, timeout=TIMEOUT)
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: ZeroDivisionError: boom"
        r = httpx.post(url + "/v1/chat/completions", json={"pad": "x" * 2000}, headers=auth, timeout=TIMEOUT)
        assert r.status_code == 413 and "exceeds the limit of 1000" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/chat/completions", json={}, headers=auth, timeout=TIMEOUT).status_code == 200
    finally:
        httpd.shutdown()
        httpd.server_close()
