"""Subprocesses in tests with generous, scalable time limits and a clear message when one runs out.

A test's time limit guards against a hang, not a slow machine: on a laptop running two test
suites at once a command can take several times its idle duration. Limits here are scaled by the
environment variable ``VLMR1_TEST_TIMEOUT_SCALE`` (default 1; e.g. ``3`` on a loaded CI worker),
and a command that runs out fails with ``timed out after N s (machine busy? ...)`` plus the tail
of its output, never a bare ``TimeoutExpired`` traceback that reads like a bug in the program.

Example::

    from core.testing.procs import run_command

    proc = run_command([sys.executable, "-m", "core.train", "--dry-run"], timeout=300)
    assert proc.returncode == 0, proc.stderr
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from typing import Any

__all__ = ["TIMEOUT_SCALE_ENV", "CommandTimedOut", "communicate", "run_command", "scaled", "timeout_scale"]

#: Multiplies every limit given to the helpers here.
TIMEOUT_SCALE_ENV = "VLMR1_TEST_TIMEOUT_SCALE"


class CommandTimedOut(AssertionError):
    """A test's subprocess ran past its (scaled) time limit; an ``AssertionError`` so pytest reports a failure."""


def timeout_scale() -> float:
    """The factor from ``VLMR1_TEST_TIMEOUT_SCALE`` (default 1.0); a bad value is an error naming the variable."""
    raw = os.environ.get(TIMEOUT_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_SCALE_ENV}={raw!r}: expected a positive number such as 2 or 0.5")
    return value


def scaled(seconds: float) -> float:
    """``seconds`` times :func:`timeout_scale`: use it for any wait in a test (polling loops, ``join``)."""
    return seconds * timeout_scale()


def _timed_out(args: Any, limit: float, stdout: Any, stderr: Any) -> CommandTimedOut:
    def tail(text: Any) -> str:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        return (text or "")[-2000:]

    cmd = args if isinstance(args, str) else shlex.join(str(a) for a in args)
    return CommandTimedOut(
        f"{cmd}\ntimed out after {limit:.0f} s (machine busy? other jobs on these cores slow every step; "
        f"rerun with {TIMEOUT_SCALE_ENV}=3 for longer limits)\n"
        f"--- stdout (tail) ---\n{tail(stdout)}\n--- stderr (tail) ---\n{tail(stderr)}")


def run_command(args: Sequence[Any] | str, *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """:func:`subprocess.run` with ``timeout`` scaled; output captured as text unless told otherwise.

    Args:
        args: the command, as for :func:`subprocess.run`.
        timeout: the limit in seconds on an idle machine, before scaling. Choose it generously
            (several times the measured duration): it exists to stop a hang.
        kwargs: passed to :func:`subprocess.run` (``cwd``, ``env``, ``check``, ...).

    Raises:
        CommandTimedOut: the command ran past the limit (it has been killed).
    """
    if "stdout" not in kwargs and "stderr" not in kwargs:
        kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    limit = scaled(timeout)
    try:
        return subprocess.run(args, timeout=limit, **kwargs)
    except subprocess.TimeoutExpired as exc:
        raise _timed_out(args, limit, exc.stdout, exc.stderr) from None


def communicate(proc: subprocess.Popen, *, timeout: float) -> tuple[Any, Any]:
    """``proc.communicate`` with ``timeout`` scaled; past it ``proc`` is killed and :class:`CommandTimedOut` raised."""
    limit = scaled(timeout)
    try:
        return proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise _timed_out(proc.args, limit, out, err) from None
