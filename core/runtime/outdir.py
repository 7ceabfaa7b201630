"""Output folders: one run per folder, proven writable before any weights load.

- :func:`check_output_dir`: create the folder and prove it writable (a probe file);
- :func:`lock_output_dir` / :func:`release_output_dir`: a lock file naming the owner's pid, host
  and start time; a second live run is refused, a dead owner's lock taken over with a note, a lock
  from another host refused (this process cannot tell whether that run lives);
- :func:`claim_output_dir`: a fresh run refuses a folder holding an earlier run's checkpoints (its
  pruning, ``--resume`` and ``core.evaluate --checkpoint DIR`` would mix the two runs) unless it
  starts over, which moves them aside (nothing is deleted); returns the run id every checkpoint
  of this run carries (:func:`core.runtime.checkpoint.run_id_of`).

The checkpoint format itself (what a ``checkpoint-N`` folder holds, how it is written, verified
and resumed) is :mod:`core.runtime.checkpoint`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.config import ConfigError
from core.runtime.checkpoint import checkpoint_folders, run_id_of


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` if needed and prove it writable (a probe file), before weights load.

    A read-only folder, a path that is a file, or a parent that cannot be created is a
    :class:`~core.config.ConfigError` naming ``logging.output_dir``.
    """
    if not str(output_dir).strip():
        raise ConfigError("logging.output_dir is empty: name the folder for metrics and checkpoints")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"logging.output_dir: {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".vlmr1-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"logging.output_dir: cannot write to {out}: {exc.strerror or exc}"
                          f"{' (a parent is a file)' if isinstance(exc, NotADirectoryError | FileExistsError) else ''}"
                          ". Choose a writable folder.") from None
    return out


# ---- ownership: one run per output folder ------------------------------------------------------
LOCK = ".vlmr1.lock"
_held: dict[Path, dict[str, Any]] = {}  # the locks this process holds: folder -> what its lock file says


class OutputDirBusy(ConfigError):
    """Another live run holds the output folder's lock."""


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux ``/proc``), to tell a live owner from a later process with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(info: dict[str, Any]) -> bool:
    pid = info.get("pid")
    if not _is_int(pid) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    start = info.get("start")
    return start is None or _process_start(pid) in (None, start)


def lock_output_dir(output_dir: str | Path, app: str, option: str = "logging.output_dir") -> Path:
    """Take ``output_dir``'s lock file for this process (released by :func:`release_output_dir` or at exit).

    The lock records pid, host and process start time. A lock whose process is gone (same host) is
    stale and taken over with a note; a live one, or one from another host (which cannot be checked),
    is an :class:`OutputDirBusy` naming its pid and host: two runs writing one folder interleave their
    metrics and overwrite each other's checkpoints.
    """
    import atexit
    import socket
    import sys
    import time

    out = Path(output_dir).resolve()
    if out in _held:
        raise OutputDirBusy(f"{option} {out} is already used by a run in this process")
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "start": _process_start(os.getpid()), "app": app,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
    tmp = out / f".vlmr1.lock.{os.getpid()}"
    tmp.write_text(json.dumps(info))
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)  # atomic, and the lock file is complete the moment it exists
                break
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "w") as f:
                        f.write(json.dumps(info))
                    break
            try:
                other = json.loads(lock.read_text())
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError):
                other = None
            if not isinstance(other, dict):
                raise OutputDirBusy(f"{option} {out}: its lock file {lock} is unreadable; if no other run "
                                    "uses this folder, delete the file and rerun")
            who = f"pid {other.get('pid')} on host {other.get('host')}"
            if other.get("app"):
                who += f" ({other.get('app')}, since {other.get('since')})"
            if other.get("host") != host:
                raise OutputDirBusy(f"{option} {out} is in use by {who}, another machine, so whether that "
                                    f"run still lives cannot be checked from here; if it has ended, delete {lock}. "
                                    f"Otherwise choose another {option}.")
            if _alive(other) and other.get("pid") != os.getpid():
                raise OutputDirBusy(f"{option} {out} is in use by another run: {who}. Two runs in one "
                                    "folder overwrite each other's checkpoints and metrics: wait for it to end, "
                                    f"stop it, or choose another {option}.")
            # Stale: its process is gone. Rename it away first, so two runs cannot both take it over.
            aside = out / f".vlmr1.lock.stale.{os.getpid()}"
            try:
                os.replace(lock, aside)
                aside.unlink()
            except FileNotFoundError:
                continue
            print(f"note: took over the stale lock of {who}, which is no longer running", file=sys.stderr)
        else:
            raise OutputDirBusy(f"{option} {out}: could not take its lock {lock} (other runs keep taking "
                                f"it); choose another {option}")
    finally:
        tmp.unlink(missing_ok=True)
    _held[out] = info
    atexit.register(release_output_dir, out)
    return lock


def release_output_dir(output_dir: str | Path) -> None:
    """Remove the lock this process holds on ``output_dir`` (nothing if it holds none)."""
    out = Path(output_dir).resolve()
    info = _held.pop(out, None)
    if info is None:
        return
    try:
        if json.loads((out / LOCK).read_text()).get("pid") == info["pid"]:
            (out / LOCK).unlink()
    except (OSError, ValueError, AttributeError):
        pass


#: Files a finished ``core.sft`` run leaves at the top of its output folder (besides checkpoint-N folders).
_EARLIER_OUTPUTS = ("config.json", "adapter_config.json", "model.safetensors", "model.safetensors.index.json",
                    "sft_state.json")


def claim_output_dir(output_dir: str | Path, *, resume_from: Path | None, start_over: bool,
                     log: Callable[[str], None] = print, option: str = "logging.output_dir",
                     resumable: bool = True) -> str:
    """Make ``output_dir`` this run's; returns the run id to save in every checkpoint.

    A fresh run refuses a folder holding an earlier run's checkpoints (or a finished ``core.sft``
    model): its pruning, ``--resume`` and ``core.evaluate --checkpoint DIR`` would mix the two
    runs. A resumed run continues the checkpoint's run id and refuses checkpoints of other runs
    likewise. ``start_over`` (``--start-over``) moves everything in the folder to a sibling
    ``<folder>.previous-<time>`` instead: nothing is deleted.
    """
    import time
    import uuid

    out = Path(output_dir)
    run_id = run_id_of(resume_from) if resume_from is not None else None
    inside = resume_from is not None and Path(resume_from).resolve().parent == out.resolve()
    ckpts = checkpoint_folders(out)
    if resume_from is None:
        earlier = [p.name for p in ckpts] + [n for n in _EARLIER_OUTPUTS if (out / n).exists()]
    else:  # unreadable ones (None) are damaged folders of this run that resume already reported
        earlier = [p.name for p in ckpts if (rid := run_id_of(p)) is not None and rid != run_id]
    if start_over:
        if inside:
            raise ConfigError(f"--start-over (logging.start_over) moves the contents of {out} aside, but the run "
                              f"resumes from {resume_from}, which is inside it: drop one of the two")
        rest = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
        if rest:
            dest = out.parent / f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while dest.exists():
                n += 1
                dest = dest.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            try:
                dest.mkdir()
                for p in rest:
                    os.replace(p, dest / p.name)
            except OSError as exc:
                raise ConfigError(f"--start-over: cannot move the contents of {out} to {dest}: "
                                  f"{exc.strerror or exc}; move them yourself") from None
            log(f"note: --start-over: moved the earlier contents of {out} ({len(rest)} entries) to {dest}")
    elif earlier:
        shown = ", ".join(earlier[:6]) + (", ..." if len(earlier) > 6 else "")
        how = ("Pass --resume to continue that run, " if resume_from is None and resumable else "Pass ")
        raise ConfigError(
            f"{option} {out} holds the outputs of {'an earlier' if resume_from is None else 'another'} "
            f"run ({shown}); this run would mix with them (pruning, --resume and core.evaluate --checkpoint "
            f"{out} would take the other run's). {how}--start-over (logging.start_over=true) to move them aside "
            f"to {out.name}.previous-<time>, or choose another output folder.")
    return run_id if run_id is not None else uuid.uuid4().hex[:16]
