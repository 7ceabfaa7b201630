"""Interface-level conformance checks for plugin components.

Call these from a plugin's own tests; each raises :class:`ConformanceError` (an
``AssertionError``, so pytest shows it as a failure) with a message saying what is wrong::

    from core.testing.conformance import check_plugin, check_reward
    from core.interfaces import RewardItem

    def test_conformance():
        check_plugin("vlmr1_mine.hooks", expected={"rewards": ["mine"]})
        check_reward(MineReward, [(RewardItem("<answer>3</answer>", "3"), 1.0)], options={"strict": True})

The checks cover what the engine relies on: the class registers (``name``, a pydantic
``Options`` that rejects unknown keys, no abstract methods left), and each method returns
what the interface promises. Model-family checks live in ``core.testing.models``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from core.interfaces import (
    Completion,
    Component,
    Device,
    PromptInput,
    Reward,
    RewardBatch,
    RewardContext,
    RewardItem,
    RolloutContext,
    RolloutEngine,
    Sample,
    SamplingParams,
    TaskFormat,
)

#: Libraries a hook module must not import at import/registration time (they are slow or
#: optional); ``check_plugin`` fails if loading the plugin pulls one in.
HEAVY_MODULES: tuple[str, ...] = ("torch_npu", "vllm", "openai", "deepspeed", "tensorflow", "jax", "flash_attn")

#: Completions every reward must survive without raising (malformed model output is normal).
MALFORMED_COMPLETIONS: tuple[str, ...] = (
    "",
    "<answer>",
    "<think></think><answer></answer>",
    "}{][)(\"'\\",
    "<answer>[1, 2, 3</answer>",
    "\x00\ufffd é 中文 " * 4,
    "x" * 5000,
)


class ConformanceError(AssertionError):
    """A component does not behave as its interface promises."""


def _fail(cls: type, msg: str) -> ConformanceError:
    return ConformanceError(f"{cls.__module__}.{cls.__qualname__}: {msg}")


def check_component(cls: type, kind: str, options: dict[str, Any] | None = None) -> Component:
    """Checks every component shares; returns an instance built from ``options``.

    ``cls`` subclasses the kind's interface, has a usable ``name``, an ``Options`` pydantic
    model that accepts ``options`` and rejects an unknown key, no unimplemented abstract
    methods (the registry accepts it), and ``from_options`` builds it.
    """
    from core.plugins.registry import KINDS, Registry

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    try:
        Registry().add(kind, cls, "conformance")
    except (TypeError, ValueError) as exc:
        raise _fail(cls, f"cannot be registered as {kind}: {exc}") from None
    if not isinstance(getattr(cls, "description", ""), str):
        raise _fail(cls, "`description` must be a string")
    opts = dict(options or {})
    try:
        validated = cls.Options.model_validate(opts)
    except ValidationError as exc:
        raise _fail(cls, f"Options rejects the given options {opts}: {exc}") from None
    try:
        cls.Options.model_validate({**opts, "surely_not_an_option_": 1})
    except ValidationError:
        pass
    else:
        raise _fail(cls, "Options accepts unknown keys; set model_config = ConfigDict(extra='forbid') "
                         "so a misspelt option in a config is an error, not silently ignored")
    # A config is printed and saved as JSON/YAML, so options must serialise.
    try:
        json.dumps(validated.model_dump(mode="json"))
    except (TypeError, ValueError) as exc:
        raise _fail(cls, f"Options do not serialise to JSON: {exc}") from None
    try:
        inst = cls.from_options(opts)
    except Exception as exc:
        raise _fail(cls, f"from_options({opts}) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(getattr(inst, "options", None), BaseModel):
        raise _fail(cls, "instances must keep their validated options as `self.options` "
                         "(call super().__init__(options))")
    return inst


def _is_score(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value))


def check_reward(
    reward_cls: type[Reward],
    cases: Sequence[RewardItem | tuple[RewardItem, float | None]],
    options: dict[str, Any] | None = None,
    *,
    batch_independent: bool = True,
    tolerance: float = 1e-6,
    context: RewardContext | None = None,
) -> list[float | None]:
    """Check a reward class and score ``cases``; return the scores.

    Args:
        reward_cls: the :class:`Reward` subclass.
        cases: ``RewardItem`` objects, or ``(item, expected)`` pairs whose scores must equal
            ``expected`` (``None`` = not applicable) within ``tolerance``.
        options: the reward's options for this check.
        batch_independent: an item's score must not depend on the other items of the batch
            (checked by scoring each alone and the batch reversed). Turn off only for rewards
            that deliberately compare completions with each other.
        tolerance: absolute tolerance for expected values.
        context: handed to ``setup`` (default: an empty :class:`RewardContext`; pass one with a
            registry for rewards that build others, like the ``accuracy`` router).

    Checks: registrable with a strict ``Options``; ``setup`` accepts ``context``; an empty
    batch scores ``[]``; one finite float or ``None`` per item, in order; empty and malformed
    completions score without raising; deterministic (same input, same scores).
    """
    if not cases:
        raise ValueError("check_reward needs at least one case")
    reward = check_component(reward_cls, "rewards", options)
    assert isinstance(reward, Reward)
    if not isinstance(reward_cls.methods, tuple | list) or not all(isinstance(m, str) for m in reward_cls.methods):
        raise _fail(reward_cls, f"`methods` must be a tuple of strings, got {reward_cls.methods!r}")
    reward.setup(context if context is not None else RewardContext())
    items = [c[0] if isinstance(c, tuple) else c for c in cases]
    expected = [c[1] if isinstance(c, tuple) else ... for c in cases]
    for item in items:
        if not isinstance(item, RewardItem):
            raise TypeError(f"check_reward: cases must be RewardItem or (RewardItem, expected), got {item!r}")

    def score(batch_items: list[RewardItem], what: str) -> list[float | None]:
        # Deep copies: a reward must not rely on (or mutate) the caller's objects.
        batch = RewardBatch([copy.deepcopy(i) for i in batch_items])
        try:
            out = reward.score(batch)
        except Exception as exc:
            raise _fail(reward_cls, f"score() raised on {what}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, list) or len(out) != len(batch_items):
            raise _fail(reward_cls, f"score() on {what} must return a list of {len(batch_items)} scores, got {out!r}")
        bad = [(i, s) for i, s in enumerate(out) if not _is_score(s)]
        if bad:
            raise _fail(reward_cls, f"score() on {what} returned non-scores {bad} (each must be a finite "
                                    "float, or None for 'not applicable')")
        return [None if s is None else float(s) for s in out]

    if score([], "an empty batch") != []:
        raise _fail(reward_cls, "score() of an empty batch must be []")
    scores = score(items, "the cases")
    for i, (got, want) in enumerate(zip(scores, expected, strict=True)):
        if want is ...:
            continue
        if (got is None) != (want is None) or (want is not None and abs(got - want) > tolerance):
            raise _fail(reward_cls, f"case {i} ({items[i].completion[:80]!r}, solution {items[i].solution!r}) "
                                    f"scored {got}, expected {want}")
    if score(items, "the cases, again") != scores:
        raise _fail(reward_cls, "score() is not deterministic: the same batch scored differently twice")
    malformed = [replace(items[i % len(items)], completion=c) for i, c in enumerate(MALFORMED_COMPLETIONS)]
    score(malformed, "empty/malformed completions")
    if batch_independent and len(items) > 1:
        rev = score(items[::-1], "the cases in reverse order")
        if rev[::-1] != scores:
            raise _fail(reward_cls, f"scores depend on the order of the batch: {scores} vs reversed {rev[::-1]}")
        for i, item in enumerate(items):
            alone = score([item], f"case {i} alone")[0]
            if alone != scores[i]:
                raise _fail(reward_cls, f"case {i} scores {alone} alone but {scores[i]} within the batch")
    return scores


def _check_messages(cls: type, sample: Sample) -> None:
    msgs = sample.messages
    if not isinstance(msgs, list) or not msgs:
        raise _fail(cls, f"sample {sample.id!r}: messages must be a non-empty list of chat turns")
    n_images = 0
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _fail(cls, f"sample {sample.id!r}: message {j} must be a dict with role system|user|assistant, "
                             f"got {m!r}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _fail(cls, f"sample {sample.id!r}: message {j} content must be a string or a list of parts")
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise _fail(cls, f"sample {sample.id!r}: message {j} has a part {part!r}; parts are "
                                 "{'type': 'text', 'text': ...} or {'type': 'image'}")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise _fail(cls, f"sample {sample.id!r}: message {j} text part without a string 'text'")
            if part["type"] == "image":
                n_images += 1
    if msgs[-1].get("role") != "user":
        raise _fail(cls, f"sample {sample.id!r}: the last message must be the user's (the prompt ends before "
                         f"the answer), got role {msgs[-1].get('role')!r}")
    if n_images != len(sample.images):
        raise _fail(cls, f"sample {sample.id!r}: {n_images} image placeholder(s) in messages but "
                         f"{len(sample.images)} image(s)")


def check_task(
    task_cls: type[TaskFormat],
    options: dict[str, Any] | None = None,
    split: str = "train",
    *,
    max_samples: int = 32,
    allow_empty: bool = False,
) -> list[Sample]:
    """Check a task format and load ``split``; return the first ``max_samples`` samples.

    Checks: registrable with a strict ``Options``; ``load(split)`` returns a sized, indexable
    sequence of :class:`Sample`; ids are non-empty strings, unique over the whole split, and
    in the same order on a second load; messages are well-formed chat turns ending with the
    user's, with exactly one ``{"type": "image"}`` placeholder per image; images load as RGB
    PIL images; ``stats()`` is a ``dict[str, int]``.
    """
    task = check_component(task_cls, "tasks", options)
    assert isinstance(task, TaskFormat)
    try:
        samples = task.load(split)
        n = len(samples)
    except Exception as exc:
        raise _fail(task_cls, f"load({split!r}) raised {type(exc).__name__}: {exc}") from exc
    if n == 0 and not allow_empty:
        raise _fail(task_cls, f"load({split!r}) returned no samples")
    ids = [samples[i].id for i in range(n)]
    if not all(isinstance(i, str) and i for i in ids):
        raise _fail(task_cls, "every Sample.id must be a non-empty string")
    dupes = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != n else []
    if dupes:
        raise _fail(task_cls, f"Sample ids are not unique in split {split!r}: {dupes[:5]}")
    again = task_cls.from_options(options or {}).load(split)
    if [again[i].id for i in range(len(again))] != ids:
        raise _fail(task_cls, f"load({split!r}) is not deterministic: a second load gives other ids or order")
    out = []
    for i in range(min(n, max_samples)):
        s = samples[i]
        if not isinstance(s, Sample):
            raise _fail(task_cls, f"item {i} of load({split!r}) is {type(s).__name__}, not a Sample")
        if not isinstance(s.meta, dict) or not (s.reward_method is None or isinstance(s.reward_method, str)):
            raise _fail(task_cls, f"sample {s.id!r}: meta must be a dict and reward_method a string or None")
        _check_messages(task_cls, s)
        try:
            images = s.load_images()
        except Exception as exc:
            raise _fail(task_cls, f"sample {s.id!r}: load_images() raised {type(exc).__name__}: {exc}") from exc
        for img in images:
            if getattr(img, "mode", None) != "RGB" or min(img.size) <= 0:
                raise _fail(task_cls, f"sample {s.id!r}: load_images() must give non-empty RGB images, got {img!r}")
        out.append(s)
    stats = task.stats()
    if not isinstance(stats, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in stats.items()):
        raise _fail(task_cls, f"stats() must return dict[str, int], got {stats!r}")
    return out


def check_device(device_cls: type[Device], options: dict[str, Any] | None = None) -> Device:
    """Check a device class; return the instance.

    Checks: registrable with a strict ``Options``; ``available()`` is ``(bool, str)`` with a
    reason when unusable. Where usable: ``torch_device`` is a ``torch.device``, dtypes include
    ``float32`` and are torch dtype names, attention kernels are a non-empty list of strings,
    ``memory_stats`` is ``dict[str, float]``, and ``seed`` makes torch, numpy and ``random``
    reproducible.
    """
    dev = check_component(device_cls, "devices", options)
    assert isinstance(dev, Device)
    if not isinstance(device_cls.priority, int) or not isinstance(device_cls.distributed_backend, str):
        raise _fail(device_cls, "`priority` must be an int and `distributed_backend` a string")
    avail = dev.available()
    if not (isinstance(avail, tuple) and len(avail) == 2 and isinstance(avail[0], bool) and isinstance(avail[1], str)):
        raise _fail(device_cls, f"available() must return (bool, str), got {avail!r}")
    if not avail[0]:
        if not avail[1].strip():
            raise _fail(device_cls, "available() returned False without a reason")
        return dev
    import random

    import numpy as np
    import torch

    td = dev.torch_device(0)
    if not isinstance(td, torch.device):
        raise _fail(device_cls, f"torch_device() must return a torch.device, got {td!r}")
    dtypes = dev.supported_dtypes()
    if "float32" not in dtypes or not all(isinstance(getattr(torch, d, None), torch.dtype) for d in dtypes):
        raise _fail(device_cls, f"supported_dtypes() must be torch dtype names including 'float32', got {dtypes!r}")
    attn = dev.attention_implementations()
    if not attn or not all(isinstance(a, str) for a in attn):
        raise _fail(device_cls, f"attention_implementations() must be a non-empty list of names, got {attn!r}")
    mem = dev.memory_stats()
    if not isinstance(mem, dict) or not all(isinstance(k, str) and isinstance(v, int | float) for k, v in mem.items()):
        raise _fail(device_cls, f"memory_stats() must return dict[str, float], got {mem!r}")

    def draw() -> tuple[float, float, list[float]]:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    dev.seed(1234)
    first = draw()
    dev.seed(1234)
    if draw() != first:
        raise _fail(device_cls, "seed() does not make random, numpy and torch reproducible")
    return dev


def check_rollout(
    engine_cls: type[RolloutEngine],
    options: dict[str, Any] | None = None,
    *,
    ctx: RolloutContext | None = None,
    prompts: list[PromptInput] | None = None,
    sampling: SamplingParams | None = None,
) -> list[list[Completion]] | None:
    """Check a rollout engine class; with ``ctx`` and ``prompts``, also generate and check the output.

    Generation checks: ``sampling.n`` completions per prompt in prompt order, each with a
    list of int ``ids`` (at most ``max_new_tokens``), a string ``text``, a bool ``truncated``
    and ``logprobs`` absent or one per id; ``sync_weights`` accepts the model.
    """
    engine = check_component(engine_cls, "rollouts", options)
    assert isinstance(engine, RolloutEngine)
    if ctx is None or prompts is None:
        return None
    sampling = sampling or SamplingParams(n=2, max_new_tokens=4)
    engine.setup(ctx)
    out = engine.generate(prompts, sampling)
    if not isinstance(out, list) or len(out) != len(prompts):
        raise _fail(engine_cls, f"generate() must return one list per prompt ({len(prompts)}), got {type(out)}")
    for p, group in enumerate(out):
        if len(group) != sampling.n:
            raise _fail(engine_cls, f"prompt {p}: {len(group)} completions, expected n={sampling.n}")
        for c in group:
            if not isinstance(c, Completion):
                raise _fail(engine_cls, f"prompt {p}: {c!r} is not a Completion")
            if not all(isinstance(t, int) for t in c.ids) or len(c.ids) > sampling.max_new_tokens:
                raise _fail(engine_cls, f"prompt {p}: ids must be at most {sampling.max_new_tokens} ints, got {c.ids}")
            if not isinstance(c.text, str) or not isinstance(c.truncated, bool):
                raise _fail(engine_cls, f"prompt {p}: text must be str and truncated bool")
            if c.logprobs is not None and len(c.logprobs) != len(c.ids):
                raise _fail(engine_cls, f"prompt {p}: {len(c.logprobs)} logprobs for {len(c.ids)} ids")
    engine.sync_weights(ctx.model)
    return out


_LOAD_SCRIPT = """
import importlib, json, sys
from core.plugins import PluginHost
host = PluginHost(autoload=False)  # core and its built-ins are not the plugin's imports
before = set(sys.modules)
mod = importlib.import_module({module!r})
info = host.register(mod, "conformance-check")
heavy = sorted(m for m in {heavy!r} if m in sys.modules and m not in before)
print(json.dumps({{"status": info.status, "error": info.error, "heavy": heavy}}))
"""


def check_plugin(
    module: str | ModuleType | object,
    expected: dict[str, list[str]] | None = None,
    *,
    distribution: str = "conformance-check",
    forbid_imports: Sequence[str] = HEAVY_MODULES,
) -> dict[str, list[str]]:
    """Check a plugin's hook module (or object) registers cleanly; return its components by kind.

    ``expected`` (kind -> names) must be a subset of what it registers. When ``module`` is
    a dotted module name, importing it and running its hooks is also done in a fresh
    interpreter to check it pulls in none of ``forbid_imports`` (hook modules must stay light:
    heavy libraries belong inside the components' methods).
    """
    from core.plugins import PluginHost

    if isinstance(module, str):
        script = _LOAD_SCRIPT.format(module=module, heavy=tuple(forbid_imports))
        # The child sees what this process can import (e.g. a plugin put on sys.path by a conftest).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        if proc.returncode != 0:
            raise ConformanceError(f"importing plugin module {module} failed:\n{proc.stderr}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["heavy"]:
            raise ConformanceError(f"loading plugin module {module} imports {', '.join(report['heavy'])}; "
                                   "import heavy libraries inside the components' methods instead")
        import importlib

        module = importlib.import_module(module)
    host = PluginHost(autoload=False)
    info = host.register(module, distribution)
    if info.status != "loaded":
        raise ConformanceError(f"plugin {getattr(module, '__name__', module)!r} failed to register:\n{info.error}")
    if not info.components:
        raise ConformanceError(f"plugin {getattr(module, '__name__', module)!r} registers no components")
    for kind, names in (expected or {}).items():
        missing = sorted(set(names) - set(info.components.get(kind, [])))
        if missing:
            raise ConformanceError(f"plugin registers no {kind} named {', '.join(missing)}; "
                                   f"it registers {info.components}")
    return info.components
