"""pytest plugin for vlmr1 plugin authors (registered via the ``pytest11`` entry point).

Fixtures:

``plugin_host``
    A fresh :class:`core.plugins.PluginHost` with only core's built-ins (no entry points are
    loaded, so what else is installed cannot change the test).
``register_plugin``
    ``register_plugin(obj_or_classes..., distribution="test-plugin", version="0.1.0") -> PluginHost``:
    registers a hook module, a plugin object, or component classes into ``plugin_host`` for
    this test and returns the host. A plugin that fails to register raises
    :class:`core.plugins.PluginError` with its traceback.
``make_distribution``
    ``make_distribution(name, version="0.1.0", *, modules, entry_points=None, requires=...)``:
    writes an installed-looking distribution (see :func:`core.testing.write_distribution`)
    into a temporary folder that is on ``sys.path`` for this test, so ``PluginHost()`` loads
    it through real entry points. Its modules are dropped from ``sys.modules`` afterwards.

Example::

    def test_my_reward(register_plugin):
        host = register_plugin(my_plugin.hooks, distribution="vlmr1-plugin-mine")
        reward = host.registry.create("rewards", "mine", {"threshold": 0.5})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from core.plugins import PluginHost


@pytest.fixture
def plugin_host() -> PluginHost:
    """A fresh plugin host with only the built-in components (no entry points loaded)."""
    from core.plugins import PluginHost

    return PluginHost(autoload=False)


@pytest.fixture
def register_plugin(plugin_host: PluginHost) -> Callable[..., PluginHost]:
    """Register a plugin (module, object, or component classes) into ``plugin_host`` for one test."""
    from core.plugins import PluginError
    from core.testing import ComponentsPlugin

    def register(*objs: Any, distribution: str = "test-plugin", version: str = "0.1.0") -> PluginHost:
        if len(objs) == 1 and not isinstance(objs[0], type):
            obj = objs[0]  # a hook module or plugin object
        else:
            obj = ComponentsPlugin(*objs)  # component classes
        info = plugin_host.register(obj, distribution, version)
        if info.status != "loaded":
            raise PluginError(f"registering {distribution} failed ({info.status}):\n{info.error}")
        return plugin_host

    return register


@pytest.fixture
def make_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """Write throwaway installed distributions into a temporary ``sys.path`` folder."""
    from core.testing import write_distribution

    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))  # also invalidates importlib's caches
    written: list[str] = []

    def make(name: str, version: str = "0.1.0", **kw: Any) -> Path:
        written.extend(kw.get("modules", {}))
        info = write_distribution(root, name, version, **kw)
        importlib.invalidate_caches()
        return info

    yield make
    top = {Path(rel).parts[0].removesuffix(".py") for rel in written}
    for mod in list(sys.modules):
        if mod.split(".")[0] in top:
            del sys.modules[mod]
