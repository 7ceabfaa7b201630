"""A math-verify worker in a child process that the parent can kill on a hard deadline.

Why a process: sympy parsing/simplification can run for minutes (``9^{9^{9}}``), and
math-verify's own timeout uses ``signal.alarm``, which works only in the main thread (the
engine scores rewards in worker threads) and cannot interrupt long C-level operations.
A thread cannot be killed; a process can. ``concurrent.futures.ProcessPoolExecutor``
cannot kill one stuck task, so this small pipe protocol is written by hand: one JSON
request per line on stdin, one JSON reply per line on stdout.

Run as ``python -m vlmr1_math.worker``; the parent side is :class:`MathWorker`. POSIX only
(``select`` on pipes); elsewhere use ``isolation: inline``.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0


def _serve() -> None:
    """Child main loop: answer ``{"id", "gold", "pred", "timeout"}`` with ``{"id", "ok"|"error"}``."""
    # stdout carries the protocol only: anything a library prints goes to stderr instead.
    out, sys.stdout = sys.stdout, sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401 - imported before the greeting so no check pays for it

    from vlmr1_math.check import is_equivalent

    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            # In the child's main thread math-verify's signal timeouts work: they stop most
            # pathological work early; the parent's kill is the backstop.
            reply = {"id": req["id"], "ok": is_equivalent(req["gold"], req["pred"], req.get("timeout"))}
        except Exception as e:  # reported to the parent, which scores the item 0
            reply = {"id": req["id"], "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class WorkerTimeout(Exception):
    """The worker did not answer before the deadline (it has been killed)."""


class WorkerError(RuntimeError):
    """One check failed inside the worker, or the worker died while answering it."""


class MathWorker:
    """Parent side: start the child lazily, send one check at a time, kill it on timeout.

    Thread-safe (one lock around each request). The child is restarted on the next request
    after a kill or a crash.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._next_id = 0
        self._lock = threading.Lock()
        self.restarts = 0  # children started after the first one (after a kill or a crash)
        self._started = False
        self._finalizer: weakref.finalize | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the child (if not running) and wait until it has imported math-verify."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._started:
            self.restarts += 1
        self._started = True
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen([sys.executable, "-m", "vlmr1_math.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self._proc, self._buf = proc, b""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill, proc)
        try:
            hello = self._read_line(time.monotonic() + STARTUP_TIMEOUT_S)
            ok = json.loads(hello).get("ready") is True
        except (WorkerTimeout, OSError, ValueError, AttributeError) as e:
            hello, ok = repr(e), False
        if not ok:
            _kill(proc)
            self._proc = None
            raise RuntimeError(f"math worker ({sys.executable} -m vlmr1_math.worker) did not start within "
                               f"{STARTUP_TIMEOUT_S:g} s: {hello[:200]}")
        return proc

    def close(self) -> None:
        """Stop the child."""
        with self._lock:
            if self._proc is not None:
                _kill(self._proc)
                self._proc = None

    # ---- requests ----------------------------------------------------------------------
    def check(self, gold: str, pred: str, timeout_s: float) -> bool:
        """Whether ``pred`` is equivalent to ``gold``.

        Raises :class:`WorkerTimeout` past ``timeout_s`` (the child is killed), :class:`WorkerError`
        when this check failed, ``RuntimeError`` when the child cannot start at all.
        """
        with self._lock:
            proc = self._ensure()
            self._next_id += 1
            rid = self._next_id
            # math-verify's inner timeouts take whole seconds; the parent deadline is exact.
            inner = max(1, int(timeout_s))
            req = json.dumps({"id": rid, "gold": gold, "pred": pred, "timeout": inner}) + "\n"
            assert proc.stdin is not None
            try:
                proc.stdin.write(req.encode())
                proc.stdin.flush()
                reply = json.loads(self._read_line(time.monotonic() + timeout_s))
            except WorkerTimeout:
                _kill(proc)
                self._proc = None
                raise
            except (BrokenPipeError, OSError, ValueError) as e:
                _kill(proc)
                self._proc = None
                raise WorkerError(f"math worker failed: {type(e).__name__}: {e}") from e
            if reply.get("id") != rid:
                _kill(proc)
                self._proc = None
                raise WorkerError(f"math worker answered request {reply.get('id')} instead of {rid}")
            if "error" in reply:
                raise WorkerError(f"math worker: {reply['error']}")
            return bool(reply["ok"])

    def _read_line(self, deadline: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self._proc.poll()
                raise OSError(f"math worker exited (code {code})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not hang
        pass
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


if __name__ == "__main__":
    _serve()
