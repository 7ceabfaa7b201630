"""``python -m core.serve`` as a child process on a free loopback port (tests, evaluation scripts)."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ServerProcess:
    """``python -m core.serve CHECKPOINT`` in a child process; ``url`` is its ``.../v1`` base URL once ready.

    Use as a context manager::

        with ServerProcess(ckpt, ["--plugins", "qwen-vl"]) as srv:
            httpx.post(srv.url + "/chat/completions", json=...)

    Readiness is the server's startup line (``vlmr1 serve: model ... on http://HOST:PORT/v1``,
    with the real port: the child gets ``--port 0``). On Linux the child is terminated when the
    thread that started it ends (``PR_SET_PDEATHSIG``), so a killed test run leaves no server
    behind: start it from a long-lived thread.
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
        """Start the child and wait (bounded) for its startup line; ``RuntimeError`` with its stderr otherwise."""
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
                if line is None:  # let the stderr pump finish reading what the child wrote
                    time.sleep(0.2)
                # The same wording as core.testing.procs (not imported: core.serving must not depend on it).
                why = "exited" if line is None else (
                    f"did not start within {self.startup_timeout:.0f} s (machine busy? other jobs on these cores "
                    "slow every step; rerun with VLMR1_TEST_TIMEOUT_SCALE=3 for longer limits in tests, or give "
                    "a larger startup_timeout)")
                raise RuntimeError(f"core.serve {why} (command: {' '.join(self.cmd)}); stderr:\n"
                                   + "".join(stderr_tail))
            m = re.search(r"on (http://\S+/v1)$", line.strip())
            if m:
                self.banner, self.url = line.strip(), m.group(1)
                return self

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the child (kill it if it does not exit within ``timeout``)."""
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
    """Linux: the child gets SIGTERM when its parent dies."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
