"""Optional dependencies: a missing one is a one-line error with the pip command, not a traceback."""

from __future__ import annotations

import importlib.util

from core.config import ConfigError


class MissingExtraError(ConfigError):
    """An optional package that this command or setting needs is not installed."""


def require(modules: tuple[str, ...] | str, extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` unless every module in ``modules`` is importable.

    Checks with ``find_spec`` (nothing is imported), so it is cheap to call before any work.
    ``extra`` is the ``vlmr1[...]`` extra that installs them; ``what`` names the feature.
    """
    names = (modules,) if isinstance(modules, str) else modules
    missing = [m for m in names if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install 'vlmr1[{extra}]'")
