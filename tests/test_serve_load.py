"""``core.serve`` under load and abuse, on 127.0.0.1.

The load test runs the real server (``python -m core.serve`` over a tiny Qwen2.5-VL) and sends
200 requests at concurrency 50, a fifth of them malformed or abusive (bad JSON, a wrong API key,
a 144-Mpx PNG decompression bomb, too many images, an 80K-character prompt, ...). Every valid
request must be answered 200, every bad one with its 4xx, no connection may be reset, and the
server's peak memory must stay bounded. The HTTP-layer tests run the FastAPI app on uvicorn in
a thread (:class:`~core.serving.ThreadedServer`) with a stub model.
Figures: ``pytest tests/test_serve_load.py -s`` prints them (docs/reliability.md).
"""

from __future__ import annotations

import base64
import functools
import hmac
import importlib.util
import json
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from core.interfaces.openai_messages import RequestError, data_url_to_image, image_to_data_url, openai_to_chat_messages
from core.serving import SERVE_MODULES, HTTPLimits, ServerProcess, ThreadedServer
from core.testing.procs import scaled

KEY = "load-test-key-0123456789"


@functools.lru_cache(maxsize=1)
def bomb_png(side: int = 12000) -> bytes:
    """A valid, highly compressible PNG of side x side pixels (~0.4 MB; 432 MB once decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * side)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


# ---- unit level: limits checked before any decoding ---------------------------------------------
def test_pixel_limit_is_checked_from_the_header_before_decoding():
    t0 = time.monotonic()
    with pytest.raises(RequestError, match=r"12000x12000 = 144.0 Mpx exceeds this server's limit of 16.8 Mpx"):
        data_url_to_image(data_url(bomb_png()), "img", max_pixels=4096 * 4096)
    assert time.monotonic() - t0 < 5.0


def test_image_count_is_checked_before_decoding():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-even-base64"}}
    with pytest.raises(RequestError, match="3 images exceed this server's limit of 2 per request"):
        openai_to_chat_messages([{"role": "user", "content": [part, part, part]}], max_images=2)


# ---- the HTTP layer with a stub model ----------------------------------------------------------------
class _Stub:
    def models(self):
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    def chat_completion(self, body):
        return {"object": "chat.completion", "choices": [], "echo": body}


@pytest.fixture
def stub_server():
    if any(importlib.util.find_spec(m) is None for m in SERVE_MODULES):
        pytest.skip("needs the serve extra: pip install 'vlmr1[serve]'")
    servers = []

    def start(**limits):
        srv = ThreadedServer(_Stub(), api_key=KEY, limits=HTTPLimits(**limits)).start()
        servers.append(srv)
        return srv.port

    yield start
    for srv in servers:
        srv.stop()


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return out + b"<timeout>"
            if not chunk:
                return out
            out += chunk


def test_api_key_is_checked_before_the_body_is_read(stub_server):
    port = stub_server()
    # Headers announce a body that never comes: the old server blocked reading it (the client timed out).
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n")
    t0 = time.monotonic()
    reply = _raw(port, head, timeout=3.0)
    assert reply.startswith(b"HTTP/1.1 401") and b"authentication_error" in reply
    assert b"connection: close" in reply.lower() and not reply.endswith(b"<timeout>")  # closed, body unread
    assert time.monotonic() - t0 < 2.0


def test_the_key_is_compared_in_constant_time(stub_server, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    port = stub_server()
    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 200 and calls == [(f"Bearer {KEY}".encode(), f"Bearer {KEY}".encode())]


def test_a_slow_body_gets_408_and_frees_the_worker(stub_server):
    port = stub_server(request_timeout_s=1.0, workers=1)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and 0.8 < time.monotonic() - t0 < 3.0
    # The only worker is free again.
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"a": 1},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 200


def test_idle_connections_are_closed_and_do_not_starve_workers(stub_server):
    port = stub_server(idle_timeout_s=0.5, workers=2)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]  # hold both workers
    try:
        t0 = time.monotonic()
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # the old server kept idle threads for ever
        assert r.status_code == 200 and time.monotonic() - t0 < 3.0
        for s in idle:
            assert s.recv(1) == b""  # closed by the server
    finally:
        for s in idle:
            s.close()


def test_overflowing_requests_get_503_not_a_reset(stub_server):
    port = stub_server(workers=1, max_queued=0)
    hold = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:  # a request whose body is still arriving occupies the one slot
        hold.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.2)
        reply = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply.lower()
        assert b"server overloaded" in reply
    finally:
        hold.close()
    # The slot is free again once the held request is gone.
    deadline = time.monotonic() + 30
    while (status := httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def _trickle(port: int, head: bytes, drip: bytes, interval: float, give_up_s: float) -> tuple[float | None, bytes]:
    """Send ``head``, then ``drip`` one byte every ``interval`` s until the server closes the connection.

    Returns the seconds until it closed (None if still open after ``give_up_s``) and what it sent.
    """
    import select

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        reply = b""
        try:
            s.sendall(head)
            for i in range(10**9):
                if time.monotonic() - t0 > give_up_s:
                    return None, reply
                while select.select([s], [], [], 0)[0]:
                    chunk = s.recv(65536)
                    if not chunk:
                        return time.monotonic() - t0, reply
                    reply += chunk
                s.sendall(drip[i % len(drip):i % len(drip) + 1])
                time.sleep(interval)
        except OSError:  # reset or broken pipe: closed too
            return time.monotonic() - t0, reply
    raise AssertionError("unreachable")


SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"
SLOW_HEAD_DRIP = b"X-Slow: " + b"a" * 4000


def test_a_trickling_request_head_gets_408_at_the_head_deadline(stub_server):
    """One header byte every 0.1 s: per-read timeouts never fire; the whole-head deadline does."""
    port = stub_server(head_timeout_s=1.0, socket_timeout_s=30.0, idle_timeout_s=30.0)
    closed_after, reply = _trickle(port, SLOW_HEAD, SLOW_HEAD_DRIP, 0.1, give_up_s=scaled(20))
    assert closed_after is not None, f"a head trickling for {scaled(20):.0f} s was never cut off: {reply[:200]!r}"
    assert reply.startswith(b"HTTP/1.1 408") and b"request head not received within 1 s" in reply, reply
    # 1 s deadline; the rest is slack for a busy machine (the old server kept it open for ever).
    assert closed_after < scaled(10), f"cut off after {closed_after:.1f} s, deadline 1 s (machine busy?)"


def test_a_body_left_unread_after_the_response_is_cut_off(stub_server):
    """/health answers without reading a body; the rest of a trickling body gets head_timeout_s, not for ever."""
    port = stub_server(head_timeout_s=1.0, socket_timeout_s=30.0, idle_timeout_s=30.0)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    closed_after, reply = _trickle(port, head, b"x", 0.1, give_up_s=scaled(20))
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert closed_after is not None, f"a body trickling for {scaled(20):.0f} s after the response was never cut off"
    assert closed_after < scaled(10), f"cut off after {closed_after:.1f} s, deadline 1 s (machine busy?)"


@pytest.mark.parametrize(("body", "fragment"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested more than 32 levels"),
    (b'{"messages": [' + b"{}," * 200_000 + b"{}]}", "JSON values"),
    (b'{"messages": [' + b'"",' * 500_000 + b'""]}', "JSON values"),
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": 1e400}', "number 1e400 is out of range"),
    (b'{"a": "\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"a": "\xff"}', "not valid JSON"),
])
def test_bodies_that_would_blow_up_parsing_are_400(stub_server, body, fragment):
    port = stub_server()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=body, timeout=scaled(60),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text[:300]


def test_json_shape_limits_pass_ordinary_bodies():
    from core.serving.asgi import check_json_shape, parse_json_body

    image = "data:image/png;base64," + "QUJD" * 100_000  # a long string: no structure inside
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "braces {[ and commas, in text " * 2000},
        {"type": "image_url", "image_url": {"url": image}}]}], "n": 2, "stop": None}).encode()
    assert parse_json_body(body, max_values=100, max_depth=6)["n"] == 2  # brackets in strings do not count
    check_json_shape(b"[" * 5 + b"]" * 5, max_values=10, max_depth=5)
    with pytest.raises(RequestError, match="nested more than 4 levels"):
        check_json_shape(b"[" * 5 + b"]" * 5, max_values=10, max_depth=4)
    with pytest.raises(RequestError, match="about 11 JSON values"):
        check_json_shape(b"[" + b"1," * 10 + b"1]", max_values=10, max_depth=4)


# ---- the real server under load ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from core.plugins import PluginHost

    if any(importlib.util.find_spec(m) is None for m in SERVE_MODULES):
        pytest.skip("needs the serve extra: pip install 'vlmr1[serve]'")
    try:
        fam = PluginHost("qwen-vl").registry.get("models", "qwen2_5_vl")
    except Exception as exc:  # the plugin is not installed
        pytest.skip(f"needs the qwen2_5_vl model family (vlmr1-plugin-qwen-vl): {exc}")
    return fam.build_tiny_checkpoint(tmp_path_factory.mktemp("serve-load") / "tiny-q25")


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def test_200_requests_at_concurrency_50_with_a_fifth_malformed(tiny_ckpt, monkeypatch):
    monkeypatch.setenv("VLMR1_LOAD_KEY", KEY)
    args = ["--plugins", "qwen-vl", "--api-key-env", "VLMR1_LOAD_KEY", "--max-tokens-limit", "8",
            "--max-images", "4", "--max-prompt-tokens", "2048"]
    small = image_to_data_url(Image.new("RGB", (56, 56), (200, 40, 40)))
    bomb = data_url(bomb_png())
    auth = {"Authorization": f"Bearer {KEY}"}

    def user(*parts):
        return {"messages": [{"role": "user", "content": list(parts)}], "temperature": 0, "max_tokens": 4}

    text = {"type": "text", "text": "What colour is this?"}
    img = {"type": "image_url", "image_url": {"url": small}}
    bad = [  # (body or raw bytes, headers, expected status, fragment of the message)
        (b"{not json", auth, 400, "not valid JSON"),
        (user(text), {"Authorization": "Bearer wrong"}, 401, "API key"),
        (user({"type": "image_url", "image_url": {"url": bomb}}, text), auth, 400, "144.0 Mpx exceeds"),
        (user(img, img, img, img, img, text), auth, 400, "5 images exceed"),
        (user({"type": "text", "text": "word " * 16000}), auth, 400, "--max-prompt-tokens"),
        ({"messages": [{"role": "tool", "content": "x"}]}, auth, 400, "'tool' is not supported"),
        (user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}), auth, 400, "invalid base64"),
        ({**user(text), "max_tokens": 100000}, auth, 400, "exceeds this server's limit 8"),
    ]
    jobs = []
    for i in range(200):
        if i % 5 == 4:
            jobs.append(("bad", *bad[(i // 5) % len(bad)]))
        else:
            jobs.append(("ok", user(img, text) if i % 2 else user(text), auth, 200, ""))

    with ServerProcess(tiny_ckpt, args, startup_timeout=scaled(300)) as srv:
        url = srv.url + "/chat/completions"
        with httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0),
                          limits=httpx.Limits(max_connections=50, max_keepalive_connections=50)) as client:
            assert client.post(url, json=user(img, text), headers=auth).status_code == 200  # warm up
            rss_before = _peak_rss_mb(srv.proc.pid)

            def send(job):
                kind, body, headers, status, fragment = job
                try:
                    if isinstance(body, bytes):
                        r = client.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
                    else:
                        r = client.post(url, json=body, headers=headers)
                except httpx.TransportError as exc:  # a reset or a timeout: a lost request
                    return kind, f"transport error {type(exc).__name__}: {exc}"
                if r.status_code != status or fragment not in r.text:
                    return kind, f"HTTP {r.status_code} (expected {status}, {fragment!r}): {r.text[:200]}"
                if kind == "ok" and not isinstance(r.json()["choices"][0]["message"]["content"], str):
                    return kind, "no completion"
                return kind, None

            t0 = time.monotonic()
            with ThreadPoolExecutor(50) as pool:
                results = list(pool.map(send, jobs))
            seconds = time.monotonic() - t0
            stats = client.get(srv.url.removesuffix("/v1") + "/stats", headers=auth).json()
        rss_after = _peak_rss_mb(srv.proc.pid)
        assert srv.proc.poll() is None  # still up
    lost = [r for k, r in results if k == "ok" and r]
    wrong = [r for k, r in results if k == "bad" and r]
    print(f"\nserve load: {len(jobs)} requests at concurrency 50 ({sum(k == 'bad' for k, _ in results)} malformed) "
          f"in {seconds:.1f} s; valid lost {len(lost)}/{sum(k == 'ok' for k, _ in results)}; malformed answered "
          f"wrongly {len(wrong)}; server peak RSS {rss_before:.0f} -> {rss_after:.0f} MB; "
          f"{stats['requests']} generations in {stats['generate_calls']} generate calls "
          f"(largest batch {stats['largest_batch']})")
    assert not lost, lost[:3]
    assert not wrong, wrong[:3]
    assert stats["generate_calls"] < stats["requests"]  # requests that arrived together were batched
    # The bomb alone would add 432 MB decoded (the old server: about 2 GB); bounded by the pixel limit.
    assert rss_after - rss_before < 300, (rss_before, rss_after)


# ---- the real server against slow clients and big bodies -------------------------------------------
@pytest.fixture(scope="module")
def guarded(tiny_ckpt):
    """``python -m core.serve`` with 2 workers and short deadlines, as a test can afford to wait for them."""
    # --request-timeout 10: long enough for three 60 MB bodies on a busy machine, short for a test to wait.
    args = ["--plugins", "qwen-vl", "--workers", "2", "--head-timeout", "1", "--request-timeout", "10",
            "--socket-timeout", "30", "--idle-timeout", "30", "--max-tokens-limit", "8"]
    with ServerProcess(tiny_ckpt, args, startup_timeout=scaled(300)) as srv:
        yield srv


def _reset_peak_rss(pid: int) -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs), so the peak measured is this test's."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def test_slow_clients_as_many_as_workers_do_not_stall_the_server(guarded):
    """2 workers; 2 connections trickle a head and 2 a body, one byte every 0.2 s. Meanwhile a health check
    and a valid request are answered, and every slow connection is cut off near its deadline (408)."""
    port = int(guarded.url.split(":")[-1].split("/")[0])
    body_head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n")
    slow = [(SLOW_HEAD, SLOW_HEAD_DRIP)] * 2 + [(body_head, b'{"messages": ')] * 2
    give_up = scaled(60)
    with ThreadPoolExecutor(len(slow)) as pool:
        futures = [pool.submit(_trickle, port, head, drip, 0.2, give_up) for head, drip in slow]
        time.sleep(0.5)  # all four are trickling now
        t0 = time.monotonic()
        health = httpx.get(guarded.url.removesuffix("/v1") + "/health", timeout=scaled(60))
        health_s = time.monotonic() - t0
        t0 = time.monotonic()
        ok = httpx.post(guarded.url + "/chat/completions", timeout=scaled(60),
                        json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 2})
        ok_s = time.monotonic() - t0
        results = [f.result() for f in futures]
    assert health.status_code == 200 and health_s < scaled(10), (health.status_code, health_s)
    # Both slots may be held by the trickling bodies until their 10 s deadline: the valid request waits that long.
    assert ok.status_code == 200 and ok_s < scaled(40), (ok.status_code, ok_s, ok.text[:200])
    for (closed_after, reply), (head, _) in zip(results, slow, strict=True):
        what = "head" if head is SLOW_HEAD else "body"
        assert closed_after is not None, f"a trickling {what} was never cut off in {give_up:.0f} s: {reply[:200]!r}"
        assert reply.startswith(b"HTTP/1.1 408"), (what, reply[:300])
        # deadlines: head 1 s, body 10 s; the rest is slack for a busy machine
        assert closed_after < scaled(30), f"a trickling {what} was cut off after {closed_after:.1f} s (machine busy?)"
    print(f"\nslow clients: health in {health_s:.2f} s, a valid request in {ok_s:.2f} s; trickling connections cut "
          f"off after {', '.join(f'{c:.1f}' for c, _ in results)} s (head deadline 1 s, body 10 s)")


def test_big_bodies_of_empty_objects_do_not_blow_up_server_memory(guarded):
    """Three 60 MB bodies of ``{}`` (under the 64 MiB byte limit) at once: 400 each, memory bounded.

    Before the shape limits, one such body raised the server's memory by 1.6 GB while parsing.
    """
    body = b'{"messages": [' + b"{}," * 20_000_000 + b"{}]}"
    assert len(body) < 64 * 2**20
    pid = guarded.proc.pid
    rss_before = _rss_mb(pid)
    _reset_peak_rss(pid)
    t0 = time.monotonic()

    def post(_):
        return httpx.post(guarded.url + "/chat/completions", content=body, timeout=scaled(120),
                          headers={"Content-Type": "application/json"})

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(post, range(3)))
    seconds = time.monotonic() - t0
    peak = _peak_rss_mb(pid)
    for r in replies:
        assert r.status_code == 400 and "JSON values" in r.json()["error"]["message"], r.text[:300]
    print(f"\nbig bodies: 3 x {len(body) / 2**20:.0f} MiB of {{}} at once -> 400 in {seconds:.1f} s; server RSS "
          f"{rss_before:.0f} MB, peak {peak:.0f} MB (+{peak - rss_before:.0f})")
    # The three bodies themselves are 180 MB; parsing them was +1.6 GB each before.
    assert peak - rss_before < 600, (rss_before, peak)
    health = httpx.get(guarded.url.removesuffix("/v1") + "/health", timeout=scaled(60))
    assert health.status_code == 200


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
