"""The OpenAI-compatible server as a library: one checkpoint behind ``/v1/chat/completions``.

Run it with ``python -m core.serve CHECKPOINT`` (the app); use it from Python as::

    from core.serving import ModelServer, serve

    server = ModelServer.from_checkpoint("runs/x/checkpoint-500")
    serve(server, "127.0.0.1", 8000)          # or ThreadedServer(server) in a test

Three layers, each usable alone:

- :class:`ModelServer` (:mod:`~core.serving.model_server`): the OpenAI request semantics and
  every per-request limit, without HTTP; loads through :mod:`core.runtime.loader`.
- :class:`Batcher` (:mod:`~core.serving.batching`): the one thread that owns the model and
  batches compatible requests that arrive together into one ``generate`` call.
- :func:`create_app` / :func:`serve` / :class:`ThreadedServer` (:mod:`~core.serving.asgi`): the
  FastAPI app on uvicorn, with the connection limits of :class:`HTTPLimits` and streaming
  (server-sent events). FastAPI and uvicorn come with ``pip install 'vlmr1[serve]'`` and are
  imported only when an app is built, so this package imports without them.

:class:`ServerProcess` runs ``python -m core.serve`` as a child process (tests, scripts).
"""

from core.serving.asgi import DEFAULT_MAX_REQUEST_BYTES, HTTPLimits, ThreadedServer, bind, create_app, serve
from core.serving.batching import Batcher, Generated, Job, QueueTimeout, TokenStreamer
from core.serving.model_server import ChatRequest, ModelServer, ServerLimits, load_for_serving
from core.serving.process import ServerProcess

#: The modules ``python -m core.serve`` needs beyond core (the ``serve`` extra).
SERVE_MODULES = ("fastapi", "uvicorn")

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "SERVE_MODULES",
    "Batcher",
    "ChatRequest",
    "Generated",
    "HTTPLimits",
    "Job",
    "ModelServer",
    "QueueTimeout",
    "ServerLimits",
    "ServerProcess",
    "ThreadedServer",
    "TokenStreamer",
    "bind",
    "create_app",
    "load_for_serving",
    "serve",
]
