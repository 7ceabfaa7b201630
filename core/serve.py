"""Serve a checkpoint: ``python -m core.serve CHECKPOINT [--port 8000] [--api-key-env VAR] [--plugins a,b]``.

An OpenAI-compatible chat-completions server over one checkpoint (needs ``pip install
'vlmr1[serve]'``: FastAPI + uvicorn). ``POST /v1/chat/completions`` takes OpenAI chat messages
with any number of base64 ``data:`` images in place (never URLs or local files), honours
``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``max_tokens`` / ``max_completion_tokens``,
``n``, ``seed``, ``repetition_penalty``, ``stream`` (server-sent events, n=1) and vLLM's
``return_token_ids`` and guided choice (``structured_outputs: {"choice": [...]}`` or
``guided_choice``: the built-in engine's ``choices``); ``GET /v1/models``, ``GET /health``, ``GET /stats``; ``POST
/v1/load_checkpoint`` only with ``--allow-reload``. Requests that arrive together are
generated in one batch (``--max-batch-size``; 1 = one prompt per ``generate`` call).

The server is the library :mod:`core.serving`; this app is its flags. Once listening it prints
``vlmr1 serve: model NAME (FAMILY, DEVICE) on http://HOST:PORT/v1`` (the real port with
``--port 0``). Exit codes as every app (:mod:`core.cli`): 2 for bad input (a checkpoint, flag
or missing extra), 1 for a failure while serving.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# The model thread shares the cores with the threads that read requests and decode images, and
# OpenMP helper threads that spin after every op (libgomp's default) starve them: on 2 cores the
# served rate dropped several-fold at random (docs/serving.md). Passive waiting, unless the user
# set it; it only takes effect here, before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from core.cli import run_app  # noqa: E402 - after the environment is set
from core.serving.asgi import DEFAULT_MAX_REQUEST_BYTES  # noqa: E402

# Kept importable from here for one version; import it from core.serving (nothing imports an app).
from core.serving.process import ServerProcess  # noqa: E402, F401


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m core.serve",
                                description="An OpenAI-compatible chat-completions server over one checkpoint.")
    p.add_argument("checkpoint", help="a transformers checkpoint folder (config.json, weights, processor)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; the URL is printed)")
    p.add_argument("--family", help="model family name (default: chosen by config.model_type)")
    p.add_argument("--family-options", default="{}", help="JSON options of the model family, e.g. max_pixels")
    p.add_argument("--plugins", help="comma-separated plugin distributions to load (default: all)")
    p.add_argument("--device", default="auto", help="device name (default: auto = best usable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = the loader's rule: bfloat16 on an accelerator that has it, else float32")
    p.add_argument("--attn-implementation", help="attention kernel (default: the device's best for the dtype)")
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the folder name)")
    g = p.add_argument_group("per-request limits (a request over one gets a 4xx naming the flag)")
    g.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    g.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted")
    g.add_argument("--max-n", type=int, default=64, help="largest n accepted")
    g.add_argument("--max-prompt-tokens", type=int, default=8192, help="largest prompt text, in tokens")
    g.add_argument("--max-images", type=int, default=8, help="most images per request")
    g.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="most pixels per image, checked before decoding (default 4096x4096)")
    g.add_argument("--max-choices", type=int, default=1024,
                   help="most strings in a request's guided choice (structured_outputs.choice / guided_choice)")
    g.add_argument("--max-request-tokens", type=int, default=16384,
                   help="most tokens one request may have generated: n x max_tokens (greedy: max_tokens)")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="largest request body")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch-size", type=int, default=8,
                   help="most requests per generate call (1 = one prompt per call; see docs: batched greedy "
                        "answers can differ from single ones by float rounding)")
    g.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a lone request waits for others to batch with (ms)")
    g.add_argument("--queue-timeout", type=float, default=300.0, help="seconds a request waits for the model (503)")
    g = p.add_argument_group("connections")
    g.add_argument("--workers", type=int, default=64, help="requests worked on at once (body, validation, generation)")
    g.add_argument("--max-queued", type=int, default=512, help="requests waiting for a worker before 503")
    g.add_argument("--backlog", type=int, default=128, help="listen backlog (connections the kernel queues)")
    g.add_argument("--idle-timeout", type=float, default=5.0,
                   help="seconds a connection may be idle before or between requests (keep-alive)")
    g.add_argument("--head-timeout", type=float, default=10.0,
                   help="seconds the whole request head may take from its first byte (408, connection closed)")
    g.add_argument("--socket-timeout", type=float, default=30.0,
                   help="seconds between two reads of an unfinished request head")
    g.add_argument("--request-timeout", type=float, default=60.0, help="seconds for a request body to arrive (408)")
    p.add_argument("--api-key-env", help="name of an environment variable holding a key clients must send")
    p.add_argument("--allow-reload", action="store_true",
                   help="enable POST /v1/load_checkpoint (loads any local path: keep the server private)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    p.add_argument("--no-verify-hashes", dest="verify_hashes", action="store_false",
                   help="skip the SHA-256 check of a vlmr1 checkpoint's files (faster start on large ones); files "
                        "that are missing, resized or not listed in its manifest are still refused")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Check the flags, load the checkpoint, serve until interrupted."""
    from core.config import ConfigError
    from core.config.extras import require
    from core.serving import SERVE_MODULES, HTTPLimits, ModelServer, ServerLimits, bind, serve

    try:
        family_options = json.loads(args.family_options)
    except ValueError as exc:
        raise ConfigError(f"--family-options is not valid JSON: {exc}") from None
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that variable is not set")
    for name in ("max_prompt_tokens", "max_images", "max_image_pixels", "max_request_bytes", "workers", "backlog",
                 "max_batch_size", "max_choices", "max_request_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("idle_timeout", "socket_timeout", "head_timeout", "request_timeout", "queue_timeout"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.batch_wait_ms < 0:
        raise ConfigError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    if not 0 <= args.port <= 65535:  # socket.bind raised OverflowError, a traceback
        raise ConfigError(f"--port must be 0..65535 (0 = any free port), got {args.port}")
    require(SERVE_MODULES, "serve", "python -m core.serve")
    sock = bind(args.host, args.port)  # before the load: a taken port fails at once
    try:
        server = ModelServer.from_checkpoint(
            args.checkpoint, family=args.family, family_options=family_options, plugins=args.plugins,
            device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
            model_id=args.model_name, max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
            verify_hashes=args.verify_hashes,
            limits=ServerLimits(args.default_max_tokens, args.max_tokens_limit, args.max_n, args.max_prompt_tokens,
                                args.max_images, args.max_image_pixels, args.queue_timeout, args.max_choices,
                                max_request_tokens=args.max_request_tokens))
    except BaseException:
        sock.close()
        raise
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it may use it",
              file=sys.stderr)

    def ready(host: str, port: int) -> None:
        # Tests and scripts wait for this line (with the real port when --port 0 was given).
        print(f"vlmr1 serve: model {server.model_id} ({server.family.name}, {server.device}) "
              f"on http://{host}:{port}/v1", flush=True)

    limits = HTTPLimits(args.max_request_bytes, args.idle_timeout, args.socket_timeout, args.request_timeout,
                        args.workers, args.backlog, max(0, args.max_queued), head_timeout_s=args.head_timeout)
    serve(server, api_key=api_key, allow_reload=args.allow_reload, quiet=args.quiet, on_ready=ready, sock=sock,
          limits=limits)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and serve; the exit code (see the module doc)."""
    args = parse_args(argv)
    return run_app(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
