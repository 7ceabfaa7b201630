"""The ``openai_server`` rollout engine: completions from an OpenAI-compatible chat server.

Works with any server that speaks ``POST /v1/chat/completions`` with image parts (xLLM,
``vllm serve``, SGLang, ``python -m core.serve``). Each prompt's chat messages go to the
server with their images inlined as base64 data URLs, in place; the server renders its own
chat template (for the same checkpoint it is the family's template).

Requests run concurrently (a thread pool over one pooled ``httpx`` client), each with a
connect and a read timeout, and are retried with exponential backoff on connection errors,
timeouts, HTTP 408/425/429/5xx and unreadable answers. Other 4xx answers are not retried.
When retries are exhausted a :class:`ServerError` names the URL and the last failure.

Token ids: where the server returns the generated ``token_ids`` (vLLM's
``return_token_ids`` extension, and ``core.serve``) they are used as they are. Otherwise the
returned text is re-tokenised with the policy's tokenizer (``RolloutContext.processor``),
plus the EOS token when ``finish_reason == "stop"``. Re-tokenising is a CAVEAT for training:
byte-level BPE may split the same text differently from the sampled token path (and text
decoded from partial UTF-8 sequences does not round-trip), so the log-probabilities the
trainer computes are those of a canonical tokenisation of the sampled text, not of the
sampled tokens themselves. Prefer a server that returns token ids for RL.

Guided choice: with ``choices`` every request carries vLLM's constraint, as
``structured_outputs: {"choice": [...]}`` (vLLM >= 0.10.2 and ``core.serve``; the default) or as
``guided_choice: [...]`` (``choice_field: guided_choice``: vLLM before 0.12, ``core.serve``), so
a config whose built-in ``rollout.options.choices`` constrained training evaluates the same way
through a server. A server that does not know the field it got may ignore it and answer free
text: a stopped answer that is none of the choices is a :class:`ServerError` naming the field.

Weights: the server holds its own copy. ``refresh_every: K`` saves the policy every K calls
of :meth:`~OpenAIServerRollout.sync_weights` (one per optimizer step) and runs the
``reload_command`` and/or POSTs to ``reload_url`` so the server loads it; rollouts are then
off-policy by at most K-1 optimizer steps (never more than K). Without ``refresh_every`` the
server's weights are never refreshed: use that for evaluation only.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.interfaces import (
    Completion,
    PromptInput,
    RolloutContext,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    chat_to_openai_messages,
    eos_token_ids,
)

log = logging.getLogger(__name__)

#: HTTP statuses worth retrying: timeouts, rate limits and server-side failures.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class ServerError(RolloutError):
    """The server could not produce an answer (after the allowed retries, or it refused the request)."""


class RequestRejected(ServerError):
    """The server refused the request with a non-retryable HTTP status (4xx)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying (after ``retry_after`` seconds at least)."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIServerRollout(RolloutEngine):
    """Rollouts (or evaluation answers) from an OpenAI-compatible chat-completions server."""

    name = "openai_server"
    description = "OpenAI-compatible chat server (xLLM, vllm serve, SGLang, core.serve); images as data URLs"

    class Options(BaseModel):
        """Options of the ``openai_server`` rollout engine (``rollout.options`` in the run config)."""

        model_config = ConfigDict(extra="forbid")
        base_url: str = Field(description="server root or its /v1 URL, e.g. http://127.0.0.1:8000/v1")
        model: str | None = Field(None, description="model id to request (default: the first of GET /v1/models)")
        api_key_env: str | None = Field(None, description="environment variable holding the API key, if any")
        timeout_s: float = Field(300.0, gt=0, description="read/write timeout of one request")
        connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout")
        max_retries: int = Field(3, ge=0, description="retries after the first attempt")
        backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")
        backoff_max_s: float = Field(8.0, ge=0, description="cap of one retry delay (also of Retry-After)")
        concurrency: int = Field(16, ge=1, description="requests in flight at once")
        use_n: Literal["auto", "always", "never"] = Field(
            "auto", description="send n per request; auto falls back to repeated requests if the server "
                                "refuses n>1 or returns fewer choices")
        image_format: Literal["png", "jpeg"] = Field("png", description="png is lossless (same pixels as local)")
        request_token_ids: bool = Field(True, description="ask for vLLM-style token_ids (return_token_ids)")
        send_seed: bool = Field(True, description="send each prompt's seed (PromptInput.seed) as the request seed")
        extra_body: dict[str, Any] = Field(default_factory=dict,
                                           description="extra request fields, e.g. {'min_p': 0.05}")
        choices: list[str] | None = Field(
            None, min_length=1,
            description="guided choice: every completion is one of these strings then EOS, as the built-in "
                        "engine's choices; sent as choice_field; null = free text")
        choice_field: Literal["structured_outputs", "guided_choice"] = Field(
            "structured_outputs",
            description="how choices travel: structured_outputs = {'structured_outputs': {'choice': [...]}} "
                        "(vLLM >= 0.10.2, core.serve); guided_choice = {'guided_choice': [...]} (vLLM < 0.12, "
                        "core.serve)")
        refresh_every: int | None = Field(None, ge=1, description="K: reload the server's weights every K steps")
        checkpoint_dir: str | None = Field(None, description="where refreshes save the policy (step-N folders)")
        reload_command: str | None = Field(
            None, description="command run after saving; {checkpoint} and {step} are substituted")
        reload_url: str | None = Field(None, description="URL POSTed after saving (body: reload_body)")
        reload_body: dict[str, Any] = Field(
            default_factory=lambda: {"checkpoint": "{checkpoint}"},
            description="JSON body for reload_url; '{checkpoint}'/'{step}' in string values are substituted")
        reload_timeout_s: float = Field(600.0, gt=0, description="limit for the reload command/request and for "
                                                                  "the server to answer /health again")

        @field_validator("base_url", "reload_url")
        @classmethod
        def _http(cls, v: str | None) -> str | None:
            if v is not None and not v.startswith(("http://", "https://")):
                raise ValueError(f"must start with http:// or https://, got {v!r}")
            return v

        @model_validator(mode="after")
        def _refresh_needs_hook(self) -> OpenAIServerRollout.Options:
            if self.refresh_every is not None:
                if not self.checkpoint_dir:
                    raise ValueError("refresh_every needs checkpoint_dir (where the policy is saved for the server)")
                if not (self.reload_command or self.reload_url):
                    raise ValueError("refresh_every needs reload_command or reload_url (how the server loads it)")
            return self

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        root = self.options.base_url.rstrip("/")
        self.root = root[: -len("/v1")] if root.endswith("/v1") else root
        self.chat_url = f"{self.root}/v1/chat/completions"
        self.ctx: RolloutContext | None = None
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._model_id: str | None = self.options.model
        self._n_supported: bool | None = {"always": True, "never": False}.get(self.options.use_n)
        #: Optimizer steps since the server last loaded the policy (its staleness).
        self.steps_since_refresh = 0
        self.steps = 0
        self.refreshes = 0
        self._last_checkpoint: Path | None = None
        self.stats = {"requests": 0, "retries": 0, "n_fallbacks": 0}
        self._stats_lock = threading.Lock()

    # ---- set-up -------------------------------------------------------------------------
    def setup(self, ctx: RolloutContext) -> None:
        """Keep the context (the tokenizer re-tokenises text where the server returns no ids)."""
        self.ctx = ctx
        self._headers()  # fail now, not mid-run, when the API-key variable is missing

    def _headers(self) -> dict[str, str]:
        env = self.options.api_key_env
        if not env:
            return {}
        key = os.environ.get(env)
        if not key:
            raise ServerError(f"rollout.options.api_key_env: environment variable {env} is not set")
        return {"Authorization": f"Bearer {key}"}

    @property
    def client(self) -> Any:
        """The shared ``httpx.Client`` (thread-safe, pooled; created on first use)."""
        with self._client_lock:
            if self._client is None:
                import httpx

                o = self.options
                self._client = httpx.Client(
                    timeout=httpx.Timeout(o.timeout_s, connect=o.connect_timeout_s),
                    limits=httpx.Limits(max_connections=o.concurrency, max_keepalive_connections=o.concurrency),
                    headers=self._headers(),
                    trust_env=False,  # never route a local server through an HTTP proxy from the environment
                )
            return self._client

    def close(self) -> None:
        """Close the HTTP client's connections."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ---- HTTP with retries ----------------------------------------------------------------
    def _request(self, method: str, url: str, body: dict[str, Any] | None = None,
                 check: Any = None) -> dict[str, Any]:
        """One JSON request with bounded retries; ``check(data)`` returns a problem string or None."""
        import httpx

        o = self.options
        attempts = o.max_retries + 1
        last, retry_after = "", 0.0
        for attempt in range(attempts):
            if attempt:
                with self._stats_lock:
                    self.stats["retries"] += 1
                time.sleep(max(min(o.backoff_max_s, o.backoff_s * 2 ** (attempt - 1)), retry_after))
                retry_after = 0.0
            with self._stats_lock:
                self.stats["requests"] += 1
            try:
                return self._attempt(method, url, body, check)
            except _Retry as exc:
                last, retry_after = str(exc), exc.retry_after
            except httpx.TimeoutException as exc:
                last = f"timed out ({type(exc).__name__}; timeout_s={o.timeout_s}, connect_timeout_s=" \
                       f"{o.connect_timeout_s})"
            except httpx.TransportError as exc:
                last = f"connection failed ({type(exc).__name__}: {exc})"
            log.warning("openai_server: %s %s attempt %d/%d failed: %s", method, url, attempt + 1, attempts, last)
        raise ServerError(f"OpenAI-compatible server at {url} failed after {attempts} attempt(s): {last}")

    def _attempt(self, method: str, url: str, body: dict[str, Any] | None, check: Any) -> dict[str, Any]:
        r = self.client.request(method, url, json=body)
        if r.status_code in RETRY_STATUSES:
            ra = r.headers.get("Retry-After", "")
            wait_s = min(float(ra), self.options.backoff_max_s) if ra.replace(".", "", 1).isdigit() else 0.0
            raise _Retry(f"HTTP {r.status_code}: {_snippet(r.text)}", wait_s)
        if r.status_code >= 400:
            raise RequestRejected(f"OpenAI-compatible server at {url} rejected the request: HTTP "
                                  f"{r.status_code}: {_error_message(r)}", r.status_code)
        try:
            data = r.json()
        except ValueError:
            raise _Retry(f"answer is not JSON: {_snippet(r.text)!r}") from None
        problem = check(data) if check else None
        if problem:
            raise _Retry(f"unexpected answer ({problem}): {_snippet(r.text)!r}")
        return data

    def model_id(self) -> str:
        """The model to request: the option, or the first id the server lists."""
        if self._model_id is None:
            url = f"{self.root}/v1/models"

            def check(data: Any) -> str | None:
                ok = isinstance(data, dict) and isinstance(data.get("data"), list) and data["data"] and \
                    isinstance(data["data"][0], dict) and isinstance(data["data"][0].get("id"), str)
                return None if ok else "no model listed under 'data'"

            self._model_id = self._request("GET", url, check=check)["data"][0]["id"]
        return self._model_id

    # ---- generation ---------------------------------------------------------------------
    def build_request(self, prompt: PromptInput, sampling: SamplingParams, n: int) -> dict[str, Any]:
        """The chat-completions body for one prompt (``n`` completions)."""
        greedy = not sampling.do_sample or sampling.temperature == 0
        body: dict[str, Any] = {
            "model": self.model_id(),
            "messages": chat_to_openai_messages(prompt.messages, prompt.images, self.options.image_format),
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if greedy else sampling.temperature,
            "top_p": 1.0 if greedy else sampling.top_p,
            "n": n,
        }
        if sampling.top_k and not greedy:
            body["top_k"] = sampling.top_k
        if sampling.repetition_penalty != 1.0:
            body["repetition_penalty"] = sampling.repetition_penalty
        if self.options.request_token_ids:
            body["return_token_ids"] = True
        if self.options.choices:
            choices = list(self.options.choices)
            body.update({"structured_outputs": {"choice": choices}} if self.options.choice_field == "structured_outputs"
                        else {"guided_choice": choices})
        body.update(self.options.extra_body)
        return body

    def generate(self, prompts: list[PromptInput], sampling: SamplingParams) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt, requested concurrently."""
        n = sampling.n
        bodies = [self.build_request(p, sampling, 1) for p in prompts]
        results: list[list[dict[str, Any]]] = [[] for _ in prompts]
        lock = threading.Lock()

        def unit(i: int, k: int, seed: int | None) -> None:
            got = self._choices(bodies[i], k, seed)
            with lock:
                results[i].extend(got)

        per_request = n if self._n_supported is not False else 1
        # Seeds: the prompt's seed for its first request, +j for the j-th completion asked alone,
        # so repeated single requests do not return the same sample.
        jobs = [(i, per_request, self._seed(prompts[i], j * per_request))
                for i in range(len(prompts)) for j in range(n // per_request)]
        pool = ThreadPoolExecutor(max_workers=min(self.options.concurrency, max(len(jobs), 1)))
        futures: list[Future] = [pool.submit(unit, *job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        # On the first failure, drop queued requests instead of waiting out their retries.
        pool.shutdown(wait=not failed, cancel_futures=bool(failed))
        if failed:
            raise failed[0].exception()
        return [[self._to_completion(c) for c in results[i][:n]] for i in range(len(prompts))]

    def _seed(self, prompt: PromptInput, offset: int) -> int | None:
        return prompt.seed + offset if (self.options.send_seed and prompt.seed is not None) else None

    def _choices(self, body: dict[str, Any], k: int, seed: int | None = None) -> list[dict[str, Any]]:
        """``k`` choices for one prompt: ask for ``n = k``; top up with single requests if the server falls short."""

        def with_seed(b: dict[str, Any], offset: int) -> dict[str, Any]:
            return b if seed is None else {**b, "seed": seed + offset}

        out: list[dict[str, Any]] = []
        try:
            out = self._post_chat(with_seed({**body, "n": k}, 0))
        except RequestRejected as exc:
            if k == 1 or self.options.use_n != "auto" or exc.status not in (400, 422):
                raise
            log.warning("openai_server: %s refused n=%d (%s); falling back to one request per completion",
                        self.chat_url, k, exc)
        if len(out) < k and k > 1:
            if self.options.use_n == "auto" and self._n_supported is not False:
                self._n_supported = False
                with self._stats_lock:
                    self.stats["n_fallbacks"] += 1
            while len(out) < k:
                out.extend(self._post_chat(with_seed({**body, "n": 1}, len(out)))[:1])
        elif k > 1 and self._n_supported is None:
            self._n_supported = True
        return out[:k]

    def _post_chat(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        return self._request("POST", self.chat_url, body, check=_check_chat)["choices"]

    def _to_completion(self, choice: dict[str, Any]) -> Completion:
        """A server choice -> :class:`Completion` (ids from the server, else re-tokenised; see module doc)."""
        text = choice["message"].get("content") or ""
        finish = choice.get("finish_reason")
        self._check_choice(text, finish)
        ids = choice.get("token_ids")
        if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
            ids = self._tokenize(text)
        else:
            ids = list(ids)
        if finish == "stop" and self.ctx is not None:
            eos = self._eos_ids()
            if eos and (not ids or ids[-1] not in eos):
                ids.append(self._eos_token_id(eos))
        return Completion(ids=ids, text=text, truncated=finish == "length")

    def _check_choice(self, text: str, finish: Any) -> None:
        """A finished answer must be one of ``choices``: otherwise the server ignored the constraint."""
        choices = self.options.choices
        if not choices or finish != "stop" or text in choices or text.strip() in {c.strip() for c in choices}:
            return
        field = self.options.choice_field
        other = "guided_choice" if field == "structured_outputs" else "structured_outputs"
        raise ServerError(f"OpenAI-compatible server at {self.chat_url} answered {_snippet(text, 80)!r}, none of "
                          f"rollout.options.choices {choices}: it ignored the guided choice sent as {field!r}. "
                          "vLLM >= 0.12 takes only structured_outputs, vLLM < 0.10.2 only guided_choice (core.serve "
                          f"both); try rollout.options.choice_field={other}")

    def _tokenizer(self) -> Any:
        proc = self.ctx.processor if self.ctx is not None else None
        return getattr(proc, "tokenizer", proc)

    def _tokenize(self, text: str) -> list[int]:
        tok = self._tokenizer()
        if tok is None:
            return []  # evaluation without a processor: text only
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _eos_ids(self) -> set[int]:
        tok = self._tokenizer()
        if tok is None:
            return set()
        return eos_token_ids(self.ctx.model, self.ctx.processor)

    def _eos_token_id(self, eos: set[int]) -> int:
        tok_eos = getattr(self._tokenizer(), "eos_token_id", None)
        return tok_eos if tok_eos in eos else min(eos)

    # ---- weights ------------------------------------------------------------------------
    def sync_weights(self, model: Any) -> None:
        """Count one optimizer step; every ``refresh_every`` steps, have the server load the policy.

        Between refreshes the server samples from weights ``steps_since_refresh`` steps old
        (0 .. K-1): off-policy by at most K-1 <= K steps. Without ``refresh_every`` nothing is
        reloaded (evaluation use).
        """
        self.steps += 1
        self.steps_since_refresh += 1
        k = self.options.refresh_every
        if k is not None and self.steps_since_refresh >= k:
            self.refresh(model)

    def refresh(self, model: Any) -> Path | None:
        """Save the policy to ``checkpoint_dir/step-N`` and run the reload hook(s); return the folder.

        In a multi-process run only rank 0 saves and reloads; every rank waits at a barrier so
        no rank samples before the server has the new weights.
        """
        o = self.options
        if not o.checkpoint_dir:
            raise ServerError("rollout.options.checkpoint_dir is needed to refresh the server's weights")
        rank, barrier = _dist()
        path = Path(o.checkpoint_dir) / f"step-{self.steps:07d}"
        if rank == 0:
            unwrapped = getattr(model, "module", model)
            # A PEFT model saves its adapter only: the server must load adapters (see README).
            unwrapped.save_pretrained(path)
            proc = self.ctx.processor if self.ctx is not None else None
            if proc is not None and hasattr(proc, "save_pretrained"):
                proc.save_pretrained(path)
            self._run_reload_hooks(path)
            if self._last_checkpoint is not None and self._last_checkpoint != path:
                shutil.rmtree(self._last_checkpoint, ignore_errors=True)
            self._last_checkpoint = path
        barrier()
        self.steps_since_refresh = 0
        self.refreshes += 1
        return path if rank == 0 else None

    def _run_reload_hooks(self, path: Path) -> None:
        o = self.options
        fill = {"{checkpoint}": str(path), "{step}": str(self.steps)}

        def sub(text: str) -> str:
            # Plain replacement, not str.format: commands may hold other braces (JSON, Python code).
            for key, value in fill.items():
                text = text.replace(key, value)
            return text

        deadline = time.monotonic() + o.reload_timeout_s
        if o.reload_command:
            cmd = [sub(part) for part in shlex.split(o.reload_command)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=o.reload_timeout_s)
            except subprocess.TimeoutExpired:
                raise ServerError(f"reload_command {cmd} did not finish within {o.reload_timeout_s} s") from None
            except OSError as exc:
                raise ServerError(f"reload_command {cmd} could not run: {exc}") from None
            if proc.returncode != 0:
                raise ServerError(f"reload_command {cmd} exited with {proc.returncode}: "
                                  f"{_snippet(proc.stderr or proc.stdout, 500)}")
        if o.reload_url:
            import httpx

            body = {k: sub(v) if isinstance(v, str) else v for k, v in o.reload_body.items()}
            try:
                r = self.client.post(o.reload_url, json=body, timeout=o.reload_timeout_s)
            except httpx.HTTPError as exc:
                raise ServerError(f"reload_url {o.reload_url} failed: {type(exc).__name__}: {exc}") from None
            if r.status_code >= 300:
                raise ServerError(f"reload_url {o.reload_url} answered HTTP {r.status_code}: {_error_message(r)}")
        self._wait_healthy(deadline)

    def _wait_healthy(self, deadline: float) -> None:
        """Poll ``/health`` until the server answers 200 (a reload may restart it)."""
        import httpx

        url = f"{self.root}/health"
        last = ""
        while True:
            try:
                r = self.client.get(url, timeout=min(5.0, self.options.reload_timeout_s))
                if r.status_code in (200, 404):  # 404: the server has no /health route; it is answering
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise ServerError(f"server at {url} did not become healthy after reloading: {last}")
            time.sleep(0.5)

    def metrics(self) -> dict[str, float]:
        """Counters for the run log (staleness in optimizer steps, requests, retries, refreshes)."""
        with self._stats_lock:
            out = {f"rollout/{k}": float(v) for k, v in self.stats.items()}
        out["rollout/server_staleness_steps"] = float(self.steps_since_refresh)
        out["rollout/refreshes"] = float(self.refreshes)
        return out


# ---- helpers ------------------------------------------------------------------------------------
def _check_chat(data: Any) -> str | None:
    """A problem with a chat-completions answer, or None."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return "no 'choices' list"
    if not data["choices"]:
        return "empty 'choices'"
    for c in data["choices"]:
        if not isinstance(c, dict) or not isinstance(c.get("message"), dict):
            return "a choice has no 'message'"
        content = c["message"].get("content")
        if content is not None and not isinstance(content, str):
            return "a message 'content' is not a string"
    return None


def _snippet(text: str, limit: int = 200) -> str:
    text = (text or "").strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _error_message(r: Any) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the start of the body."""
    try:
        err = r.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return _snippet(r.text)


def _dist() -> tuple[int, Any]:
    """``(rank, barrier)`` of the default torch.distributed group (``(0, no-op)`` when single-process)."""
    # A process group can only exist if torch.distributed was imported: no need to import torch here.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.barrier
    return 0, lambda: None
