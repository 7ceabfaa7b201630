"""Limits on prompts that need the model's tokenizer or processor, applied to every loaded row before training.

A task validates its rows without knowing the model. These faults only show with the model's
processor, and all used to pass loading and then fail or stall at step 1 with a transformers
traceback naming neither the task nor the row:

- **image placeholders that do not match the images**: a sample whose messages hold a different
  number of ``{"type": "image"}`` parts than it has images (a prompt without the placeholder, two
  placeholders for one image). Checked on every row, without the tokenizer.

- **special tokens in the text**: a prompt holding ``<|image_pad|>``, ``<|vision_start|>`` or a
  chat marker (``<|im_start|>``) is tokenised as those very tokens, so the processor counts more
  image placeholders than images (a transformers traceback) or the chat structure is forged.
  Such rows are **refused, not escaped**: escaping would change the text the model sees, and a
  data set that holds these strings is almost always a formatting mistake.
- **over-long prompts**: ``data.max_prompt_tokens`` (default 4096) bounds the prompt *text*
  (chat template and image tokens are not counted); a 240k-token prompt sat at 5 GB with no step done.

Each refused row follows the task's bad-row policy (:meth:`TaskFormat.skips_bad_samples`,
``on_bad_row`` for the file tasks): skipped and counted, or a :class:`DataError` naming the task,
the sample id, and its file and line (``Sample.meta["source_file"]`` / ``["source_line"]``).

Then the **render check** (:func:`check_render`) renders the first few kept samples through the
model family exactly as generation will (chat template, then the processor with the images; no
weights): a task whose samples the family cannot render (a custom message layout, a content part
the chat template does not know) stops with one :class:`DataError` naming the task, the sample
and the processor's own complaint. Training runs it at start-up, ``core.train --dry-run`` when
the model's files are already on disk.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from core.interfaces import DataError, Sample

#: A text longer than this many characters per allowed token is over the limit without tokenising it.
CHARS_PER_TOKEN_BOUND = 32
#: Refused rows logged one by one; the rest are only counted.
LOG_REFUSED = 20
#: Samples the render check takes through the family's chat template and processor.
RENDER_CHECK_SAMPLES = 4


def prompt_text(sample: Sample) -> str:
    """Every text part of the sample's prompt messages (system and user turns), joined by newlines."""
    parts: list[str] = []
    for msg in sample.messages:
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "\n".join(parts)


def image_parts(sample: Sample) -> int:
    """The number of ``{"type": "image"}`` parts in the sample's messages (the placeholders images fill)."""
    n = 0
    for msg in sample.messages:
        content = msg.get("content")
        if isinstance(content, list):
            n += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image")
    return n


def image_problem(sample: Sample) -> tuple[str, str] | None:
    """``(reason, message)`` when the sample's image placeholders and images differ in number, else ``None``."""
    parts, images = image_parts(sample), len(sample.images)
    if parts == images:
        return None
    return "image_placeholders", (f"the prompt has {parts} image placeholder(s) ({{\"type\": \"image\"}} parts; "
                                  f"<image> tags in a jsonl row) but the sample has {images} image(s): each image "
                                  "needs exactly one placeholder where it stands in the prompt")


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (named ones and added tokens marked special), longest first.

    Added tokens that are not special (``<think>`` in some vocabularies) are ordinary markup and allowed.
    """
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok.content))
    return sorted((t for t in found if t), key=lambda t: (-len(t), t))


def special_tokens_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """One regular expression matching any of :func:`special_tokens` (longest first), ``None`` if there are none.

    The one test for "text the tokenizer would read as a special token": data rows here, chat
    messages in ``core.serve``. ``tokenizer`` may be a processor holding one.
    """
    tokens = special_tokens(getattr(tokenizer, "tokenizer", tokenizer))
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


class PromptScreen:
    """Checks prompt text against one tokenizer's special tokens and a token limit."""

    def __init__(self, tokenizer: Any, max_prompt_tokens: int | None, task_name: str | None = None) -> None:
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        self.max_tokens = max_prompt_tokens
        self.task_name = task_name
        self._special = special_tokens_pattern(self.tokenizer)

    def problem(self, text: str) -> tuple[str, str] | None:
        """``(reason, message)`` when ``text`` is not acceptable as prompt text, else ``None``."""
        if self._special is not None:
            m = self._special.search(text)
            if m:
                return "special_token", (f"the prompt text contains {m.group(0)!r}, one of the model's special "
                                         "tokens (image placeholders, chat markers ...); rows holding them are "
                                         "refused, not escaped: remove it from the data")
        limit = self.max_tokens
        if limit is None:
            return None
        if len(text) > CHARS_PER_TOKEN_BOUND * limit:
            return "prompt_too_long", (f"the prompt text of {len(text)} characters is over data.max_prompt_tokens="
                                       f"{limit} (more than {CHARS_PER_TOKEN_BOUND} characters per token)")
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > limit:
            return "prompt_too_long", f"the prompt text is {n} tokens, over data.max_prompt_tokens={limit}"
        return None

    def sample_problem(self, sample: Sample) -> tuple[str, str] | None:
        """``(reason, message)`` when the sample is refused (image placeholders, then its text), else ``None``."""
        return image_problem(sample) or self.problem(prompt_text(sample))

    def screen(self, samples: Sequence[Sample], *, skip: bool, split: str = "train",
               log: Callable[[str], Any] = print) -> tuple[list[Sample], Counter]:
        """The acceptable samples and the counts of refused ones per reason.

        ``skip=False``: the first refused row raises :class:`DataError` naming its file and line.
        """
        kept: list[Sample] = []
        counts: Counter = Counter()
        for s in samples:
            bad = self.sample_problem(s)
            if bad is None:
                kept.append(s)
                continue
            reason, message = bad
            file, line = s.meta.get("source_file"), s.meta.get("source_line")
            if not skip:
                raise DataError(f"{_who(self.task_name, s)}: {message} [{reason}] (set on_bad_row: skip to skip "
                                "such rows)", file=file, line=line)
            counts[reason] += 1
            n = sum(counts.values())
            if n <= LOG_REFUSED:
                at = f"{file}:{line}" if file and line else (file or f"sample {s.id!r}")
                log(f"warning: skipping {at} ({split}): {message} [{reason}]")
            elif n == LOG_REFUSED + 1:
                log(f"warning: more {split} rows skipped for their prompt; only counted from here")
        if counts:
            log(f"warning: skipped {sum(counts.values())} {split} row(s) for their prompt: "
                + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return kept, counts


def _who(task_name: str | None, sample: Sample) -> str:
    """``task 'x', sample 'id'`` for messages (the file and line come from :class:`DataError`)."""
    return (f"task {task_name!r}, " if task_name else "") + f"sample {sample.id!r}"


def check_render(family: Any, processor: Any, samples: Sequence[Sample], *, task_name: str | None,
                 skip: bool = False, screen: PromptScreen | None = None, n: int = RENDER_CHECK_SAMPLES) -> int:
    """Render the first ``n`` samples as generation does (no weights); the number rendered.

    Each sample's messages go through ``family.render_prompt`` and then ``family.process`` with
    its images, the two calls :func:`core.runtime.generation.make_prompt` and the rollout make.
    A failure there is a :class:`DataError` naming the task, the sample (file and line when
    known) and the first line of the underlying error: the task's samples do not fit the
    family (a missing placeholder, a content part the chat template does not know ...).

    ``screen`` (``--dry-run``, where rows were not screened) first applies the per-row checks:
    a refused row is passed over with ``skip``, else raised. An image that fails to load is
    passed over with ``skip`` (training skips it too), else raised.
    """
    done = 0
    for s in samples:
        if done >= n:
            break
        if screen is not None:
            bad = screen.sample_problem(s)
            if bad is not None:
                if skip:
                    continue
                raise DataError(f"{_who(task_name, s)}: {bad[1]} [{bad[0]}] (set on_bad_row: skip to skip such "
                                "rows)", file=s.meta.get("source_file"), line=s.meta.get("source_line"))
        try:
            images = s.load_images()
        except DataError:
            if skip:
                continue
            raise
        try:
            text = family.render_prompt(processor, s.messages)
            family.process(processor, [text], [images])
        except Exception as exc:  # noqa: BLE001 - any failure here is this sample not fitting the family
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")[:300]
            raise DataError(
                f"{_who(task_name, s)}: model family {getattr(family, 'name', type(family).__name__)!r} cannot "
                f"render this sample as generation would: {type(exc).__name__}: {first} (the task's messages must "
                "follow the Sample contract: one {\"type\": \"image\"} part per image, text parts as "
                "{\"type\": \"text\", \"text\": ...})",
                file=s.meta.get("source_file"), line=s.meta.get("source_line")) from exc
        done += 1
    return done


def screen_splits(plan: Any, registry: Any, task: Any, train: Sequence[Sample], eval_set: Sequence[Sample], *,
                  accelerator: Any = None, log: Callable[[str], Any] = print
                  ) -> tuple[list[Sample], list[Sample], Counter]:
    """Screen a run's train and eval samples with the run's tokenizer (loaded alone: no weights).

    Then the first kept training samples are rendered through the family (:func:`check_render`).
    Raises :class:`~core.config.ConfigError` when no training sample is left.
    """
    from core.config import ConfigError
    from core.runtime.loader import load_policy

    try:
        bundle = load_policy(plan, registry, phase="train", load_model=False, accelerator=accelerator)
    except (OSError, ValueError) as exc:  # transformers: no tokenizer files, an unrecognised processor
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"model {plan.config.model.resolved_path()}: cannot load its tokenizer to check the "
                          f"data's prompt text: {str(exc).splitlines()[0][:300]}") from None
    name = plan.config.task.name
    screen = PromptScreen(bundle.processor, plan.config.data.max_prompt_tokens, name)
    skip = task.skips_bad_samples()
    kept, counts = screen.screen(train, skip=skip, split="train", log=log)
    if not kept:
        raise ConfigError(f"task {name!r}: the training split is empty: every row's prompt was refused (image "
                          "placeholders, special tokens or over data.max_prompt_tokens)")
    kept_eval, more = screen.screen(eval_set, skip=skip, split="eval", log=log)
    check_render(bundle.family, bundle.processor, kept, task_name=name, skip=skip)
    return kept, kept_eval, counts + more


def screen_loaded(processor: Any, plan: Any, task: Any, samples: Sequence[Sample], *, split: str,
                  family: Any = None, log: Callable[[str], Any] = print) -> list[Sample]:
    """Screen one split with an already loaded processor (``core.evaluate``, ``core.sft``): the rows kept.

    With ``family``, the first rows kept are also rendered (:func:`check_render`), as training does.
    Raises :class:`~core.config.ConfigError` when no row is left.
    """
    from core.config import ConfigError

    kept, _ = PromptScreen(processor, plan.config.data.max_prompt_tokens, plan.config.task.name).screen(
        samples, skip=task.skips_bad_samples(), split=split, log=log)
    if samples and not kept:
        raise ConfigError(f"task {plan.config.task.name!r}: split {split!r} is empty: every row's prompt was "
                          "refused (image placeholders, special tokens or over data.max_prompt_tokens)")
    if family is not None:
        check_render(family, processor, kept, task_name=plan.config.task.name, skip=task.skips_bad_samples())
    return kept


def dry_run_render_check(plan: Any, registry: Any, log: Callable[[str], Any] = print) -> int:
    """``core.train --dry-run``: load the task and render its first few training samples, if no weights are needed.

    Runs only when the model's files are already on disk (``model.path`` holds a
    ``config.json``: a local checkpoint or an already built ``model.tiny``); a hub id or a tiny
    checkpoint not built yet is left to the run's start-up (a note says so), because the
    processor would have to be downloaded or built. Loads the processor, never the weights.
    Returns the number of samples rendered; raises :class:`DataError` as :func:`check_render`.
    """
    from pathlib import Path

    from core.runtime.loader import load_policy

    cfg = plan.config
    path = cfg.model.resolved_path()
    if not Path(path, "config.json").is_file():
        why = "model.tiny is not built yet" if cfg.model.tiny is not None else f"{path} is not a local checkpoint"
        log(f"note: render check skipped ({why}); training renders the first {RENDER_CHECK_SAMPLES} samples "
            "at start-up")
        return 0
    task = registry.create("tasks", cfg.task.name, plan.options["task"])
    samples = task.load("train")
    bundle = load_policy(plan, registry, phase="train", load_model=False)
    screen = PromptScreen(bundle.processor, cfg.data.max_prompt_tokens, cfg.task.name)
    done = check_render(bundle.family, bundle.processor, samples, task_name=cfg.task.name,
                        skip=task.skips_bad_samples(), screen=screen)
    log(f"render check: the first {done} training sample(s) of task {cfg.task.name!r} render through model "
        f"family {getattr(bundle.family, 'name', '?')!r}")
    return done
