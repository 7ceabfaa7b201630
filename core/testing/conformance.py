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
    from core.registry import KINDS, Registry

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


# ---- model families: the shared-prefix training forward ----------------------------------
#: Tolerances of :func:`check_shared_prefix` (float32 on CPU; observed ~1e-6 on every family).
SHARED_LOGPROB_ATOL = 1e-5
SHARED_GRAD_RTOL = 1e-4


def check_shared_prefix(ctx: Any, group_size: int = 3) -> None:
    """The packed shared-prefix forward equals the plain one, with images encoded once.

    For a family with ``prefix_sharing`` on, three prompts (0, 1 and 2 images) with
    ``group_size`` completions each (different lengths, so padding is exercised) go through
    the plain path (``[prompt, completion]`` rows, prompts processed per completion) and the
    packed path (:mod:`core.grpo.prefix`). Asserts: per-token log-probs equal within
    ``SHARED_LOGPROB_ATOL``; every parameter gradient of the summed log-probs within
    ``SHARED_GRAD_RTOL`` of the largest gradient; the vision tower receives exactly one
    group's worth of pixels (``1 / group_size`` of the plain path's: each unique image
    once). A family that has not opted in must fall back (``can_share_prefix`` is false).
    """
    import torch

    from core.grpo.logprobs import build_train_inputs, completion_logprobs, pad_completions
    from core.grpo.prefix import can_share_prefix, pack, packed_logprobs
    from core.testing.models import _prompts

    model, proc, family = ctx.model, ctx.processor, ctx.family
    name = ctx.family_cls.name
    if not family.prefix_sharing:
        if can_share_prefix(family, model):
            raise ConformanceError(f"{name}: prefix_sharing is off but can_share_prefix() is true")
        return
    if not can_share_prefix(family, model):
        raise ConformanceError(f"{name}: prefix_sharing is on but the tiny model's attention "
                               f"({model.config._attn_implementation!r}) cannot take a block-causal mask")
    tok = getattr(proc, "tokenizer", proc)
    words = tok.encode(" red green blue yellow the answer is", add_special_tokens=False)
    prompts = _prompts(ctx)
    rows = [p for p in prompts for _ in range(group_size)]
    comps = [[words[(r + i) % len(words)] for i in range(3 + 2 * (r % group_size))] for r in range(len(rows))]
    ids, mask = pad_completions(comps, tok.pad_token_id)
    tower = model.get_submodule(family.vision_module_names(model)[0])
    pixels = [0]

    def count(_m: Any, args: Any, kwargs: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        pixels[0] += x.numel() if isinstance(x, torch.Tensor) else 0

    def run(fn: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        pixels[0] = 0
        model.zero_grad(set_to_none=True)
        lp = fn()
        (lp * mask).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return lp.detach(), grads, pixels[0]

    def plain() -> torch.Tensor:
        rep = family.process(proc, [p.text for p in rows], [p.images for p in rows])
        return completion_logprobs(model, build_train_inputs(rep, ids, mask, family.per_token_keys), ids.shape[1])

    handle = tower.register_forward_pre_hook(count, with_kwargs=True)
    try:
        lp_plain, g_plain, px_plain = run(plain)
        packed = pack(family, model, proc, rows, ids, force=True)
        lp_shared, g_shared, px_shared = run(lambda: packed_logprobs(model, packed))
    finally:
        handle.remove()
    m = mask.bool()
    diff = (lp_plain - lp_shared)[m].abs().max().item()
    if diff > SHARED_LOGPROB_ATOL:
        raise ConformanceError(f"{name}: shared-prefix log-probs differ from the plain path by {diff:.3g} "
                               f"(> {SHARED_LOGPROB_ATOL}); are prompt_positions() right for this model?")
    if g_plain.keys() != g_shared.keys():
        raise ConformanceError(f"{name}: the shared-prefix path reaches other parameters: "
                               f"{sorted(g_plain.keys() ^ g_shared.keys())[:5]}")
    scale = max(g.abs().max().item() for g in g_plain.values())
    worst = max(g_plain, key=lambda n: (g_plain[n] - g_shared[n]).abs().max().item())
    gdiff = (g_plain[worst] - g_shared[worst]).abs().max().item()
    if gdiff > SHARED_GRAD_RTOL * scale:
        raise ConformanceError(f"{name}: shared-prefix gradient of {worst} differs by {gdiff:.3g} "
                               f"(largest gradient {scale:.3g})")
    if px_plain == 0 or px_shared * group_size != px_plain:
        raise ConformanceError(f"{name}: the vision tower got {px_shared} pixel values in the shared path and "
                               f"{px_plain} in the plain one; expected each unique image once (1/{group_size})")


# ---- model families: shared prefill in generation ------------------------------------------
#: Tolerance of :func:`check_shared_prefill` on per-step logits (float32 on CPU; observed 0 to ~2e-7).
SHARED_PREFILL_LOGIT_ATOL = 1e-5


def check_shared_prefill(ctx: Any, group_size: int = 3, max_new_tokens: int = 8) -> None:
    """Generation with each prompt prefilled once equals the plain ``num_return_sequences`` path.

    For a family with ``shared_prefill`` on, three left-padded prompts (0, 1 and 2 images, so
    of different lengths) sample ``group_size`` completions each with the same seed, once with
    ``model.generate(num_return_sequences=...)`` and once with
    :func:`core.grpo.prefill.shared_prefill_generate` (image tokens suppressed, as the rollout
    does). Asserts: the same sequences (same sampled tokens); every step's raw logits within
    ``SHARED_PREFILL_LOGIT_ATOL``; the language model's first call takes the unique prompts
    minus their last token (``[3, L-1]``: each prompt prefilled once) and every later call one
    token per row (``[3*group_size, 1]``); the vision tower gets exactly the pixels of one
    forward of the unique prompts (each unique image once). Then the built-in rollout with
    ``shared_prefill`` on and off returns the same completions for the same seed. A family that
    has not opted in must fall back (``can_share_prefill`` is false).
    """
    import torch

    from core.grpo.prefill import can_share_prefill, shared_prefill_generate
    from core.grpo.rollout import TransformersRollout, eos_token_ids
    from core.interfaces import RolloutContext
    from core.testing.models import _prompts

    model, proc, family = ctx.model, ctx.processor, ctx.family
    name = ctx.family_cls.name
    prompts = _prompts(ctx)
    inputs = family.process(proc, [p.text for p in prompts], [p.images for p in prompts])
    tok = getattr(proc, "tokenizer", proc)
    suppressed = family.suppressed_token_ids(proc, model)
    kw: dict[str, Any] = dict(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        suppress_tokens=suppressed, eos_token_id=sorted(eos_token_ids(model, proc)),
        pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True,
    )
    if not family.shared_prefill:
        if can_share_prefill(family, model, kw, inputs):
            raise ConformanceError(f"{name}: shared_prefill is off but can_share_prefill() is true")
        return
    if not can_share_prefill(family, model, kw, inputs):
        raise ConformanceError(f"{name}: shared_prefill is on but can_share_prefill() is false for the tiny model "
                               f"{type(model).__name__} and 0/1/2-image prompts")
    pad = inputs["attention_mask"].sum(1)
    if len(set(pad.tolist())) < 2:
        raise ConformanceError(f"{name}: the 0/1/2-image prompts have equal lengths; left padding is not exercised")

    tower = model.get_submodule(family.vision_module_names(model)[0])
    pixels = [0]
    lm_calls: list[tuple[int, ...]] = []

    def count_pixels(_m: Any, args: Any, kwargs: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        pixels[0] += x.numel() if isinstance(x, torch.Tensor) else 0

    def count_tokens(_m: Any, args: Any, _out: Any) -> None:
        lm_calls.append(tuple(args[0].shape))

    def run(fn: Any) -> tuple[Any, int, list[tuple[int, ...]]]:
        pixels[0] = 0
        lm_calls.clear()
        torch.manual_seed(ctx.seed)
        with torch.no_grad():
            out = fn()
        return out, pixels[0], list(lm_calls)

    was_training = model.training
    model.eval()
    hooks = [tower.register_forward_pre_hook(count_pixels, with_kwargs=True),
             model.get_input_embeddings().register_forward_hook(count_tokens)]
    try:
        _, px_once, _ = run(lambda: model(**inputs))
        plain, _, _ = run(lambda: model.generate(**inputs, num_return_sequences=group_size, **kw))
        shared, px_shared, calls = run(lambda: shared_prefill_generate(model, family, inputs, group_size, **kw))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not torch.equal(plain.sequences, shared.sequences):
        raise ConformanceError(f"{name}: shared-prefill generation sampled other tokens than the plain path:\n"
                               f"{plain.sequences.tolist()}\nvs\n{shared.sequences.tolist()}")
    diff = max((a - b).abs().max().item() for a, b in zip(plain.logits, shared.logits, strict=True))
    if diff > SHARED_PREFILL_LOGIT_ATOL:
        raise ConformanceError(f"{name}: shared-prefill logits differ from the plain path by {diff:.3g} "
                               f"(> {SHARED_PREFILL_LOGIT_ATOL}); are the continued positions right?")
    B, L = inputs["input_ids"].shape
    rows = B * group_size
    if not calls or calls[0] != (B, L - 1) or any(c != (rows, 1) for c in calls[1:]):
        raise ConformanceError(f"{name}: language-model calls {calls[:3]}…; expected one prefill of the unique "
                               f"prompts {(B, L - 1)} then one token per row {(rows, 1)}")
    if px_once == 0 or px_shared != px_once:
        raise ConformanceError(f"{name}: the vision tower got {px_shared} pixel values in shared-prefill generation, "
                               f"{px_once} in one forward of the unique prompts; expected each unique image once")

    # The engine: same seed, same completions with the option on and off (suppression on).
    def rollout(on: bool) -> list[list[list[int]]]:
        from core.interfaces import SamplingParams

        engine = TransformersRollout.from_options({"shared_prefill": on})
        engine.setup(RolloutContext(model=model, processor=proc, family=family, device=torch.device("cpu"),
                                    suppressed_token_ids=suppressed))
        torch.manual_seed(ctx.seed)
        groups = engine.generate(prompts, SamplingParams(n=group_size, max_new_tokens=max_new_tokens))
        return [[c.ids for c in g] for g in groups]

    if rollout(True) != rollout(False):
        raise ConformanceError(f"{name}: TransformersRollout samples differently with shared_prefill on and off")
