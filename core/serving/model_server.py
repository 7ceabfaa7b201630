"""The OpenAI chat-completions semantics over one loaded checkpoint, without HTTP.

:class:`ModelServer` validates a request body against every limit (4xx naming the limit),
converts the OpenAI messages (:mod:`core.interfaces.openai_messages`: base64 ``data:`` images
only, never a URL fetch or a file open), takes a guided choice (vLLM's
``structured_outputs: {"choice": [...]}`` or ``guided_choice``) as the built-in engine's
``choices`` option, queues the generation on the
:class:`~core.serving.batching.Batcher` and shapes the answer: a ``chat.completion`` object, or
for ``stream: true`` the ``chat.completion.chunk`` objects of a server-sent-event stream. It
is called from worker threads (the ASGI app runs it in a thread pool), so it is testable with
no server at all.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from core.interfaces import RequestError, SamplingParams, openai_to_chat_messages
from core.runtime.data_limits import special_tokens_pattern
from core.serving.batching import Batcher, Generated, Job, TokenStreamer

if TYPE_CHECKING:
    from core.interfaces import Device
    from core.runtime.loader import ModelBundle


class StreamOptions(BaseModel):
    """``stream_options`` of a request (OpenAI's; other keys are ignored)."""

    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


#: Smallest non-zero temperature: below it the logits divided by it overflow to inf and sampling
#: fails (vLLM clamps to the same value; here it is a 400, never a silent change).
MIN_TEMPERATURE = 0.01


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions request this server honours (others are ignored).

    Every value a generation cannot take safely is refused here (400 naming the field), never
    found by ``generate``: integers are strict (``true`` is not ``1``), floats finite, the
    seed fits torch's 64 bits, and temperature and repetition penalty stay where the scaled
    logits cannot overflow.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None
    messages: list[Any]
    #: 0 = greedy; otherwise at least :data:`MIN_TEMPERATURE`.
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=0)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0)
    #: Strict: the HTTP layer picks the streamed answer by ``stream is True``.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    logprobs: StrictBool | None = None
    #: vLLM's extension: each choice carries the generated ``token_ids`` (EOS included).
    return_token_ids: StrictBool = False
    #: Guided choice, as vLLM >= 0.10.2 takes it: ``{"choice": [...]}`` (other kinds are refused).
    structured_outputs: dict[str, Any] | None = None
    #: Guided choice, as vLLM before 0.12 takes it (the same constraint).
    guided_choice: list[str] | None = None
    #: Other constraints vLLM knows; named here only to refuse them (never ignored silently).
    guided_json: Any = None
    guided_regex: Any = None
    guided_grammar: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {value}")
        return value


@dataclass
class ServerLimits:
    """Per-request bounds (each breach is a 4xx naming the limit) and the wait for the model."""

    default_max_tokens: int = 256
    max_tokens: int = 4096
    max_n: int = 64
    #: Tokens of the rendered prompt text (image placeholders count once, before expansion).
    max_prompt_tokens: int = 8192
    max_images: int = 8
    #: Pixels per image, checked from the header before decoding (16 Mpx = 4096 x 4096).
    max_image_pixels: int = 4096 * 4096
    #: Seconds a request waits in the queue for the model before a 503.
    queue_timeout_s: float = 300.0
    #: Strings in a request's guided choice (``structured_outputs.choice`` / ``guided_choice``).
    max_choices: int = 1024
    #: Tokens one request may have generated: ``n`` x ``max_tokens`` when sampling, ``max_tokens``
    #: when greedy (one completion, repeated ``n`` times). Bounds how long one request holds the model.
    max_request_tokens: int = 16384


def load_for_serving(path: str | Path, *, family: str | None = None, family_options: dict | None = None,
                     plugins: str | None = None, device: str = "auto", dtype: str = "auto",
                     attn_implementation: str | None = None,
                     verify_hashes: bool = True) -> tuple[ModelBundle, Device, Any]:
    """Resolve the family (``family`` or ``config.model_type``) and the device, then load through the one loader.

    A vlmr1 checkpoint is verified against its manifest before anything else (hashes unless ``verify_hashes``
    is false).

    Returns the loader's :class:`~core.runtime.loader.ModelBundle`, the device and its torch device.
    Dtype and attention kernel follow :func:`core.runtime.loader.resolve_dtype` (the rule training uses).
    """
    from core.config import ConfigError, format_validation_error
    from core.plugins import PluginHost
    from core.plugins.plan import pick_device, registry_family_for
    from core.runtime.checkpoint import verify_checkpoint
    from core.runtime.loader import load_checkpoint

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"checkpoint {path}: no config.json there (is it a transformers checkpoint folder?)")
    verify_checkpoint(path, hashes=verify_hashes)
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
        raise ConfigError(f"--family-options for {fam_entry.qualified}: "
                          f"{format_validation_error(exc)}") from None
    dev_entry, _ = pick_device(registry, device)
    dev = dev_entry.cls()
    torch_device = dev.torch_device(0)
    bundle = load_checkpoint(path, fam, dev, dtype=dtype, attn_implementation=attn_implementation,
                             torch_device=torch_device, verify_hashes=False)  # verified above
    return bundle, dev, torch_device


class ModelServer:
    """A loaded checkpoint answering chat-completion requests (HTTP-free, so it is testable alone).

    Thread-safe: any number of threads may call :meth:`chat_completion` at once; generation
    happens on the :class:`~core.serving.batching.Batcher`'s one thread, in batches.
    """

    def __init__(self, model: Any, processor: Any, family: Any, device: Any, model_id: str,
                 limits: ServerLimits | None = None, *, suppressed: list[int] | None = None,
                 max_batch_size: int = 8, batch_wait_s: float = 0.005, device_spec: Device | None = None) -> None:
        self.family, self.device = family, device
        #: The :class:`~core.interfaces.Device` the model was loaded for (reloads go through the loader with it).
        self.device_spec = device_spec
        self.model_id = model_id
        self.limits = limits or ServerLimits()
        self.created = int(time.time())
        self.loaded_checkpoint: str | None = None
        if suppressed is None:
            suppressed = family.suppressed_token_ids(processor, model)
        self.batcher = Batcher(model, processor, family, device, suppressed,
                               max_batch_size=max_batch_size, max_wait_s=batch_wait_s)
        self._count_tok_lock = threading.Lock()
        self._count_tok = self._counting_tokenizer(processor)
        self._special_tokens = special_tokens_pattern(processor)

    @staticmethod
    def _counting_tokenizer(processor: Any) -> Any:
        """A private copy of the tokenizer for the prompt-length check in request threads.

        A fast tokenizer refuses concurrent calls that change its padding state ("Already
        borrowed"), and the model thread pads batches: the copy keeps the two apart.
        """
        return copy.deepcopy(getattr(processor, "tokenizer", processor))

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, family: str | None = None, family_options: dict | None = None,
                        plugins: str | None = None, device: str = "auto", dtype: str = "auto",
                        attn_implementation: str | None = None, model_id: str | None = None,
                        limits: ServerLimits | None = None, max_batch_size: int = 8,
                        batch_wait_s: float = 0.005, verify_hashes: bool = True) -> ModelServer:
        """Load ``path`` (see :func:`load_for_serving`) and serve it as ``model_id`` (default: the folder name)."""
        bundle, dev, torch_device = load_for_serving(path, family=family, family_options=family_options,
                                                     plugins=plugins, device=device, dtype=dtype,
                                                     attn_implementation=attn_implementation,
                                                     verify_hashes=verify_hashes)
        return cls(bundle.model, bundle.processor, bundle.family, torch_device, model_id or Path(path).resolve().name,
                   limits, suppressed=bundle.suppressed, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s,
                   device_spec=dev)

    @property
    def model(self) -> Any:
        """The model now served (a reload replaces it)."""
        return self.batcher.model

    @property
    def processor(self) -> Any:
        return self.batcher.processor

    def close(self) -> None:
        """Stop the model thread (queued requests get 503)."""
        self.batcher.close()

    # ---- endpoints ---------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        """``GET /v1/models``."""
        return {"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "vlmr1"}]}

    def stats(self) -> dict[str, Any]:
        """``GET /stats``: the batcher's counters (requests, generate calls, batched requests, ...)."""
        return {"model": self.model_id, **self.batcher.stats()}

    def load_checkpoint(self, body: Any) -> dict[str, Any]:
        """``POST /v1/load_checkpoint``: load ``body["checkpoint"]`` and swap it in between batches.

        The new weights load through the one loader with the current model's dtype and attention
        kernel while requests keep being served, then replace model and processor at once.
        """
        import torch

        from core.runtime.loader import load_checkpoint

        path = body.get("checkpoint") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise RequestError("checkpoint: a checkpoint folder path is required", param="checkpoint")
        if not (Path(path) / "config.json").is_file():
            raise RequestError(f"checkpoint: no config.json in {path}", param="checkpoint")
        if self.device_spec is None:
            raise RequestError("checkpoint: this server was built from a loaded model (not from_checkpoint), "
                               "so it has no device to load for", status=501, param="checkpoint",
                               err_type="server_error")
        current = self.model
        first = next(iter(current.parameters()), None)
        dtype = str(first.dtype if first is not None else torch.float32).removeprefix("torch.")
        attn = getattr(getattr(current, "config", None), "_attn_implementation", None)
        from core.runtime.checkpoint import CheckpointError

        try:
            bundle = load_checkpoint(path, self.family, self.device_spec, dtype=dtype, attn_implementation=attn,
                                     torch_device=self.device)
        except CheckpointError as exc:  # incomplete, altered or with unlisted files: the caller's input
            raise RequestError(f"checkpoint: {exc}", param="checkpoint") from None
        except Exception as exc:
            raise RequestError(f"checkpoint: cannot load {path}: {type(exc).__name__}: {exc}", status=500,
                               param="checkpoint", err_type="server_error") from exc
        count_tok = self._counting_tokenizer(bundle.processor)
        self.batcher.swap(bundle.model, bundle.processor, bundle.suppressed)
        with self._count_tok_lock:
            self._count_tok = count_tok
        self._special_tokens = special_tokens_pattern(bundle.processor)
        self.loaded_checkpoint = path
        return {"status": "ok", "checkpoint": path, "model": self.model_id}

    def chat_completion(self, body: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions`` without ``stream``: validate, queue, wait, answer."""
        req, job = self._prepare(body)
        if req.stream:  # the HTTP layer sends these to chat_completion_stream
            raise RequestError("stream: streamed requests go to chat_completion_stream", param="stream")
        self.batcher.submit(job)
        res = self.batcher.result(job, self.limits.queue_timeout_s)
        # Greedy: one completion was generated for the n identical answers.
        completions = res.completions if job.sampling.do_sample else res.completions * req.n
        choices = []
        for i, c in enumerate(completions):
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": _finish_reason(c),
            }
            if req.return_token_ids:
                choice["token_ids"] = list(c.ids)
            choices.append(choice)
        out: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": choices,
            "usage": _usage(res, sum(len(c.ids) for c in completions)),
        }
        if req.return_token_ids:
            out["prompt_token_ids"] = res.prompt_ids
        return out

    def chat_completion_stream(self, body: Any) -> Iterator[dict[str, Any]]:
        """``POST /v1/chat/completions`` with ``stream: true``: the ``chat.completion.chunk`` objects.

        Validation and the wait for the model happen here, before the first chunk, so a bad
        request or a full queue is still an HTTP error rather than an event in a 200 stream.
        Text deltas arrive as the model generates them; the last chunk carries
        ``finish_reason``, and with ``stream_options.include_usage`` one more carries ``usage``.
        Closing the iterator early stops the generation at the next token.
        """
        req, job = self._prepare(body)
        if req.n != 1:
            raise RequestError(f"n: streaming supports n=1 only, got {req.n}", param="n")
        if req.return_token_ids:
            raise RequestError("return_token_ids: not supported with stream", param="return_token_ids")
        job.streamer = TokenStreamer(getattr(self.processor, "tokenizer", self.processor))
        self.batcher.submit(job)
        self.batcher.wait_started(job, self.limits.queue_timeout_s)
        usage = req.stream_options is not None and req.stream_options.include_usage
        return self._chunks(job, usage)

    def _chunks(self, job: Job, include_usage: bool) -> Iterator[dict[str, Any]]:
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model_id}
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    **extra}

        yield chunk({"role": "assistant", "content": ""})
        sent = []
        try:
            for delta in job.streamer:
                sent.append(delta)
                yield chunk({"content": delta})
        finally:  # closed early (the client went away): stop generating for nobody
            job.streamer.cancel()
        res: Generated = job.future.result()  # raises the batch's RequestError if generation failed
        (comp,) = res.completions
        streamed = "".join(sent)
        # The deltas are decoded incrementally; the full decode is the non-streamed answer.
        if comp.text != streamed and comp.text.startswith(streamed):
            yield chunk({"content": comp.text[len(streamed):]})
        yield chunk({}, _finish_reason(comp))
        if include_usage:
            yield {**head, "choices": [], "usage": _usage(res, len(comp.ids))}

    # ---- validation ------------------------------------------------------------------------------
    def _prepare(self, body: Any) -> tuple[ChatRequest, Job]:
        """Check ``body`` against the request model and every limit; the job to generate, not yet queued."""
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")  # a validator's own message
            raise RequestError(f"{loc}: {msg}", param=loc) from None
        if req.model is not None and req.model != self.model_id:
            raise RequestError(f"The model `{req.model}` does not exist; this server serves `{self.model_id}`.",
                               status=404, param="model", err_type="NotFoundError")
        if req.stop:
            raise RequestError("stop: stop sequences are not supported by core.serve (EOS ends a completion)",
                               param="stop")
        if req.logprobs:
            raise RequestError("logprobs: log-probabilities are not returned by core.serve", param="logprobs")
        lim = self.limits
        max_tokens = req.max_completion_tokens or req.max_tokens or min(lim.default_max_tokens, lim.max_tokens)
        if max_tokens > lim.max_tokens:
            raise RequestError(f"max_tokens: {max_tokens} exceeds this server's limit {lim.max_tokens}",
                               param="max_tokens")
        if req.n > lim.max_n:
            raise RequestError(f"n: {req.n} exceeds this server's limit {lim.max_n}", param="n")
        greedy = req.temperature == 0.0
        generated = max_tokens if greedy else req.n * max_tokens  # greedy: one completion, repeated n times
        if generated > lim.max_request_tokens:
            raise RequestError(f"n x max_tokens: {req.n} x {max_tokens} = {generated} tokens to generate exceeds "
                               f"this server's per-request budget of {lim.max_request_tokens} "
                               "(--max-request-tokens)", param="max_tokens")
        choices = self._choices(req, max_tokens)
        messages, images = openai_to_chat_messages(req.messages, max_images=lim.max_images,
                                                   max_pixels=lim.max_image_pixels)
        self._check_text(messages)
        self._check_prompt_length(messages)
        # Greedy decoding gives n identical answers: generate one and repeat it.
        sampling = SamplingParams(
            n=1 if greedy else req.n, max_new_tokens=max_tokens, temperature=req.temperature or 1.0,
            top_p=req.top_p, top_k=req.top_k or None, do_sample=not greedy,
            repetition_penalty=req.repetition_penalty)
        return req, Job(messages, images, sampling, seed=req.seed, choices=choices)

    def _choices(self, req: ChatRequest, max_tokens: int) -> tuple[str, ...] | None:
        """The request's guided choice (``structured_outputs.choice`` or ``guided_choice``), checked.

        Every other constraint (JSON, regex, grammar, a JSON ``response_format``) is a 400: the
        server never answers unconstrained where a constraint was asked for. A choice must fit
        in ``max_tokens`` with its EOS, counted as the built-in engine tokenises it.
        """
        for name in ("guided_json", "guided_regex", "guided_grammar"):
            if getattr(req, name) is not None:
                raise RequestError(f"{name}: not supported by core.serve (guided choice only: "
                                   "structured_outputs.choice or guided_choice)", param=name)
        if req.response_format is not None and req.response_format.get("type", "text") != "text":
            raise RequestError(f"response_format: type {req.response_format.get('type')!r} is not supported by "
                               "core.serve (only 'text'; guided choice: structured_outputs.choice)",
                               param="response_format")
        so = req.structured_outputs
        if so is not None:
            other = sorted(k for k, v in so.items() if k != "choice" and v is not None)
            if other:
                raise RequestError(f"structured_outputs.{other[0]}: not supported by core.serve "
                                   "(only structured_outputs.choice)", param=f"structured_outputs.{other[0]}")
        if so is not None and so.get("choice") is not None and req.guided_choice is not None:
            raise RequestError("guided_choice: give either structured_outputs.choice or guided_choice, not both",
                               param="guided_choice")
        param, choices = ("guided_choice", req.guided_choice) if req.guided_choice is not None else \
            ("structured_outputs.choice", (so or {}).get("choice"))
        if choices is None:
            return None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise RequestError(f"{param}: must be a non-empty list of strings", param=param)
        if len(choices) > self.limits.max_choices:
            raise RequestError(f"{param}: {len(choices)} choices exceed this server's limit of "
                               f"{self.limits.max_choices} (--max-choices)", param=param)
        with self._count_tok_lock:
            lengths = [len(self._count_tok.encode(c, add_special_tokens=False)) + 1 for c in choices]
        n, choice = max(zip(lengths, choices, strict=True))
        if n > max_tokens:
            raise RequestError(f"{param}: {choice!r} is {n} tokens with its EOS, more than max_tokens={max_tokens}",
                               param=param)
        return tuple(choices)

    def _check_text(self, messages: list[dict[str, Any]]) -> None:
        """400 for text the tokenizer would not read as text: the model's special tokens, lone surrogates.

        A special token typed in a message (``<|image_pad|>``, ``<|im_start|>``) would be read
        as that token: an image placeholder without its image fails the generation, a turn
        marker rewrites the conversation's structure.
        """
        special = self._special_tokens
        for i, m in enumerate(messages):
            for p in m["content"]:
                text = p.get("text") if p.get("type") == "text" else None
                if not text:
                    continue
                found = special.search(text) if special is not None else None
                if found:
                    raise RequestError(f"messages[{i}]: the text holds {found.group()!r}, a special token of this "
                                       "model; special tokens are not accepted in message text", param=f"messages[{i}]")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise RequestError(f"messages[{i}]: the text holds a lone UTF-16 surrogate, which is not valid "
                                       "Unicode", param=f"messages[{i}]") from None

    def _check_prompt_length(self, messages: list[dict[str, Any]]) -> None:
        """400 when the prompt text has more than ``max_prompt_tokens`` tokens, before the model is touched.

        A text too long to be under the limit even at 32 characters per token is refused
        without tokenizing it.
        """
        limit = self.limits.max_prompt_tokens
        text = "\n".join(p.get("text", "") for m in messages for p in m["content"] if p.get("type") == "text")
        if len(text) > 32 * limit:
            raise RequestError(f"messages: the prompt text of {len(text)} characters exceeds this server's limit of "
                               f"{limit} prompt tokens (--max-prompt-tokens)", param="messages")
        with self._count_tok_lock:
            n = len(self._count_tok(text, add_special_tokens=False)["input_ids"])
        if n > limit:
            raise RequestError(f"messages: the prompt text is {n} tokens, over this server's limit of {limit} "
                               "(--max-prompt-tokens)", param="messages")


def _finish_reason(c: Any) -> str:
    return "length" if c.truncated else "stop"


def _usage(res: Generated, completion_tokens: int) -> dict[str, int]:
    n_prompt = len(res.prompt_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": completion_tokens,
            "total_tokens": n_prompt + completion_tokens}
