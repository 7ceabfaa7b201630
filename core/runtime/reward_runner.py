"""The engine's reward runner: every configured reward, under a time limit, combined by weight.

One call scores one step's completions with every reward and returns a ``[N, R]`` table, the
weighted total and per-reward metrics. A reward that is slow, raises or returns NaN/inf for
some completions does not stop training at once: the affected completions are scored by that
reward's ``on_error`` policy, marked in :attr:`RewardResult.failed` (the trainer gives those
rows no advantage) and counted against the error budget below.

A reward that breaks the ``score`` contract -- a result that is not a sequence, of the wrong
length, or holding something that is neither a number nor ``None`` (a string such as ``"0.5"``
or ``"True"``, a dict, a list) -- is a bug, not a transient fault: the first such call raises
:class:`RewardContractError` naming the reward, its plugin, what it returned and the fix,
whatever its ``on_error`` policy (filling its rows in would train on no signal until the
budget ran out).

How time limits work (and their limits)
---------------------------------------
Each reward call runs in its own **daemon thread**; the runner waits for it until the
reward's ``timeout_s`` and then *abandons* it. Python threads cannot be killed, so an
abandoned call keeps running (and using CPU and memory) until it returns by itself; it can
never block the step, the process exit (daemon thread) or later steps. The next step calls the
reward **fresh** in a new thread (a hung request, e.g. to a judge server, must not turn the
reward off for the rest of the run). To bound the leak, once ``MAX_ABANDONED_CALLS`` abandoned
calls of one reward are still running, that reward is not called again until one returns: its
completions get the policy at once (counted as timeouts). A reward with ``thread_safe = False``
may therefore see a fresh call while an abandoned one is still inside it; such a reward must
not hang forever (give its own I/O a timeout). A thread pool is deliberately not used: a stuck
call would hold one of its workers forever and starve every later step.

Per-completion isolation
------------------------
When a batched ``score`` call raises, the same worker thread scores the rows one by one (under
the same deadline), so one poisonous completion costs only its own score, not the step's. Only
the rows that still fail get the ``on_error`` policy and are counted.

A run that is not learning stops
--------------------------------
Scores filled in by the policy are not a learning signal (the trainer gives those rows no
advantage). When at least a reward's ``max_error_frac`` of a call's completions fail (errors
or timeouts) for ``max_error_steps`` consecutive calls (one call per step; dynamic-sampling
rounds count as calls), the runner raises :class:`RewardError` naming the reward, the counts
and the last failure, and the run stops with a non-zero exit instead of training on nothing.

Threads were chosen over processes because rewards receive closures (the model family's box
transform) and hold clients and caches that do not pickle, and because starting or forking a
process per call costs far more than typical rule-based rewards. A reward that needs a *hard*
stop of pathological work (e.g. a sympy simplification that never returns) isolates that work
in a subprocess it can kill itself, as ``vlmr1-plugin-math`` does.

Parallelism: rewards with ``thread_safe = True`` run concurrently (at most ``max_workers``
calls at once). Rewards with ``thread_safe = False`` run one at a time, in order (never two
of them at once, and never two calls of one reward at once), beside the thread-safe ones.
Pure-Python rewards gain little from threads (the GIL); I/O-bound rewards (an LLM judge)
and C-backed ones (pycocotools) do.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Literal, NoReturn

import numpy as np
import torch

from core.interfaces import Reward, RewardBatch

logger = logging.getLogger(__name__)

OnError = Literal["zero", "skip", "raise"]

#: Abandoned (timed-out, still running) calls of one reward tolerated before it is not called again.
MAX_ABANDONED_CALLS = 4

# Calls that were abandoned after their time limit, per reward object. Module-level (not per
# runner) because the trainer shares reward objects between its training and evaluation runners.
_ABANDONED: weakref.WeakKeyDictionary[Reward, list[threading.Thread]] = weakref.WeakKeyDictionary()
_ABANDONED_LOCK = threading.Lock()


class RewardError(RuntimeError):
    """A reward failed and its policy is ``on_error: raise``; the message names the reward."""


class RewardTimeoutError(RewardError):
    """A reward exceeded its time limit and its policy is ``on_error: raise``."""


class RewardContractError(RewardError):
    """A reward broke the ``score`` contract (wrong type or length, a non-number), or ended the process.

    Always raised at once, whatever the reward's ``on_error`` policy: it is a programming error.
    """


@dataclass
class RewardSpec:
    """One term of the weighted sum: a built reward, its weight, time limit and error policy."""

    name: str
    reward: Reward
    weight: float
    timeout_s: float
    on_error: OnError
    #: Stop the run when more than this fraction of a call's completions fail ... (None = never).
    max_error_frac: float | None = None
    #: ... for this many consecutive calls.
    max_error_steps: int = 10
    #: Who provides the reward, for error messages (e.g. ``"plugin vlmr1-plugin-x 0.1.0"``; "" = unknown).
    origin: str = ""


@dataclass
class RewardResult:
    """What one runner call returns.

    Attributes:
        per_reward: ``[N, R]`` float32, NaN where a reward does not apply (``None``) or
            where its error policy is ``skip``.
        total: ``[N]`` weighted sum over the applicable terms (a NaN term counts 0; a
            completion no reward applies to gets 0).
        metrics: ``rewards/<name>`` (mean over applicable completions, NaN if none),
            ``rewards/<name>_std`` (sample std, 0 for one value, NaN for none),
            ``rewards/<name>_applicable_frac``, ``rewards/<name>_errors`` (completions scored
            by the error policy: timeouts, exceptions, NaN/inf scores; plus those the reward
            reports via ``take_failures()``) and
            ``rewards/<name>_timeouts`` (completions affected by a timeout). Counts are floats,
            per call.
        names: the column names of ``per_reward`` (spec names, made unique with ``_2``...).
        failed: ``[N, R]`` bool, True where the score was filled in by the error policy.
        timed_out: ``[N, R]`` bool, True where that failure was a timeout.
    """

    per_reward: torch.Tensor
    total: torch.Tensor
    metrics: dict[str, float]
    names: list[str] = field(default_factory=list)
    failed: torch.Tensor | None = None
    timed_out: torch.Tensor | None = None

    def failed_rows(self) -> torch.Tensor:
        """``[N]`` bool: True where any reward's score of the row was filled in by its error policy.

        Such a row's total is not the reward's judgement of the completion; GRPO gives it no advantage.
        """
        if self.failed is None:
            return torch.zeros(self.total.shape[0], dtype=torch.bool)
        return self.failed.any(dim=1) if self.failed.numel() else torch.zeros(self.failed.shape[0], dtype=torch.bool)


@dataclass
class _Job:
    """One reward call: ``reward`` on ``batch``, whose rows are ``rows`` of column ``column`` (all when None).

    A configured reward is one job; a routing reward (``Reward.route``) becomes one job per
    routed reward, each under the configured reward's time limit and error policy.
    """

    index: int
    column: int
    spec: RewardSpec
    reward: Reward
    batch: RewardBatch
    name: str
    serial: bool
    rows: list[int] | None = None
    thread: threading.Thread | None = None
    deadline: float = 0.0

    def to_rows(self, local: list[int]) -> list[int]:
        """Batch-row indices of this job's local indices."""
        return local if self.rows is None else [self.rows[i] for i in local]


class _Outcome:
    """Per-reward bookkeeping of one call: scores plus error counts."""

    def __init__(self, n: int) -> None:
        self.scores: list[float] = [math.nan] * n
        self.errors = 0
        self.timeouts = 0
        self.last_reason = ""
        self.failed = [False] * n
        self.timed_out = [False] * n


class _RowError:
    """A row that raised when the batch was scored one row at a time."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class _PerRow:
    """Result of the one-row-at-a-time fallback after a batched call raised ``first``."""

    def __init__(self, values: list[object], first: BaseException) -> None:
        self.values = values
        self.first = first


class RewardRunner:
    """Score a batch with every reward under its time limit; combine by weight.

    Args:
        specs: the reward terms, in column order.
        max_workers: the most reward calls running at once in one step (>= 1).
    """

    def __init__(self, specs: list[RewardSpec], max_workers: int = 4) -> None:
        if max_workers < 1:
            raise ValueError(f"RewardRunner: max_workers must be >= 1, got {max_workers}")
        for s in specs:
            if s.on_error not in ("zero", "skip", "raise"):
                raise ValueError(f"reward {s.name!r}: on_error must be zero, skip or raise, got {s.on_error!r}")
            if not (s.timeout_s > 0):
                raise ValueError(f"reward {s.name!r}: timeout_s must be > 0, got {s.timeout_s!r}")
            if not math.isfinite(s.weight):
                raise ValueError(f"reward {s.name!r}: weight must be finite, got {s.weight!r}")
            if s.max_error_frac is not None and not 0 <= s.max_error_frac <= 1:
                raise ValueError(f"reward {s.name!r}: max_error_frac must be in [0, 1], got {s.max_error_frac!r}")
            if s.max_error_steps < 1:
                raise ValueError(f"reward {s.name!r}: max_error_steps must be >= 1, got {s.max_error_steps!r}")
        self.specs = list(specs)
        self.max_workers = max_workers
        self.names = _unique_names([s.name for s in self.specs])
        self._warned: set[tuple[str, str]] = set()
        self._streak = [0] * len(self.specs)  # consecutive calls over max_error_frac, per reward
        self._closed = False

    # ---- public API --------------------------------------------------------------------
    def __call__(self, batch: RewardBatch) -> RewardResult:
        """Score ``batch`` with every reward; see :class:`RewardResult`."""
        if self._closed:
            raise RuntimeError("RewardRunner is closed")
        n = len(batch)
        outcomes = [_Outcome(n) for _ in self.specs]
        if n:
            self._run_all(batch, outcomes)
            self._check_error_streaks(outcomes, n)
        per = torch.tensor([o.scores for o in outcomes], dtype=torch.float32).reshape(len(self.specs), n).T.contiguous()
        weights = torch.tensor([s.weight for s in self.specs], dtype=torch.float32)
        total = (torch.nan_to_num(per, nan=0.0) * weights).sum(dim=1)
        failed = torch.tensor([o.failed for o in outcomes], dtype=torch.bool).reshape(len(self.specs), n).T
        timed_out = torch.tensor([o.timed_out for o in outcomes], dtype=torch.bool).reshape(len(self.specs), n).T
        return RewardResult(per, total, self._metrics(per, outcomes), list(self.names), failed.contiguous(),
                            timed_out.contiguous())

    def close(self) -> None:
        """Release rewards that hold resources (calls ``close()`` where a reward has one).

        Abandoned calls are daemon threads and are not waited for.
        """
        if self._closed:
            return
        self._closed = True
        seen: set[int] = set()
        for s in self.specs:
            closer = getattr(s.reward, "close", None)
            if callable(closer) and id(s.reward) not in seen:
                seen.add(id(s.reward))
                try:
                    closer()
                except Exception:  # closing must not mask the run's own outcome
                    logger.warning("reward %r: close() failed", s.name, exc_info=True)

    def _check_error_streaks(self, outcomes: list[_Outcome], n: int) -> None:
        """Raise once a reward has failed on too many completions for too many calls in a row."""
        for j, (s, out) in enumerate(zip(self.specs, outcomes, strict=True)):
            if s.max_error_frac is None:
                continue
            self._streak[j] = self._streak[j] + 1 if min(out.errors, n) / n >= s.max_error_frac else 0
            if self._streak[j] >= s.max_error_steps:
                raise RewardError(
                    f"reward {self.names[j]!r} failed on at least {s.max_error_frac:.0%} of the completions in "
                    f"each of the last {self._streak[j]} steps ({out.errors}/{n} in the last, {out.timeouts} "
                    f"timeouts; last failure: {out.last_reason}). The run is stopped because it would train on "
                    f"scores filled in by on_error, not on the reward. Fix the reward, or raise its "
                    f"max_error_frac / max_error_steps")

    # ---- scheduling --------------------------------------------------------------------
    def _run_all(self, batch: RewardBatch, outcomes: list[_Outcome]) -> None:
        # A fresh queue per call: results of calls abandoned in earlier steps land in
        # their own (now unread) queue and can never be mistaken for this step's.
        results: queue.Queue[tuple[int, object, BaseException | None]] = queue.Queue()
        jobs: list[_Job] = []
        for col, spec in enumerate(self.specs):
            for reward, rows, sub in self._route(col, spec, batch, outcomes[col]):
                name = self.names[col] if rows is None else f"{self.names[col]}/{getattr(reward, 'name', '?')}"
                jobs.append(_Job(len(jobs), col, spec, reward, sub, name,
                                 serial=not getattr(reward, "thread_safe", True), rows=rows))
        parallel = [j for j in jobs if not j.serial]
        serial = [j for j in jobs if j.serial]
        running: dict[int, _Job] = {}

        def start(job: _Job) -> bool:
            with _ABANDONED_LOCK:
                alive = [t for t in _ABANDONED.get(job.reward, []) if t.is_alive()]
                _ABANDONED[job.reward] = alive
            if len(alive) >= MAX_ABANDONED_CALLS:
                self._fail(job, outcomes[job.column], len(job.batch), "timeout",
                           f"is not called: {len(alive)} earlier calls are still running after exceeding "
                           f"{job.spec.timeout_s:g} s", None)
                return False
            t = threading.Thread(target=_call, args=(job.index, job.reward, job.batch, results),
                                 name=f"vlmr1-reward-{job.name}", daemon=True)
            job.thread = t
            job.deadline = time.monotonic() + job.spec.timeout_s
            running[job.index] = job
            t.start()
            return True

        serial_running = False
        while parallel or serial or running:
            # Fill free slots: at most one serial job, the rest thread-safe ones.
            while serial and not serial_running and len(running) < self.max_workers:
                serial_running = start(serial.pop(0))
            while parallel and len(running) < self.max_workers:
                start(parallel.pop(0))
            if not running:
                continue
            wait = max(0.0, min(j.deadline for j in running.values()) - time.monotonic())
            try:
                idx, value, exc = results.get(timeout=wait)
            except queue.Empty:
                idx = None
            if idx is not None and idx in running:
                job = running.pop(idx)
                serial_running = serial_running and not job.serial
                self._collect(job, outcomes[job.column], len(job.batch), value, exc)
            now = time.monotonic()
            for job in [j for j in running.values() if j.deadline <= now]:
                running.pop(job.index)
                serial_running = serial_running and not job.serial
                with _ABANDONED_LOCK:
                    if job.thread is not None and job.thread.is_alive():
                        _ABANDONED.setdefault(job.reward, []).append(job.thread)
                self._fail(job, outcomes[job.column], len(job.batch), "timeout",
                           f"no result within its time limit of {job.spec.timeout_s:g} s (call abandoned)", None)

    # ---- result handling ---------------------------------------------------------------
    def _route(self, col: int, spec: RewardSpec, batch: RewardBatch,
               out: _Outcome) -> list[tuple[Reward, list[int] | None, RewardBatch]]:
        """The calls that score column ``col``: the reward itself, or each reward its ``route`` names.

        A routing that raises for some rows (a method nobody serves) fails only those rows: they
        are routed one by one and the ones that still raise get the reward's error policy.
        """
        router = getattr(spec.reward, "route", None)
        plan = None
        if callable(router):
            try:
                plan = router(batch)
            except Exception:  # noqa: BLE001 - retried row by row below
                plan = self._route_rows(col, spec, batch, out)
        if plan is None:
            return [(spec.reward, None, batch)]
        return [(reward, list(rows), RewardBatch([batch.items[i] for i in rows])) for reward, rows in plan if rows]

    def _route_rows(self, col: int, spec: RewardSpec, batch: RewardBatch,
                    out: _Outcome) -> list[tuple[Reward, list[int]]]:
        groups: dict[int, tuple[Reward, list[int]]] = {}
        for i, item in enumerate(batch.items):
            try:
                routed = spec.reward.route(RewardBatch([item])) or []
            except Exception as exc:  # noqa: BLE001 - this row's failure, counted by the runner
                job = _Job(-1, col, spec, spec.reward, batch, self.names[col], serial=False)
                self._fail(job, out, len(batch), "exception", f"raised {type(exc).__name__}: {exc}", exc,
                           indices=[i])
                continue
            for reward, _rows in routed:
                groups.setdefault(id(reward), (reward, []))[1].append(i)
        return list(groups.values())

    def _collect(self, job: _Job, out: _Outcome, n: int, value: object, exc: BaseException | None) -> None:
        taker = getattr(job.reward, "take_failures", None)
        own = taker() if callable(taker) else 0
        if isinstance(own, int) and own > 0:  # failures the reward caught itself (a judge's on_failure: zero)
            out.errors += min(own, n)
            out.last_reason = f"the reward reported {own} completion(s) scored by its own fallback"
        if isinstance(exc, SystemExit):
            # A reward that ends the process is broken, not flaky: scoring its rows 0 would let the
            # run "succeed" on no signal. The apps turn this into exit 1.
            raise RewardContractError(f"{_who(job.name, job.reward, job.spec.origin)} called sys.exit({exc.code!r}) "
                                      "inside score(); a reward must return its scores or raise an exception"
                                      ) from exc
        if exc is not None:
            self._fail(job, out, n, "exception", f"raised {type(exc).__name__}: {exc}", exc)
            return
        if isinstance(value, _PerRow):
            wrong = [v for v in value.values if isinstance(v, _WrongResult)]
            if wrong:  # scored alone, a row came back as no single score: the contract, not the row
                self._contract(job, f"returned {_show(wrong[0].value)} for a batch of 1 completion (called one row "
                                    f"at a time after the batched call raised {type(value.first).__name__}: "
                                    f"{value.first})")
            failed = [i for i, v in enumerate(value.values) if isinstance(v, _RowError)]
            if len(failed) == n:  # every row fails alone too: report the batched call's exception
                self._fail(job, out, n, "exception", f"raised {type(value.first).__name__}: {value.first}",
                           value.first)
                return
            first = value.values[failed[0]].exc if failed else None  # type: ignore[union-attr]
            if failed:
                self._fail(job, out, n, "exception",
                           f"raised {type(first).__name__}: {first} on {len(failed)} of {n} completion(s) scored "
                           f"one by one (e.g. index {failed[0]})", first, indices=failed)
            value = [None if isinstance(v, _RowError) else v for v in value.values]
            self._collect_values(job, out, n, value, skip=set(failed))
            return
        self._collect_values(job, out, n, value)

    def _collect_values(self, job: _Job, out: _Outcome, n: int, value: object, skip: set[int] | None = None) -> None:
        values: list[object] | None = None
        if not isinstance(value, (str, bytes, dict)):
            try:
                values = list(value)  # type: ignore[call-overload]
            except TypeError:
                values = None
        if values is None:
            self._contract(job, f"returned {_show(value)} for {n} completions, not a list of scores")
        if len(values) != n:
            self._contract(job, f"returned {len(values)} score(s) for {n} completions: {_show(values)}")
        bad: list[int] = []
        for i, v in enumerate(values):
            if v is None or (skip and i in skip):
                continue  # not applicable: stays NaN, not an error
            f = _as_float(v)
            if f is None:
                self._contract(job, f"returned {v!r:.80} ({type(v).__name__}) as the score of completion {i} of {n}, "
                                    "which is neither a number nor None")
            if not math.isfinite(f):
                bad.append(i)  # NaN/inf: the on_error policy (documented), e.g. a 0/0 on one odd completion
            else:
                out.scores[job.to_rows([i])[0]] = f
        if bad:
            sample = values[bad[0]]
            self._fail(job, out, n, "bad_value",
                       f"returned {len(bad)} non-finite score(s), e.g. {sample!r} at index {bad[0]}",
                       None, indices=bad)

    @staticmethod
    def _contract(job: _Job, what: str) -> NoReturn:
        """Raise :class:`RewardContractError`: ``what`` the reward returned breaks the ``score`` contract."""
        raise RewardContractError(
            f"{_who(job.name, job.reward, job.spec.origin)} broke the Reward contract: score() {what}. score(batch) "
            f"must return a list with exactly one entry per item of the batch, in order, each a finite number or "
            f"None (not applicable). This is a bug in the reward, not a transient failure, so the run stops now "
            f"(whatever on_error says) instead of training on filled-in scores; fix the reward's score() and check "
            f"it with core.testing.check_reward")

    def _fail(self, job: _Job, out: _Outcome, n: int, kind: str, reason: str, exc: BaseException | None,
              indices: list[int] | None = None) -> None:
        spec = job.spec
        idx = job.to_rows(list(range(n)) if indices is None else indices)
        msg = f"reward {job.name!r} {reason}"
        if spec.on_error == "raise":
            err_cls = RewardTimeoutError if kind == "timeout" else RewardError
            raise err_cls(f"{msg} (on_error: raise)") from exc
        fill = 0.0 if spec.on_error == "zero" else math.nan
        for i in idx:
            out.scores[i] = fill
            out.failed[i] = True
            out.timed_out[i] = kind == "timeout"
        out.errors += len(idx)
        out.last_reason = reason
        if kind == "timeout":
            out.timeouts += len(idx)
        key = (job.name, kind)
        policy = "scored 0" if spec.on_error == "zero" else "skipped (not applicable)"
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%s; %d completion(s) %s (on_error: %s). Further %s problems of this reward are "
                           "counted in rewards/%s_errors without a warning.", msg, len(idx), policy, spec.on_error,
                           kind.replace("_", " "), job.name, exc_info=exc)
        else:
            logger.debug("%s; %d completion(s) %s", msg, len(idx), policy)

    def _metrics(self, per: torch.Tensor, outcomes: list[_Outcome]) -> dict[str, float]:
        m: dict[str, float] = {}
        n = per.shape[0]
        for j, name in enumerate(self.names):
            col = per[:, j]
            vals = col[~torch.isnan(col)]
            k = int(vals.numel())
            m[f"rewards/{name}"] = float(vals.mean()) if k else math.nan
            m[f"rewards/{name}_std"] = float(vals.std()) if k > 1 else (0.0 if k == 1 else math.nan)
            m[f"rewards/{name}_applicable_frac"] = k / n if n else math.nan
            m[f"rewards/{name}_errors"] = float(outcomes[j].errors)
            m[f"rewards/{name}_timeouts"] = float(outcomes[j].timeouts)
        return m


def build_reward_runner(plan: Any, registry: Any) -> RewardRunner:
    """The runner of a run's ``rewards:`` section: each reward built, set up and wrapped in its spec.

    The one place a run's rewards are built; the runner owns them (``close()`` releases them).
    """
    from core.interfaces import RewardContext

    cfg = plan.config
    ctx = RewardContext(registry=registry, config=cfg)
    specs = []
    for i, rc in enumerate(cfg.rewards):
        reward = registry.create("rewards", rc.name, plan.options[f"rewards.{i}"])
        origin = reward_origin(registry, rc.name)
        setup_reward(reward, rc.name, ctx, origin)
        specs.append(RewardSpec(rc.name, reward, rc.weight, rc.timeout_s, rc.on_error, rc.max_error_frac,
                                rc.max_error_steps, origin))
    return RewardRunner(specs)


def _call(index: int, reward: Reward, batch: RewardBatch, results: queue.Queue) -> None:
    """Worker-thread body: run one reward and post its result (or exception).

    A batched call that raises is retried one row at a time, so only the rows that fail on
    their own are lost (see "Per-completion isolation" above).
    """
    try:
        value = reward.score(batch)
    except Exception as e:  # noqa: BLE001 - every failure is reported to the runner
        if len(batch) <= 1:
            results.put((index, None, e))
            return
        results.put((index, _PerRow(_score_rows(reward, batch), e), None))
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt, SystemExit: no retry
        results.put((index, None, e))
    else:
        results.put((index, value, None))


class _WrongResult:
    """A row that, scored alone, returned something other than a sequence of one score (a contract break)."""

    def __init__(self, value: object) -> None:
        self.value = value


def _score_rows(reward: Reward, batch: RewardBatch) -> list[object]:
    """Score each row of ``batch`` alone: its score, a _RowError (it raised) or a _WrongResult."""
    out: list[object] = []
    for item in batch.items:
        try:
            got = reward.score(RewardBatch([item]))
        except Exception as e:  # noqa: BLE001 - counted per row by the runner
            out.append(_RowError(e))
            continue
        try:
            one = None if isinstance(got, (str, bytes, dict)) else list(got)  # type: ignore[call-overload]
        except TypeError:
            one = None
        out.append(one[0] if one is not None and len(one) == 1 else _WrongResult(got))
    return out


def _who(name: str, reward: object, origin: str) -> str:
    """``reward 'name' (plugin dist version, module.Class)``: who to blame in a message."""
    cls = type(reward)
    where = f"{origin}, " if origin else ""
    return f"reward {name!r} ({where}{cls.__module__}.{cls.__qualname__})"


def _show(value: object) -> str:
    """A short description of a returned value: its type and a clipped repr."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def reward_origin(registry: Any, name: str) -> str:
    """``"plugin <distribution> <version>"`` of the reward registered as ``name`` ("" when unknown)."""
    import importlib.metadata as md

    try:
        provider = registry.resolve("rewards", name).provider
    except Exception:  # noqa: BLE001 - only used to improve a message
        return ""
    kind = "built into" if provider == "vlmr1" else "plugin"
    try:
        return f"{kind} {provider} {md.version(provider)}"
    except Exception:  # noqa: BLE001 - a provider that is not an installed distribution
        return f"{kind} {provider}"


def setup_reward(reward: Reward, name: str, ctx: Any, origin: str = "") -> None:
    """``reward.setup(ctx)``; ``sys.exit`` inside it is the reward's failure (RewardContractError), not a run's end."""
    try:
        reward.setup(ctx)
    except SystemExit as exc:
        raise RewardContractError(f"{_who(name, reward, origin)} called sys.exit({exc.code!r}) inside setup(); a "
                                  "reward whose set-up fails must raise an exception saying why (the run did not "
                                  "start training)") from exc


def _as_float(v: object) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, Real):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.item())
    if isinstance(v, np.number):  # numpy scalars that are not registered as numbers.Real
        return float(v)
    return None


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for nm in names:
        seen[nm] = seen.get(nm, 0) + 1
        out.append(nm if seen[nm] == 1 else f"{nm}_{seen[nm]}")
    return out
