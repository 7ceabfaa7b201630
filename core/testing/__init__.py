"""Helpers for plugin authors: a fresh plugin host, test data builders, conformance checks.

The pytest fixtures (``plugin_host``, ``register_plugin``, ``make_distribution``) come from
:mod:`core.testing.pytest_plugin`, which pytest loads automatically once ``vlmr1`` is
installed (``pytest11`` entry point). Conformance checks per interface live in
:mod:`core.testing.conformance`; tiny offline model building blocks in
:mod:`core.interfaces.tiny` (and model-family checks in ``core.testing.models``).

Everything here is importable without torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.hookspecs import hookimpl
from core.interfaces import Device, ModelFamily, Reward, RewardBatch, RewardItem, RolloutEngine, Sample, TaskFormat

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ComponentsPlugin",
    "HangsOnce",
    "make_image",
    "make_sample",
    "reward_batch",
    "write_distribution",
]


class ComponentsPlugin:
    """A plugin object that registers the given component classes (each through its kind's hook).

    Lets a test register classes without writing a hook module::

        host.register(ComponentsPlugin(MyReward, MyTask), "my-test-plugin")
    """

    def __init__(self, *classes: type) -> None:
        bases = (ModelFamily, Reward, TaskFormat, Device, RolloutEngine)
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, bases)):
                raise TypeError(f"ComponentsPlugin: {cls!r} is not a component class "
                                f"(a subclass of {', '.join(b.__name__ for b in bases)})")
        self.classes = classes
        self.__name__ = "ComponentsPlugin(" + ", ".join(c.__name__ for c in classes) + ")"

    def _register(self, register: Any, *bases: type) -> None:
        for cls in self.classes:
            if issubclass(cls, bases):
                register(cls)

    @hookimpl
    def vlmr1_register_models(self, register: Any) -> None:
        """Register the model families among the classes."""
        self._register(register, ModelFamily)

    @hookimpl
    def vlmr1_register_rewards(self, register: Any) -> None:
        """Register the rewards among the classes."""
        self._register(register, Reward)

    @hookimpl
    def vlmr1_register_tasks(self, register: Any) -> None:
        """Register the task formats among the classes."""
        self._register(register, TaskFormat)

    @hookimpl
    def vlmr1_register_devices(self, register: Any) -> None:
        """Register the devices among the classes."""
        self._register(register, Device)

    @hookimpl
    def vlmr1_register_rollouts(self, register: Any) -> None:
        """Register the rollout engines among the classes."""
        self._register(register, RolloutEngine)


class HangsOnce(Reward):
    """A reward whose first call blocks (a lost connection) and every later call scores 1.0.

    For testing a reward runner's timeouts: the first call waits on :attr:`release` for at
    most ``hang_s`` seconds; set ``release`` when the test ends so no thread lingers.
    """

    name = "hangs_once"

    def __init__(self, hang_s: float = 60.0) -> None:
        import threading

        super().__init__()
        self.hang_s = hang_s
        self.calls = 0
        self.release = threading.Event()

    def score(self, batch: RewardBatch) -> list[float]:
        """Block on the first call, then 1.0 for every completion."""
        self.calls += 1
        if self.calls == 1:
            self.release.wait(self.hang_s)
        return [1.0] * len(batch)


def reward_batch(completions: Iterable[str], solution: Any = None, **fields: Any) -> RewardBatch:
    """A :class:`RewardBatch` with one :class:`RewardItem` per completion, all sharing ``solution``.

    ``fields`` are passed to every ``RewardItem`` (``prompt``, ``image_sizes``, ``meta`` ...).
    """
    return RewardBatch([RewardItem(completion=c, solution=solution, **fields) for c in completions])


def make_image(size: tuple[int, int] = (32, 32), color: str | tuple[int, int, int] = "red",
               mode: str = "RGB") -> Image.Image:
    """A solid-colour PIL image (``mode`` other than RGB tests conversion, e.g. ``"L"``/``"RGBA"``)."""
    from PIL import Image

    return Image.new("RGB", size, color).convert(mode)


def make_sample(question: str = "What colour is this image?", *, images: Sequence[Any] = (), solution: Any = None,
                id: str = "s0", system: str | None = None, **kw: Any) -> Sample:
    """A well-formed single-turn :class:`Sample`: the image placeholders, then the question."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": question})
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return Sample(id=id, images=list(images), messages=messages, solution=solution, **kw)


def write_distribution(
    root: str | Path,
    name: str,
    version: str = "0.1.0",
    *,
    modules: Mapping[str, str],
    entry_points: Mapping[str, str] | None = None,
    requires: Sequence[str] | None = None,
) -> Path:
    """Write an installed-looking distribution into ``root`` (a ``sys.path`` / ``PYTHONPATH`` folder).

    Creates the module files and ``<name>-<version>.dist-info`` with ``METADATA`` and
    ``entry_points.txt``: exactly what ``importlib.metadata`` reads for a pip-installed
    package, without running pip (fast, and the shared environment stays untouched).

    Args:
        root: folder to write into (put it on ``sys.path`` or ``PYTHONPATH``).
        name: distribution name, e.g. ``vlmr1-plugin-demo``.
        version: distribution version.
        modules: relative file path -> source, e.g. ``{"demo_pkg/hooks.py": "..."}``.
            ``__init__.py`` files of the packages are created when missing.
        entry_points: ``vlmr1`` entry points, name -> ``module`` (default: none).
        requires: ``Requires-Dist`` lines (the host checks the ``vlmr1`` one); default: a pin to
            this core's minor version (``vlmr1>=0.2,<0.3`` for 0.2.x).

    Returns:
        The ``.dist-info`` folder.
    """
    root = Path(root)
    for rel, src in modules.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src)
        for parent in Path(rel).parents:
            if str(parent) != "." and not (root / parent / "__init__.py").exists():
                (root / parent / "__init__.py").write_text("")
    # Wheel naming: the dist-info folder uses the name with runs of -_. replaced by _.
    info = root / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if requires is None:
        from core import __version__

        major, minor = (int(x) for x in __version__.split(".")[:2])
        requires = (f"vlmr1>={major}.{minor},<{major}.{minor + 1}",)
    meta += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    if entry_points:
        eps = "[vlmr1]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(eps)
    (info / "INSTALLER").write_text("vlmr1-testing\n")
    return info
