"""What the apps (``core.train``, ``core.evaluate``, ``core.sft``, ``core.serve``, ``core.merge_lora``) share.

Each app is argparse, one library call and an exit code. This module holds the rest, once:

- :func:`load_run`: config file (or the embedded default) + ``key=value`` overrides ->
  :class:`~core.config.RunConfig` and a :class:`~core.plugins.PluginHost`;
- :func:`run_app`: the ONE table from exceptions to exit codes, so every app reports a given
  failure the same way: one ``error: ...`` paragraph on stderr, never a traceback.

Exit codes: ``0`` the run did what was asked; ``2`` bad input found (config, data, plugin,
checkpoint, an option value); ``1`` a failure while running (a reward that keeps failing, a
non-finite loss, a rollout server that cannot be reached, a full disk, a failed checkpoint write, a
plugin that called ``sys.exit``).
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config import RunConfig
    from core.plugins import PluginHost

#: The embedded default config: the CPU quickstart (examples/quickstart/config.yaml).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "defaults" / "quickstart.yaml"

#: Exit codes (see the module doc).
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class GiveOnce(argparse.Action):
    """An option that may be given only once (``--config a.yaml --config b.yaml`` silently ran b.yaml)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        seen = f"_given_{self.dest}"
        if getattr(namespace, seen, False):
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r} and {values!r}): "
                         "give it once")
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, values)


def load_run(config: str | None, overrides: Sequence[str], *, plugins: str | None = None, strict: bool = False,
             warn: bool = True) -> tuple[RunConfig, PluginHost]:
    """Validated config (``config`` or the quickstart default, plus overrides) and the plugin host.

    ``plugins`` (the ``--plugins`` flag) wins over the config's ``plugins:``. With ``warn``, a
    plugin that failed to load is named on stderr now, at the start of the run.
    """
    from core.config import build_config, load_raw
    from core.plugins import PluginHost

    cfg = build_config(load_raw(config, DEFAULT_CONFIG), list(overrides), source=config or "default config")
    host = PluginHost(plugins if plugins is not None else cfg.plugins, strict=strict)
    if warn:
        host.warn_failures()
    return cfg, host


def exit_code(exc: BaseException) -> int | None:
    """The exit code the apps give ``exc``; ``None`` for an unexpected error (a bug: keep its traceback)."""
    from core.config import ConfigError
    from core.grpo.guard import NonFiniteError
    from core.interfaces import DataError, RolloutError, RolloutSetupError
    from core.plugins import PluginError
    from core.plugins.registry import ComponentError
    from core.runtime.checkpoint import CheckpointWriteError
    from core.runtime.reward_runner import RewardError

    table: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
        (CheckpointWriteError, EXIT_FAILED),  # a ConfigError subclass: must come before it
        ((ConfigError, PluginError, DataError, ComponentError, RolloutSetupError), EXIT_BAD_INPUT),
        ((RewardError, NonFiniteError, RolloutError, OSError), EXIT_FAILED),
    )
    for types, code in table:
        if isinstance(exc, types):
            return code
    return None


def describe(exc: BaseException) -> str:
    """The one-paragraph message for ``exc`` (``OSError``: what failed on which file, on one line)."""
    if isinstance(exc, OSError) and not type(exc).__module__.startswith("core"):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"disk full while writing {exc.filename or 'output'}: free space in logging.output_dir and "
                    "rerun with --resume")
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where} [{type(exc).__name__}]"
    return str(exc)


def run_app(body: Callable[[], int]) -> int:
    """Call an app's library call and turn expected failures into ``error: ...`` and an exit code.

    A ``SystemExit`` raised inside the library call (a plugin calling ``sys.exit(0)``, say) is a
    failure, never a success: the run did not finish what it was asked to do.
    """
    try:
        return body()
    except SystemExit as exc:
        where = _origin(exc)
        print(f"error: the run was stopped by sys.exit({exc.code!r}){where} before it finished; "
              "nothing after that point was done", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"error: {describe(exc)}", file=sys.stderr)
        return code


def _origin(exc: BaseException) -> str:
    """`` in FILE:LINE`` of the frame that raised ``exc`` (where a plugin called ``sys.exit``)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" in {last.filename}:{last.lineno}"
