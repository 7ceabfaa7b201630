"""A small OpenAI-compatible chat-completions server over one checkpoint.

Usage: ``python -m core.serve CHECKPOINT [--host 127.0.0.1] [--port 8000] [--family NAME] [--plugins a,b]``

A trained model can be queried at once, and the server rollout back end is tested against a
real HTTP server. Endpoints:

- ``POST /v1/chat/completions``: OpenAI chat messages; content parts ``{"type": "text"}``
  and ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (any
  number of images, in place). Honours ``temperature`` (0 = greedy), ``top_p``, ``top_k``,
  ``max_tokens`` / ``max_completion_tokens``, ``n``, ``seed``, ``repetition_penalty`` and
  vLLM's ``return_token_ids`` extension (each choice then carries the generated ``token_ids``,
  EOS included, and the response the ``prompt_token_ids``).
- ``GET /v1/models``, ``GET /health``.
- ``POST /v1/load_checkpoint`` ``{"checkpoint": "/path"}``, only with ``--allow-reload``: load
  new weights (same family, dtype and device) and swap them in between requests; the OpenAI
  server rollout engine's ``reload_url`` uses it to refresh the server's policy copy.

Generation is the engine's own :class:`core.plugins.builtin.rollout.TransformersRollout` with the model
family's prompt rendering, so greedy answers equal the built-in back end's (one prompt per
``generate`` call; requests are served one at a time on the model, while HTTP handling is
threaded). Images are never fetched from URLs: only base64 ``data:`` URLs are accepted.

Under load (see docs/reliability.md for the measured figures): connections are accepted with a
listen backlog of ``--backlog`` (128) and served by a fixed pool of ``--workers`` (64) threads;
more waiting connections than ``--max-queued`` get 503 at once instead of a reset. An idle
keep-alive connection is closed after ``--idle-timeout`` s, every socket read or write has
``--socket-timeout`` s and a request body must arrive within ``--request-timeout`` s (408), so
a slow or silent client cannot hold a worker. A request waits at most ``--queue-timeout`` s for
the model (503). Limits answered with a 4xx naming the limit: body bytes (413), prompt tokens,
images per request and pixels per image (400; checked from the image header, before decoding,
so a decompression bomb costs nothing). The API key is checked, in constant time, before the
body is read.

Written on the standard library's ``http.server`` (``ThreadingHTTPServer``) rather than a web
framework: the server has four routes and no streaming, and core should not grow a
dependency (FastAPI/uvicorn) for them. Message and image conversion lives in
:mod:`core.interfaces.openai_messages`, shared with the OpenAI-server rollout plugins.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.interfaces.openai_messages import RequestError, openai_to_chat_messages

#: Largest request body accepted (bytes); a few large base64 images fit.
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20


# ---- request model -----------------------------------------------------------------------------
class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions request this server honours (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Any]
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    repetition_penalty: float = Field(1.0, gt=0.0)
    stream: bool = False
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    return_token_ids: bool = False


# ---- the model server ----------------------------------------------------------------------------
@dataclass
class ServerLimits:
    """Per-request bounds (each breach is a 4xx naming the limit)."""

    default_max_tokens: int = 256
    max_tokens: int = 4096
    max_n: int = 64
    #: Tokens of the rendered prompt text (image placeholders count once, before expansion).
    max_prompt_tokens: int = 8192
    max_images: int = 8
    #: Pixels per image, checked from the header before decoding (16 Mpx = 4096 x 4096).
    max_image_pixels: int = 4096 * 4096
    #: Seconds a request waits for the model (one request generates at a time) before a 503.
    queue_timeout_s: float = 300.0


class ModelServer:
    """A loaded checkpoint answering chat-completion requests (HTTP-free, so it is testable alone)."""

    def __init__(self, model: Any, processor: Any, family: Any, device: Any, model_id: str,
                 limits: ServerLimits | None = None) -> None:
        from core.interfaces import RolloutContext
        from core.plugins.builtin.rollout import TransformersRollout

        self.model, self.processor, self.family, self.device = model, processor, family, device
        self.model_id = model_id
        self.limits = limits or ServerLimits()
        self.created = int(time.time())
        # One prompt per generate call: batching requests together would left-pad them, which
        # can change greedy answers of a numerically fragile model; see the module docstring.
        self.engine = TransformersRollout.from_options({"prompt_batch_size": 1})
        self.loaded_checkpoint: str | None = None
        self.engine.setup(RolloutContext(model=model, processor=processor, family=family, device=device,
                                         suppressed_token_ids=family.suppressed_token_ids(processor, model)))
        self._lock = threading.Lock()
        self._tok_lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, family: str | None = None, family_options: dict | None = None,
                        plugins: str | None = None, device: str = "auto", dtype: str = "auto",
                        attn_implementation: str | None = None, model_id: str | None = None,
                        limits: ServerLimits | None = None) -> ModelServer:
        """Resolve the family (``--family`` or ``config.model_type``) and device, then load the checkpoint."""
        import torch

        from core.config import ConfigError
        from core.plugins import PluginHost
        from core.plugins.plan import pick_device, registry_family_for

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"checkpoint {path}: no config.json there (is it a transformers checkpoint folder?)")
        host = PluginHost(plugins)
        host.warn_failures()
        registry = host.registry
        try:
            fam_entry = registry.resolve("models", family) if family else registry_family_for(registry, path)
        except LookupError as exc:
            raise ConfigError(f"--family: {exc}") from None
        try:
            fam = fam_entry.cls.from_options(family_options or {})
        except ValidationError as exc:
            raise ConfigError(f"--family-options for {fam_entry.qualified}: {exc}") from None
        dev_entry, _ = pick_device(registry, device)
        dev = dev_entry.cls()
        torch_device = dev.torch_device(0)
        supported = dev.supported_dtypes()
        if dtype == "auto":
            # float32 on the CPU (bf16 there is slow); half precision on accelerators.
            dtype = "float32" if torch_device.type == "cpu" else next(
                (d for d in ("bfloat16", "float16") if d in supported), "float32")
        elif dtype not in supported:
            raise ConfigError(f"--dtype {dtype} is not supported by device {dev_entry.qualified} "
                              f"(supported: {', '.join(supported)})")
        if attn_implementation is None:
            impls = dev.attention_implementations()
            # Flash kernels need half precision; fall back to the first that runs in float32.
            attn_implementation = next(
                (a for a in impls if dtype != "float32" or not a.startswith("flash")), None)
        model = fam.load_model(path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
        model.to(torch_device)
        model.eval()
        processor = fam.load_processor(path)
        return cls(model, processor, fam, torch_device, model_id or path.resolve().name, limits)

    def _check_prompt_length(self, messages: list[dict[str, Any]]) -> None:
        """400 when the prompt text has more than ``max_prompt_tokens`` tokens, before the model is touched.

        Counted on the text parts with the tokenizer (no lock needed); a text too long to be under
        the limit even at 32 characters per token is refused without tokenizing it.
        """
        limit = self.limits.max_prompt_tokens
        text = "\n".join(p.get("text", "") for m in messages for p in m["content"] if p.get("type") == "text")
        if len(text) > 32 * limit:
            raise RequestError(f"messages: the prompt text of {len(text)} characters exceeds this server's limit of "
                               f"{limit} prompt tokens (--max-prompt-tokens)", param="messages")
        tok = getattr(self.processor, "tokenizer", self.processor)
        with self._tok_lock:  # a fast tokenizer may refuse concurrent calls ("Already borrowed")
            n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n > limit:
            raise RequestError(f"messages: the prompt text is {n} tokens, over this server's limit of {limit} "
                               "(--max-prompt-tokens)", param="messages")

    # ---- endpoints ---------------------------------------------------------------------------
    def load_checkpoint(self, body: Any) -> dict[str, Any]:
        """``POST /v1/load_checkpoint``: load ``body["checkpoint"]`` and swap it in between requests.

        The new weights load with the current model's dtype and attention kernel, outside the
        lock (requests keep being served meanwhile), then replace model and processor at once.
        """
        import torch

        from core.interfaces import RolloutContext

        path = body.get("checkpoint") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise RequestError("checkpoint: a checkpoint folder path is required", param="checkpoint")
        if not (Path(path) / "config.json").is_file():
            raise RequestError(f"checkpoint: no config.json in {path}", param="checkpoint")
        first = next(iter(self.model.parameters()), None)
        dtype = first.dtype if first is not None else torch.float32
        attn = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        try:
            model = self.family.load_model(path, dtype=dtype, attn_implementation=attn)
            processor = self.family.load_processor(path)
        except Exception as exc:
            raise RequestError(f"checkpoint: cannot load {path}: {type(exc).__name__}: {exc}", status=500,
                               param="checkpoint", err_type="server_error") from exc
        model.to(self.device)
        model.eval()
        with self._lock:
            self.model, self.processor = model, processor
            self.engine.setup(RolloutContext(model=model, processor=processor, family=self.family,
                                             device=self.device,
                                             suppressed_token_ids=self.family.suppressed_token_ids(processor, model)))
            self.loaded_checkpoint = path
        return {"status": "ok", "checkpoint": path, "model": self.model_id}

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``."""
        return {"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "vlmr1"}]}

    def chat_completion(self, body: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions``: validate, render with the family, generate, answer."""
        import torch

        from core.interfaces import PromptInput, SamplingParams

        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise RequestError(f"{loc}: {first['msg']}", param=loc) from None
        if req.model is not None and req.model != self.model_id:
            raise RequestError(f"The model `{req.model}` does not exist; this server serves `{self.model_id}`.",
                               status=404, param="model", err_type="NotFoundError")
        if req.stream:
            raise RequestError("stream: streaming is not supported by core.serve", param="stream")
        if req.stop:
            raise RequestError("stop: stop sequences are not supported by core.serve (EOS ends a completion)",
                               param="stop")
        if req.logprobs:
            raise RequestError("logprobs: log-probabilities are not returned by core.serve", param="logprobs")
        max_tokens = (req.max_completion_tokens or req.max_tokens
                      or min(self.limits.default_max_tokens, self.limits.max_tokens))
        if max_tokens > self.limits.max_tokens:
            raise RequestError(f"max_tokens: {max_tokens} exceeds this server's limit {self.limits.max_tokens}",
                               param="max_tokens")
        if req.n > self.limits.max_n:
            raise RequestError(f"n: {req.n} exceeds this server's limit {self.limits.max_n}", param="n")
        messages, images = openai_to_chat_messages(req.messages, max_images=self.limits.max_images,
                                                   max_pixels=self.limits.max_image_pixels)
        self._check_prompt_length(messages)
        greedy = req.temperature == 0.0
        # Greedy decoding gives n identical answers: generate one and repeat it (transformers
        # refuses num_return_sequences > 1 without sampling).
        sampling = SamplingParams(
            n=1 if greedy else req.n, max_new_tokens=max_tokens, temperature=req.temperature or 1.0,
            top_p=req.top_p, top_k=req.top_k or None, do_sample=not greedy,
            repetition_penalty=req.repetition_penalty)
        # One request at a time on the model (and no swap mid-request); a bounded wait, so a
        # backlog of slow requests answers 503 instead of piling up for ever.
        if not self._lock.acquire(timeout=self.limits.queue_timeout_s):
            raise RequestError(f"server busy: the model was not free within {self.limits.queue_timeout_s:g} s; "
                               "retry later", status=503, err_type="server_error")
        try:
            text = self.family.render_prompt(self.processor, messages)
            prompt = PromptInput(messages=messages, text=text, images=images)
            if req.seed is not None:
                torch.manual_seed(req.seed)
            try:
                completions = self.engine.generate([prompt], sampling)[0]
            except Exception as exc:  # report generation failures as 500 with the cause
                raise RequestError(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                   err_type="server_error") from exc
            prompt_ids = self.family.process(self.processor, [text], [images])["input_ids"][0].tolist()
        finally:
            self._lock.release()
        if greedy:
            completions = completions * req.n
        choices = []
        for i, c in enumerate(completions):
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": "length" if c.truncated else "stop",
            }
            if req.return_token_ids:
                choice["token_ids"] = list(c.ids)
            choices.append(choice)
        n_out = sum(len(c.ids) for c in completions)
        out: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                      "total_tokens": len(prompt_ids) + n_out},
        }
        if req.return_token_ids:
            out["prompt_token_ids"] = prompt_ids
        return out


# ---- HTTP ------------------------------------------------------------------------------------------
@dataclass
class HTTPLimits:
    """Connection-level bounds of the HTTP layer (see the module docstring)."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    #: Seconds an idle keep-alive connection is kept before it is closed (frees its worker).
    idle_timeout_s: float = 5.0
    #: Seconds any single socket read or write may block.
    socket_timeout_s: float = 30.0
    #: Seconds the whole request body may take to arrive (a slow client gets 408).
    request_timeout_s: float = 60.0
    workers: int = 64
    backlog: int = 128
    #: Accepted connections waiting for a worker beyond which new ones get 503 at once.
    max_queued: int = 512


def _auth_ok(header: str | None, api_key: str) -> bool:
    """Constant-time check of ``Authorization: Bearer <key>`` (no timing side channel on the key)."""
    return hmac.compare_digest((header or "").encode("utf-8", "surrogateescape"), f"Bearer {api_key}".encode())


def make_handler(server: ModelServer, *, api_key: str | None = None, quiet: bool = False,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 allow_reload: bool = False, limits: HTTPLimits | None = None) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to ``server``."""
    lim = limits or HTTPLimits(max_request_bytes=max_request_bytes)

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keeps connections alive for clients that pool them (httpx, requests).
        protocol_version = "HTTP/1.1"
        server_version = "vlmr1-serve"
        # socketserver applies this to the connection: no read or write blocks longer.
        timeout = lim.socket_timeout_s

        def handle_one_request(self) -> None:
            # Between requests a keep-alive connection waits at most idle_timeout_s for the next one.
            self.connection.settimeout(lim.idle_timeout_s)
            self._in_request = False
            try:
                super().handle_one_request()
            except TimeoutError:
                self.close_connection = True

        def parse_request(self) -> bool:
            self._in_request = True
            self.connection.settimeout(lim.socket_timeout_s)  # the request line arrived: normal timeouts
            return super().parse_request()

        def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            if not getattr(self, "_in_request", True) and format.startswith("Request timed out"):
                return  # an idle keep-alive connection closed on time: routine, not an error
            super().log_error(format, *args)

        def _send(self, status: int, obj: dict[str, Any], close: bool = False) -> None:
            data = json.dumps(obj).encode()
            if close:  # an unread body must not be parsed as the next request
                self.close_connection = True
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self, close: bool = False) -> bool:
            if api_key is None or _auth_ok(self.headers.get("Authorization"), api_key):
                return True
            self._send(401, RequestError("missing or wrong API key (Authorization: Bearer ...)", status=401,
                                         err_type="authentication_error").body(), close=close)
            return False

        def _read_body(self, length: int) -> bytes | None:
            """The body, or ``None`` after answering 408 when it does not arrive within request_timeout_s."""
            deadline = time.monotonic() + lim.request_timeout_s
            chunks: list[bytes] = []
            got = 0
            try:
                while got < length:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self.connection.settimeout(min(left, lim.socket_timeout_s))
                    chunk = self.rfile.read1(min(length - got, 1 << 16))
                    if not chunk:  # the client closed the connection mid-body
                        self.close_connection = True
                        return None
                    chunks.append(chunk)
                    got += len(chunk)
            except TimeoutError:
                self._send(408, RequestError(f"request body not received within {lim.request_timeout_s:g} s "
                                             f"({got} of {length} bytes)", status=408).body(), close=True)
                return None
            finally:
                self.connection.settimeout(lim.socket_timeout_s)
            return b"".join(chunks)

        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                self._send(200, {"status": "ok"})
            elif path == "/v1/models":
                if self._authorized():
                    self._send(200, server.models())
            else:
                self._send(404, RequestError(f"no route GET {path}", status=404, err_type="NotFoundError").body())

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0].rstrip("/")
            length = self.headers.get("Content-Length")
            routes = {"/v1/chat/completions": server.chat_completion}
            if allow_reload:
                routes["/v1/load_checkpoint"] = server.load_checkpoint
            # Route and API key first: nothing of an unauthorised request's body is read.
            if path not in routes:
                hint = " (start the server with --allow-reload)" if path == "/v1/load_checkpoint" else ""
                self._send(404, RequestError(f"no route POST {path}{hint}", status=404,
                                             err_type="NotFoundError").body(), close=length not in (None, "0"))
                return
            if not self._authorized(close=length not in (None, "0")):
                return
            if length is None or not length.isdigit():
                self._send(411, RequestError("Content-Length required", status=411).body(), close=True)
                return
            if int(length) > lim.max_request_bytes:
                self._send(413, RequestError(f"request body of {length} bytes exceeds the limit of "
                                             f"{lim.max_request_bytes}", status=413).body(), close=True)
                return
            raw = self._read_body(int(length))
            if raw is None:
                return
            try:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise RequestError(f"request body is not valid JSON: {exc}") from None
                self._send(200, routes[path](body))
            except RequestError as exc:
                self._send(exc.status, exc.body())
            except Exception as exc:  # answer 500 instead of dropping the connection; keep the trace
                traceback.print_exc()
                self._send(500, RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                             err_type="server_error").body())

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            if not quiet:
                sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    return Handler


class PooledHTTPServer(HTTPServer):
    """An HTTP server with a listen backlog and a fixed pool of worker threads.

    ``ThreadingHTTPServer`` starts a thread per connection with a listen backlog of 5: under a
    burst the kernel resets connections it cannot queue, and idle connections hold threads
    for ever. Here the backlog is ``limits.backlog``, connections are served by
    ``limits.workers`` threads, and beyond ``limits.max_queued`` waiting connections a new one
    is answered 503 (with ``Retry-After``) at once rather than dropped.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], limits: HTTPLimits) -> None:
        self.request_queue_size = limits.backlog  # read by server_activate() -> listen()
        self.limits = limits
        self._pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="vlmr1-serve")
        self._pending = 0
        self._pending_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Queue the connection for a worker, or answer 503 when too many are already waiting."""
        with self._pending_lock:
            full = self._pending >= self.limits.workers + self.limits.max_queued
            if not full:
                self._pending += 1
        if full:
            self._reject(request)
            return
        self._pool.submit(self._work, request, client_address)

    def _work(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._pending_lock:
                self._pending -= 1

    def _reject(self, request: Any) -> None:
        body = json.dumps(RequestError("server overloaded: too many connections waiting; retry later", status=503,
                                       err_type="server_error").body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def server_close(self) -> None:
        """Close the socket and stop the workers (running requests are not waited for)."""
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_http_server(server: ModelServer, host: str = "127.0.0.1", port: int = 8000, *,
                     api_key: str | None = None, quiet: bool = False,
                     max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                     allow_reload: bool = False, limits: HTTPLimits | None = None) -> PooledHTTPServer:
    """Bind a pooled HTTP server (port 0 picks a free port; see ``.server_address``)."""
    lim = limits or HTTPLimits(max_request_bytes=max_request_bytes)
    return PooledHTTPServer((host, port), make_handler(server, api_key=api_key, quiet=quiet,
                                                       allow_reload=allow_reload, limits=lim), lim)


class ServerProcess:
    """``python -m core.serve`` as a child process on a free loopback port (tests, evaluation scripts).

    Use as a context manager; ``url`` is the ``.../v1`` base URL once the server is ready::

        with ServerProcess(ckpt, ["--plugins", "qwen-vl"]) as srv:
            httpx.post(srv.url + "/chat/completions", json=...)

    On Linux the child is terminated when the thread that started it ends (``PR_SET_PDEATHSIG``),
    so a killed test run leaves no server behind: start it from a long-lived thread.
    """

    def __init__(self, checkpoint: str | Path, args: Sequence[str] = (), *, host: str = "127.0.0.1",
                 startup_timeout: float = 180.0, env: dict[str, str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "core.serve", str(checkpoint), "--host", host, "--port", "0",
                    "--quiet", *args]
        self.startup_timeout = startup_timeout
        self.env = env
        self.proc: Any = None
        self.url = ""
        self.banner = ""

    def start(self) -> ServerProcess:
        """Start the child and wait (bounded) for its ``vlmr1 serve: ... on http://...`` line."""
        import queue
        import re
        import subprocess

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        lines: queue.Queue[str | None] = queue.Queue()
        stderr_tail: deque[str] = deque(maxlen=50)

        def pump(stream: Any, sink: Any) -> None:
            for line in stream:
                sink(line)
            if stream is self.proc.stdout:
                lines.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout, lines.put), daemon=True).start()
        # stderr is drained continuously so a chatty child never blocks on a full pipe.
        threading.Thread(target=pump, args=(self.proc.stderr, stderr_tail.append), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                line = ""
            if line is None or remaining <= 0:
                self.stop()
                why = "exited" if line is None else f"did not start within {self.startup_timeout:.0f} s"
                raise RuntimeError(f"core.serve {why} (command: {' '.join(self.cmd)}); stderr:\n"
                                   + "".join(stderr_tail))
            m = re.search(r"on (http://\S+/v1)$", line.strip())
            if m:
                self.banner, self.url = line.strip(), m.group(1)
                return self

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the child (kill it if it does not exit within ``timeout``)."""
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when its parent dies, so a killed test run leaves no server behind."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m core.serve", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a transformers checkpoint folder (config.json, weights, processor)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; the URL is printed)")
    p.add_argument("--family", help="model family name (default: chosen by config.model_type)")
    p.add_argument("--family-options", default="{}", help="JSON options of the model family, e.g. max_pixels")
    p.add_argument("--plugins", help="comma-separated plugin distributions to load (default: all)")
    p.add_argument("--device", default="auto", help="device name (default: auto = best usable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--attn-implementation", help="attention kernel (default: the device's best for the dtype)")
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the folder name)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted")
    p.add_argument("--max-n", type=int, default=64, help="largest n accepted")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="largest prompt text, in tokens")
    p.add_argument("--max-images", type=int, default=8, help="most images per request")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="most pixels per image, checked before decoding (default 4096x4096)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="largest request body")
    p.add_argument("--workers", type=int, default=64, help="HTTP worker threads (connections served at once)")
    p.add_argument("--backlog", type=int, default=128, help="listen backlog (connections the kernel queues)")
    p.add_argument("--max-queued", type=int, default=512, help="connections waiting for a worker before 503")
    p.add_argument("--idle-timeout", type=float, default=5.0, help="seconds an idle keep-alive connection is kept")
    p.add_argument("--socket-timeout", type=float, default=30.0, help="seconds any socket read/write may block")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds for a request body to arrive")
    p.add_argument("--queue-timeout", type=float, default=300.0, help="seconds a request waits for the model")
    p.add_argument("--api-key-env", help="name of an environment variable holding a key clients must send")
    p.add_argument("--allow-reload", action="store_true",
                   help="enable POST /v1/load_checkpoint (loads any local path: keep the server private)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint, bind, print the URL and serve until interrupted."""
    from core.config import ConfigError
    from core.plugins import PluginError

    args = parse_args(argv)
    try:
        family_options = json.loads(args.family_options)
    except ValueError as exc:
        print(f"error: --family-options is not valid JSON: {exc}", file=sys.stderr)
        return 2
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: --api-key-env {args.api_key_env}: that variable is not set", file=sys.stderr)
            return 2
    for name in ("max_prompt_tokens", "max_images", "max_image_pixels", "max_request_bytes", "workers", "backlog"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    for name in ("idle_timeout", "socket_timeout", "request_timeout", "queue_timeout"):
        if not getattr(args, name) > 0:
            print(f"error: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}", file=sys.stderr)
            return 2
    limits = ServerLimits(args.default_max_tokens, args.max_tokens_limit, args.max_n, args.max_prompt_tokens,
                          args.max_images, args.max_image_pixels, args.queue_timeout)
    http_limits = HTTPLimits(args.max_request_bytes, args.idle_timeout, args.socket_timeout, args.request_timeout,
                             args.workers, args.backlog, max(0, args.max_queued))
    try:
        server = ModelServer.from_checkpoint(
            args.checkpoint, family=args.family, family_options=family_options, plugins=args.plugins,
            device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
            model_id=args.model_name, limits=limits)
    except (ConfigError, PluginError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        httpd = make_http_server(server, args.host, args.port, api_key=api_key, quiet=args.quiet,
                                 allow_reload=args.allow_reload, limits=http_limits)
    except OSError as exc:
        print(f"error: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    host, port = httpd.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it may use it",
              file=sys.stderr)
    # Tests and scripts wait for this line (with the real port when --port 0 was given).
    print(f"vlmr1 serve: model {server.model_id} ({server.family.name}, {server.device}) "
          f"on http://{host}:{port}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
