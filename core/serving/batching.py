"""The model worker: one thread owns the model and batches requests that arrive together.

Every request becomes a :class:`Job` on one queue. The worker takes the oldest job, waits up to
``max_wait_s`` for more *compatible* jobs (same sampling settings, no seed, not streamed) up to
``max_batch_size``, renders their prompts with the model family and makes ONE
``engine.generate`` call for all of them, through the built-in
:class:`~core.plugins.builtin.rollout.TransformersRollout` (so a request gets exactly what the
training rollout would generate for it). Under load the queue fills while a batch generates,
so the next batch is taken at once, without waiting.

A request's ``choices`` (guided choice: vLLM's ``structured_outputs.choice`` / ``guided_choice``)
become the built-in engine's ``choices`` option: the worker keeps one engine per choice set
(the last :data:`CHOICE_ENGINES` sets used), so the constraint is the training rollout's own
prefix-constrained decoding, not a second implementation. Only requests with the same choice
set share a batch.

Batching left-pads prompts to one length. The padded positions are masked out, but the matmuls
run on other shapes, so logits differ from a prompt generated alone by float rounding (~1e-7
in float32): identical greedy answers on the tested CPU float32 path, yet a near-tie between
two tokens can flip, more likely in half precision. ``max_batch_size=1`` (``--max-batch-size
1``) restores one prompt per call. Seeded requests always run alone: their samples must not
depend on what else was in the batch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field
from typing import Any

from core.interfaces import Completion, PromptInput, RequestError, RolloutContext, SamplingParams

#: How many choice-constrained engines (one per distinct ``choices`` list) the worker keeps.
CHOICE_ENGINES = 32


@dataclass
class Job:
    """One request's generation: chat turns + images, sampling, and where its answer goes."""

    messages: list[dict[str, Any]]
    images: list[Any]
    sampling: SamplingParams
    seed: int | None = None
    #: Guided choice: every completion is one of these strings then EOS (``None`` = free text).
    choices: tuple[str, ...] | None = None
    #: A :class:`TokenStreamer` fed token by token (the job then runs alone).
    streamer: Any = None
    #: Set once the worker has taken the job into a batch (it can no longer be withdrawn).
    started: threading.Event = field(default_factory=threading.Event)
    #: Resolves to a :class:`Generated`, or to the :class:`RequestError` the request gets.
    future: Future = field(default_factory=Future)

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys may share a generate call; ``None`` = always alone."""
        if self.seed is not None or self.streamer is not None:
            return None
        return astuple(self.sampling), self.choices


@dataclass
class Generated:
    """A job's result: its completions and the prompt's token ids (for usage and ``prompt_token_ids``)."""

    completions: list[Completion]
    prompt_ids: list[int]


class QueueTimeout(RequestError):
    """The job waited longer than the queue limit for the model (answered 503)."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"server busy: the model was not free within {waited_s:g} s; retry later", status=503,
                         err_type="server_error")


class TokenStreamer:
    """A transformers streamer that turns each generated token into a text delta on a queue.

    ``generate`` calls :meth:`put` in the worker thread, so the tokenizer is only ever used by
    that thread. Decoding is incremental (a few tokens of context, as vLLM and TGI do), and a
    delta is held back while it ends in an incomplete UTF-8 character. :meth:`cancel` (the
    client went away) ends the generation at the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        import queue

        self.tokenizer = tokenizer
        self.deltas: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self._ids: list[int] = []
        self._prefix = self._read = 0
        self._prompt = True

    def cancel(self) -> None:
        """Stop generating for this stream (checked once per generated token)."""
        self.cancelled.set()

    def put(self, value: Any) -> None:
        """Receive the prompt (skipped), then one token per step."""
        if self._prompt:  # generate() passes the prompt ids first
            self._prompt = False
            return
        self._ids.extend(value.reshape(-1).tolist())
        decode = self.tokenizer.decode
        before = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        text = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.deltas.put(text[len(before):])
            self._prefix, self._read = self._read, len(self._ids)

    def end(self) -> None:
        """Generation finished (or failed): wake the reader."""
        self.deltas.put(None)

    def __iter__(self) -> Iterator[str]:
        while (delta := self.deltas.get()) is not None:
            yield delta


class _StreamingPolicy:
    """The policy with a :class:`TokenStreamer` added to its ``generate`` calls; all else is the model's.

    The built-in engine takes no streamer; wrapping the model it calls keeps one generation
    path (prompt processing, suppressed tokens, EOS handling) for streamed and plain requests.
    The streamer's :meth:`~TokenStreamer.cancel` becomes a stopping criterion.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self.streamer: TokenStreamer | None = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        cancelled = self.streamer.cancelled

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        stop = StoppingCriteriaList([Cancelled()])
        return self._model.generate(*args, streamer=self.streamer, stopping_criteria=stop, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class Batcher:
    """The thread that owns the model: takes jobs, batches compatible ones, generates.

    Args:
        model, processor, family, device: the loaded policy (see :class:`~core.runtime.loader.ModelBundle`).
        suppressed: token ids generation must never emit.
        max_batch_size: most requests per generate call (1 = no batching).
        max_wait_s: how long the worker waits for companions to a lone job before it generates.
    """

    def __init__(self, model: Any, processor: Any, family: Any, device: Any, suppressed: list[int], *,
                 max_batch_size: int = 8, max_wait_s: float = 0.005) -> None:
        from core.plugins.builtin.rollout import TransformersRollout

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.family, self.device = family, device
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.engine = TransformersRollout.from_options({"prompt_batch_size": max_batch_size})
        self.stream_engine = TransformersRollout.from_options({"prompt_batch_size": 1})
        #: (choices, streamed) -> the built-in engine with that ``choices`` option, most recent last.
        self._choice_engines: OrderedDict[tuple[tuple[str, ...], bool], Any] = OrderedDict()
        self._set_model(model, processor, suppressed)
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._busy = threading.Lock()  # held while a batch runs (a swap waits for it)
        self._paused = 0
        self._closed = False
        self.counters = {"requests": 0, "generate_calls": 0, "batched_requests": 0, "largest_batch": 0,
                         "queue_timeouts": 0}
        self._thread = threading.Thread(target=self._run, name="vlmr1-serve-model", daemon=True)
        self._thread.start()

    # ---- the model ---------------------------------------------------------------------------
    def _set_model(self, model: Any, processor: Any, suppressed: list[int]) -> None:
        self.model, self.processor = model, processor
        self._ctx = RolloutContext(model=model, processor=processor, family=self.family,
                                   device=self.device, suppressed_token_ids=suppressed)
        self.engine.setup(self._ctx)
        self._streaming_policy = _StreamingPolicy(model)
        self._stream_ctx = RolloutContext(model=self._streaming_policy, processor=processor,
                                          family=self.family, device=self.device,
                                          suppressed_token_ids=suppressed)
        self.stream_engine.setup(self._stream_ctx)
        # A choice engine tokenises its choices once, with the processor it first saw: rebuild after a swap.
        self._choice_engines.clear()

    def _engine_for(self, job: Job) -> Any:
        """The built-in engine that generates ``job``: plain or streaming, with its ``choices`` option."""
        streamed = job.streamer is not None
        if job.choices is None:
            return self.stream_engine if streamed else self.engine
        from core.plugins.builtin.rollout import TransformersRollout

        key = (job.choices, streamed)
        engine = self._choice_engines.get(key)
        if engine is None:
            engine = TransformersRollout.from_options(
                {"prompt_batch_size": 1 if streamed else self.max_batch_size, "choices": list(job.choices)})
            engine.setup(self._stream_ctx if streamed else self._ctx)
            self._choice_engines[key] = engine
            while len(self._choice_engines) > CHOICE_ENGINES:
                self._choice_engines.popitem(last=False)
        self._choice_engines.move_to_end(key)
        return engine

    def swap(self, model: Any, processor: Any, suppressed: list[int]) -> None:
        """Replace model and processor between batches (jobs queue up meanwhile, none is lost)."""
        with self.paused():
            self._set_model(model, processor, suppressed)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No batch starts while inside (the running one finishes first); queued jobs batch on exit."""
        with self._cv:
            self._paused += 1
        try:
            with self._busy:
                yield
        finally:
            with self._cv:
                self._paused -= 1
                self._cv.notify_all()

    # ---- jobs --------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job`` for the worker."""
        with self._cv:
            if self._closed:
                raise RequestError("server shutting down", status=503, err_type="server_error")
            self._pending.append(job)
            self._cv.notify_all()
        return job

    def wait_started(self, job: Job, queue_timeout_s: float) -> None:
        """Block until the worker takes ``job``; :class:`QueueTimeout` (and the job withdrawn) after the limit."""
        if job.started.wait(queue_timeout_s):
            return
        with self._cv:
            if not job.started.is_set():
                self._pending.remove(job)
                self.counters["queue_timeouts"] += 1
                raise QueueTimeout(queue_timeout_s)

    def result(self, job: Job, queue_timeout_s: float) -> Generated:
        """Wait (bounded while queued, unbounded once generating) and return the job's result."""
        self.wait_started(job, queue_timeout_s)
        return job.future.result()

    def stats(self) -> dict[str, int]:
        """Counters since start: requests, generate calls, requests that shared a call, largest batch, ..."""
        with self._cv:
            return {**self.counters, "pending": len(self._pending), "max_batch_size": self.max_batch_size}

    def close(self) -> None:
        """Stop the worker after the running batch; queued jobs get 503."""
        with self._cv:
            self._closed = True
            left, self._pending = list(self._pending), deque()
            self._cv.notify_all()
        for job in left:
            job.future.set_exception(RequestError("server shutting down", status=503, err_type="server_error"))
            job.started.set()

    # ---- the worker ------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        """The next batch: the oldest job and up to ``max_batch_size - 1`` compatible ones.

        A job is marked started as it leaves the queue, under the lock: from then on
        :meth:`wait_started` no longer withdraws it (the lock is released while waiting for companions).
        """
        with self._cv:
            while not self._closed and (self._paused or not self._pending):
                self._cv.wait()
            if self._closed:
                return None
            first = self._pending.popleft()
            first.started.set()
            batch, key = [first], first.batch_key
            if key is None or self.max_batch_size == 1:
                return batch
            deadline = time.monotonic() + self.max_wait_s
            while True:
                for job in [j for j in self._pending if j.batch_key == key][:self.max_batch_size - len(batch)]:
                    self._pending.remove(job)
                    job.started.set()
                    batch.append(job)
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch_size or left <= 0 or self._closed:
                    return batch
                self._cv.wait(left)

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            with self._busy:
                self._generate(batch)

    def _generate(self, batch: list[Job]) -> None:
        import torch

        first = batch[0]
        try:
            prompts = [PromptInput(j.messages, self.family.render_prompt(self.processor, j.messages), j.images)
                       for j in batch]
            if first.seed is not None:
                torch.manual_seed(first.seed)
            engine = self._engine_for(first)
            if first.streamer is not None:
                self._streaming_policy.streamer = first.streamer
                try:
                    groups = engine.generate(prompts, first.sampling)
                finally:
                    self._streaming_policy.streamer = None
            else:
                groups = engine.generate(prompts, first.sampling)
            results = [Generated(g, self.family.process(self.processor, [p.text], [p.images])["input_ids"][0].tolist())
                       for g, p in zip(groups, prompts, strict=True)]
        except Exception as exc:  # every request of the batch gets the cause as a 500
            error = RequestError(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                 err_type="server_error")
            error.__cause__ = exc
            for job in batch:
                if job.streamer is not None:
                    job.streamer.end()
                job.future.set_exception(error)
            return
        finally:
            with self._cv:
                self.counters["generate_calls"] += 1
                self.counters["requests"] += len(batch)
                self.counters["batched_requests"] += len(batch) if len(batch) > 1 else 0
                self.counters["largest_batch"] = max(self.counters["largest_batch"], len(batch))
        for job, res in zip(batch, results, strict=True):
            job.future.set_result(res)
