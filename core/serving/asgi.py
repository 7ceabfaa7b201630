"""The HTTP face of a :class:`~core.serving.ModelServer`: a FastAPI app served by uvicorn.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``),
``GET /v1/models``, ``GET /health`` (no key needed), ``GET /stats`` (the batcher's counters)
and, with ``allow_reload``, ``POST /v1/load_checkpoint``. Every error is an OpenAI-shaped
``{"error": {...}}`` body.

Connection handling is uvicorn's (asyncio: an idle or slow client costs a socket, not a
thread), bounded by :class:`HTTPLimits`: ``workers`` requests are worked on at once (body read,
validation, generation), ``max_queued`` more wait for a slot and beyond that a request gets 503
with ``Retry-After`` at once; the whole request head must arrive within ``head_timeout_s`` of
its first byte and the body within ``request_timeout_s`` (408 each) and be at most
``max_request_bytes`` (413, from ``Content-Length`` before reading); a connection that sends no
request within ``idle_timeout_s`` is closed (uvicorn's keep-alive timeout, here also for fresh
connections). A body is checked for its JSON shape before it is parsed (``max_json_values``,
``max_json_depth``) and at most ``parse_concurrency`` are parsed at once, so parsing cannot
take the server's memory. The API key is checked, in constant time, before the body is read.
FastAPI and uvicorn are the ``vlmr1[serve]`` extra: they are imported when an app is built.
"""

# No ``from __future__ import annotations``: FastAPI reads the route functions' annotations,
# and ``Request`` is imported inside create_app (the extra may be missing at import time).
import asyncio
import hmac
import json
import math
import re
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.interfaces import RequestError

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

#: Largest request body accepted (bytes); a few large base64 images fit.
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20


@dataclass
class HTTPLimits:
    """Connection-level bounds (see the module docstring); the flags of ``python -m core.serve``."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    #: Seconds a connection may stay idle before or between requests (uvicorn's keep-alive timeout).
    idle_timeout_s: float = 5.0
    #: Seconds a connection may take between two reads of an unfinished request head.
    socket_timeout_s: float = 30.0
    #: Seconds the whole request body may take to arrive (408 after that).
    request_timeout_s: float = 60.0
    #: Requests worked on at once (body, validation, waiting for and running generation).
    workers: int = 64
    #: The listen backlog (connections the kernel queues before they are accepted).
    backlog: int = 128
    #: Requests waiting for a worker slot beyond which a new one gets 503 at once.
    max_queued: int = 512
    #: Seconds the whole request head may take from its first byte (then 408 and the connection
    #: closes); also the time the rest of a body the app did not read gets after the response.
    head_timeout_s: float = 10.0
    #: Most JSON values (objects, arrays, items, keys) in a request body, counted before parsing (400).
    max_json_values: int = 100_000
    #: Deepest nesting of JSON objects and arrays in a request body, checked before parsing (400).
    max_json_depth: int = 32
    #: Request bodies parsed at once; others wait (parsing is where a body becomes objects in memory).
    parse_concurrency: int = 2


def _error(exc: RequestError, *, close: bool = False, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    headers = dict(headers or {})
    if close:  # an unread body must not be parsed as the next request, nor read at all
        headers["Connection"] = "close"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


# ---- request bodies: shape limits before parsing ---------------------------------------------------
#: A JSON string, escapes included (possessive: no backtracking on a 60 MB base64 image).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
#: ``bytes.translate`` deletes every byte but the four brackets.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: A ``\\uD800``-``\\uDFFF`` escape: only these can make a string that is not valid Unicode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_json_shape(body: bytes | bytearray, *, max_values: int, max_depth: int) -> None:
    """Refuse (400) a JSON body with more than ``max_values`` values or nesting deeper than ``max_depth``.

    Runs on the raw bytes before ``json.loads``, which would otherwise build every object first:
    60 MB of ``[{},{},...]`` is 20 M dicts, about 1.6 GB, and deep nesting a ``RecursionError``.
    Values are counted as the ``{``, ``[`` and ``,`` outside strings: each container, and each
    item or key/value pair after a container's first, needs one. The common body (a few
    structures, long base64 strings) passes on that count over the raw bytes; only a body over a
    limit there pays for stripping its strings and counting exactly.
    """
    def structural(b: bytes | bytearray) -> int:
        return b.count(b"{") + b.count(b"[") + b.count(b",")

    def too_many(n: int) -> RequestError:
        return RequestError(f"request body: about {n:,} JSON values (objects, arrays, items), more than this "
                            f"server's limit of {max_values:,}")

    openers = body.count(b"{") + body.count(b"[")
    if structural(body) <= max_values and openers <= max_depth:
        return
    # Every string is a key or an item, so there are at least half as many values as strings; the
    # quote count (less the quotes after a backslash) refuses a body of millions of short strings
    # before the regular expression below visits them one by one (13 s for 60 MB of ``"",``).
    strings = (body.count(b'"') - body.count(b'\\"')) // 2
    if strings > 2 * max_values:
        raise too_many(strings // 2)
    bare = _JSON_STRING.sub(b'""', body)
    values = structural(bare)
    if values > max_values:
        raise too_many(values)
    depth = 0
    for c in bare.translate(None, _NOT_BRACKETS):
        depth += 1 if c in b"[{" else -1
        if depth > max_depth:
            raise RequestError(f"request body: JSON nested more than {max_depth} levels deep (this server's limit)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(body: bytes | bytearray, *, max_values: int = 100_000, max_depth: int = 32) -> Any:
    r"""A request body as JSON, with every malformed body a 400 :class:`~core.interfaces.RequestError`.

    Checks the shape first (:func:`check_json_shape`); refuses ``NaN``/``Infinity`` and numbers
    beyond float range (``1e400``), which Python's parser accepts but JSON does not, and strings
    holding a lone UTF-16 surrogate (a ``\ud800`` escape), which no tokenizer can encode.
    """
    check_json_shape(body, max_values=max_values, max_depth=max_depth)
    try:
        obj = json.loads(body, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:  # the shape check makes this unreachable; kept so it can never be a 500
        raise RequestError("request body: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the two refusals above, too many digits
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError("request body: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                               "which is not valid Unicode") from None
    return obj


def _unread_body(request: "Request") -> bool:
    """Whether the request announced a body that has not been read (the connection then closes)."""
    if getattr(request.state, "body_read", False):
        return False
    h = request.headers
    return h.get("content-length", "0") != "0" or "transfer-encoding" in h


def create_app(server: Any, *, api_key: str | None = None, allow_reload: bool = False,
               limits: HTTPLimits | None = None) -> "FastAPI":
    """The ASGI app answering for ``server`` (a :class:`~core.serving.ModelServer`, or any object with its methods)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    lim = limits or HTTPLimits()
    app = FastAPI(title="vlmr1 serve", docs_url=None, redoc_url=None, openapi_url=None)
    # anyio's default pool has 40 threads; each worker slot may need one.
    threads = anyio.CapacityLimiter(lim.workers)
    state: dict[str, Any] = {}

    def slots() -> asyncio.Semaphore:
        if "slots" not in state:  # made in the server's event loop
            state["slots"] = asyncio.Semaphore(lim.workers)
        return state["slots"]

    def parsers() -> asyncio.Semaphore:
        if "parsers" not in state:
            state["parsers"] = asyncio.Semaphore(max(1, lim.parse_concurrency))
        return state["parsers"]

    expected = f"Bearer {api_key}".encode() if api_key is not None else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        got = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(got, expected):
            raise RequestError("missing or wrong API key (Authorization: Bearer ...)", status=401,
                               err_type="authentication_error")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")  # h11 has refused a malformed one already
        if length is not None and length.isdigit() and int(length) > lim.max_request_bytes:
            raise RequestError(f"request body of {length} bytes exceeds the limit of {lim.max_request_bytes}",
                               status=413)
        body = bytearray()  # not a list of chunks and a join: one copy of the body, not two
        got = 0

        async def receive_all() -> None:
            nonlocal got
            async for chunk in request.stream():
                got += len(chunk)
                if got > lim.max_request_bytes:
                    raise RequestError(f"request body exceeds the limit of {lim.max_request_bytes} bytes",
                                       status=413)
                body.extend(chunk)

        try:
            await asyncio.wait_for(receive_all(), lim.request_timeout_s)
        except ClientDisconnect:  # nobody is left to answer; end the request quietly
            raise RequestError("client disconnected before sending the whole body") from None
        except asyncio.TimeoutError:
            raise RequestError(f"request body not received within {lim.request_timeout_s:g} s "
                               f"({got} of {length or '?'} bytes)", status=408) from None
        request.state.body_read = True
        # Off the event loop (a large body takes a second to parse, and connections keep being
        # served meanwhile), and at most parse_concurrency at once: the shape limits bound what
        # one parse builds, this bounds how many build at the same time.
        async with parsers():
            return await anyio.to_thread.run_sync(
                lambda: parse_json_body(body, max_values=lim.max_json_values, max_depth=lim.max_json_depth),
                limiter=threads)

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a worker thread; an unexpected exception is a 500 naming it (trace on stderr)."""
        def call() -> Any:
            try:
                return fn(*args)
            except RequestError:
                raise
            except Exception as exc:
                traceback.print_exc()
                raise RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                   err_type="server_error") from exc

        return await anyio.to_thread.run_sync(call, limiter=threads)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Any:
        return _error(exc, close=_unread_body(request))

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, exc: HTTPException) -> Any:
        path = request.url.path
        hint = " (start the server with --allow-reload)" if path.rstrip("/") == "/v1/load_checkpoint" else ""
        what = "no route" if exc.status_code == 404 else exc.detail
        return _error(RequestError(f"{what} {request.method} {path}{hint}", status=exc.status_code,
                                   err_type="NotFoundError" if exc.status_code == 404 else "invalid_request_error"),
                      close=_unread_body(request))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        authorize(request)
        return JSONResponse(server.models())

    @app.get("/stats")
    async def stats(request: Request) -> Any:
        authorize(request)
        return JSONResponse(server.stats())

    class EventStream(StreamingResponse):
        """Server-sent events from a chunk iterator; holds a worker slot until sent, failed or abandoned."""

        def __init__(self, chunks: Any) -> None:
            super().__init__(self.events(chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.chunks = chunks

        @staticmethod
        async def events(chunks: Any) -> Any:
            done = object()
            try:
                while (chunk := await in_thread(next, chunks, done)) is not done:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except RequestError as exc:  # generation failed after the 200: the error is the last event
                yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                close = getattr(self.chunks, "close", None)
                if close is not None:  # a client that left stops the generation (no next() is running now)
                    close()
                slots().release()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        await slots().acquire()
        stream = None
        try:
            body = await read_json(request)
            if isinstance(body, dict) and body.get("stream") is True:
                stream = EventStream(await in_thread(server.chat_completion_stream, body))
                return stream  # it releases the slot when it is done
            return JSONResponse(await in_thread(server.chat_completion, body))
        finally:
            if stream is None:
                slots().release()

    if allow_reload:
        @app.post("/v1/load_checkpoint")
        async def load_checkpoint(request: Request) -> Any:
            authorize(request)
            async with slots():
                return JSONResponse(await in_thread(server.load_checkpoint, await read_json(request)))

    app.add_middleware(_Admission, limit=lim.workers + lim.max_queued)
    return app


class _Admission:
    """ASGI middleware: beyond ``limit`` requests in the app, answer 503 with ``Retry-After`` at once."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await _error(RequestError("server overloaded: too many requests waiting; retry later", status=503,
                                      err_type="server_error"), close=True,
                         headers={"Retry-After": "1"})(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


# ---- running it ------------------------------------------------------------------------------------
def _protocol_class() -> type:
    """The h11 protocol of uvicorn, with a deadline on every phase of a connection in which the client sends.

    - Before the first request and between requests: ``idle_timeout_s`` (uvicorn's keep-alive
      timer, which uvicorn itself starts only after a first response).
    - The request head: ``head_timeout_s`` from its first byte, whatever the pace of the bytes,
      and ``socket_timeout_s`` at most between two reads; then a 408 and the connection closes.
      uvicorn's timers are per read (each read cancels the keep-alive timer), so a client sending
      one header byte every few seconds held its connection for ever. The head's size is bounded
      by uvicorn's ``h11_max_incomplete_event_size`` (16 KiB).
    - The body while the app reads it: the app's ``request_timeout_s`` (408 from :func:`create_app`).
    - The rest of a body the app answered without reading (``/health`` or a 401 with a trickling
      body): ``head_timeout_s`` after the response, then the connection closes.

    Why a protocol subclass: the protocol is the one place that sees a partial head (h11's state
    and buffer) and every read; an ASGI middleware runs only once the head is complete, and a
    deadline at the asyncio level would have to wrap uvicorn's transport and re-derive the
    HTTP state this class reads from h11.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        socket_timeout_s = 30.0
        head_timeout_s = 10.0
        #: The head or unread-body deadline (never reset by a read, unlike the keep-alive timer).
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._close_after(self.timeout_keep_alive)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                return
            state = self.conn.their_state
            if state is h11.IDLE and self.conn.trailing_data[0]:  # a partial head: wait for the rest, bounded
                if self._deadline is None:
                    self._deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
                self._close_after(self.socket_timeout_s)
            elif not (state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_complete):
                self._cancel_deadline()  # the head is complete (or nothing is pending)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
                self._cancel_deadline()  # the app answered without reading the body: bound the rest
                self._deadline = self.loop.call_later(self.head_timeout_s, self._close)

        def _head_timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            body = json.dumps(RequestError(f"request head not received within {self.head_timeout_s:g} s",
                                           status=408).body()).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self._close()

        def _close(self) -> None:
            self._deadline = None
            self._unset_keepalive_if_required()
            if not self.transport.is_closing():
                self.transport.close()

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _close_after(self, seconds: float) -> None:
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(seconds, self.timeout_keep_alive_handler)

    return Protocol


def bind(host: str, port: int) -> socket.socket:
    """A bound, not yet listening socket for ``host:port`` (port 0 = a free one).

    Bind before loading a model, so a taken port fails in a second rather than after the load;
    a refused address is a :class:`~core.config.ConfigError` (bad input).
    """
    from core.config import ConfigError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot bind {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {host}:{port}: {exc}") from None
    return sock


def _uvicorn_server(app: Any, limits: HTTPLimits, quiet: bool, on_ready: Callable[[], None]) -> Any:
    import uvicorn

    protocol = _protocol_class()
    protocol.socket_timeout_s = limits.socket_timeout_s
    protocol.head_timeout_s = limits.head_timeout_s

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_ready()

    config = uvicorn.Config(app, http=protocol, lifespan="off", backlog=limits.backlog,
                            timeout_keep_alive=limits.idle_timeout_s, timeout_graceful_shutdown=5,
                            log_level="warning" if quiet else "info", access_log=not quiet)
    return Server(config)


def serve(server: Any, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          allow_reload: bool = False, limits: HTTPLimits | None = None, quiet: bool = False,
          on_ready: Callable[[str, int], None] | None = None, sock: socket.socket | None = None) -> None:
    """Serve ``server`` until SIGINT/SIGTERM; ``on_ready(host, port)`` once it accepts connections.

    Listens on ``sock`` (from :func:`bind`) when given, else binds ``host:port`` now; with port 0
    ``on_ready`` gets the port the socket got.
    """
    lim = limits or HTTPLimits()
    sock = sock if sock is not None else bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    srv = _uvicorn_server(create_app(server, api_key=api_key, allow_reload=allow_reload, limits=lim), lim, quiet,
                          lambda: on_ready(bound_host, bound_port) if on_ready else None)
    try:
        srv.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


class ThreadedServer:
    """The HTTP server for ``server`` on a background thread (tests, notebooks); a context manager.

    ``url`` is the ``.../v1`` base URL once started::

        with ThreadedServer(model_server, api_key="k") as srv:
            OpenAI(base_url=srv.url, api_key="k").chat.completions.create(...)
    """

    def __init__(self, server: Any, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
                 allow_reload: bool = False, limits: HTTPLimits | None = None, quiet: bool = True,
                 startup_timeout: float = 60.0) -> None:
        self.limits = limits or HTTPLimits()
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}/v1"
        self.startup_timeout = startup_timeout
        self._ready = threading.Event()
        self._uvicorn = _uvicorn_server(
            create_app(server, api_key=api_key, allow_reload=allow_reload, limits=self.limits),
            self.limits, quiet, self._ready.set)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="vlmr1-serve-http", daemon=True)

    def start(self) -> "ThreadedServer":
        """Start and wait (bounded) until the server accepts connections."""
        self._thread.start()
        if not self._ready.wait(self.startup_timeout):
            self.stop()
            raise RuntimeError(f"the server did not start within {self.startup_timeout:g} s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self._uvicorn.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
