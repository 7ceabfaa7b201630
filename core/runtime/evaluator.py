"""The one evaluator: greedy answers on a task split, scored by the metric each sample's reward declares.

``core.evaluate`` (a checkpoint, any split) and the evaluation inside training (before and after)
both call :func:`evaluate`; the number a training run prints and the number ``core.evaluate``
writes for the same checkpoint and split are the same number.

A sample's metric kind comes from the reward that serves its ``reward_method`` (its
``Reward.eval_metric``; forced with ``--metric``):

==============  ===================================================================
kind            metrics
==============  ===================================================================
``rec``         Acc@0.5 (IoU > 0.5, box mapped to original pixels), mean IoU, parse rate
``detection``   COCO mAP@[.5:.95] and AP50 over the dataset (pycocotools), precision /
                recall at IoU 0.5, parse rate
any other       ``accuracy`` = share of samples the declaring reward scores >= ``eval.threshold``
                (default 1.0), and the mean score; e.g. ``math`` (math-verify),
                ``exact_match`` (normalised exact match); ``reward:NAME`` for a reward that
                declares no kind
==============  ===================================================================

Answers are read by :mod:`core.interfaces.boxes`, as the grounding and detection rewards read
them: the last ``<answer>`` block (or the whole completion), code fences removed, then JSON or a
bare ``[x1, y1, x2, y2]``. Reward-scored kinds also report ``reward_errors`` /
``reward_timeouts``: samples whose reward raised or timed out; they count as wrong, so the
counts tell a low score from an outage.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import ConfigError, RunConfig
from core.interfaces import boxes

if TYPE_CHECKING:
    from core.interfaces import RewardItem, RolloutEngine, Sample
    from core.plugins.plan import Plan
    from core.plugins.registry import Registry
    from core.runtime.loader import ModelBundle

#: REC accuracy threshold: a prediction is correct when IoU > 0.5 (VLM-R1 / RefCOCO convention).
REC_IOU_THRESHOLD = 0.5


# ---- answer parsing ------------------------------------------------------------------------
# Boxes and detection objects are read by core.interfaces.boxes, the implementation the grounding and
# detection reward plugins use too, so
# evaluation reads an answer the way the training reward did: the last <answer> block (or the
# whole completion), code fences removed, then JSON ({"bbox_2d": [...]}, a list of such,
# [x1, y1, x2, y2]) or, failing that, the first bare [x1, y1, x2, y2].
box_area = boxes.area
box_iou = boxes.iou


def answer_text(text: str, require_answer_tag: bool = False) -> str | None:
    """The last ``<answer>`` block of ``text``; else the whole text (``None`` if a tag is required)."""
    found = boxes.last_answer(text)
    if found is not None:
        return found
    return None if require_answer_tag else text.strip()


def parse_box(value: Any, require_answer_tag: bool = False) -> list[float] | None:
    """The box ``[x1, y1, x2, y2]`` of an answer (text, JSON text, list or dict), or ``None``."""
    if not isinstance(value, str):
        return boxes.as_box(value)
    text = answer_text(value, require_answer_tag)
    return None if text is None else boxes.parse_box(text)


DetObject = boxes.DetObject


def parse_objects(value: Any, require_answer_tag: bool = False) -> list[DetObject] | None:
    """Objects of a detection answer (labels lower-cased): ``[]`` for ``None``/``[]``; ``None`` when unparsable."""
    return boxes.parse_objects(value, require_answer_tag=require_answer_tag)


# ---- metrics (pure functions over RewardItems; golden-tested) --------------------------------
def rec_sample(item: RewardItem, require_answer_tag: bool = False) -> dict[str, Any] | None:
    """IoU of one REC answer, its box mapped to original pixels; ``None`` if the solution has no box.

    Keys: ``iou``, ``correct`` (IoU > 0.5), ``parsed`` (a box was found), ``pred_box``
    (original pixels) and ``gold_box``.
    """
    gold = parse_box(item.solution)
    if gold is None or box_area(gold) <= 0:
        return None
    box = parse_box(item.completion, require_answer_tag)
    pred = [float(v) for v in item.box_to_original(box, 0)] if box is not None else None
    value = box_iou(pred, gold) if pred is not None and box_area(pred) > 0 else 0.0
    return {"iou": value, "correct": value > REC_IOU_THRESHOLD, "parsed": box is not None,
            "pred_box": pred, "gold_box": gold}


def rec_summary(per: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``acc@0.5``, ``mean_iou`` and ``parse_rate`` over per-sample :func:`rec_sample` results."""
    n = len(per)
    if not n:
        return {"acc@0.5": math.nan, "mean_iou": math.nan, "parse_rate": math.nan}
    return {"acc@0.5": sum(p["correct"] for p in per) / n, "mean_iou": sum(p["iou"] for p in per) / n,
            "parse_rate": sum(p["parsed"] for p in per) / n}


def _greedy_matches(preds: list[DetObject], gts: list[DetObject], thr: float) -> int:
    """True positives at IoU >= ``thr``: same label, highest IoU first, each box used once."""
    pairs = sorted(((box_iou(p.box, g.box), i, j) for i, p in enumerate(preds) for j, g in enumerate(gts)
                    if p.box is not None and g.box is not None and p.label == g.label), reverse=True)
    used_p: set[int] = set()
    used_g: set[int] = set()
    for value, i, j in pairs:
        if value < thr:
            break
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
    return len(used_p)


def detection_sample(item: RewardItem, require_answer_tag: bool = False) -> dict[str, Any] | None:
    """Parsed objects of one detection answer (boxes mapped to original pixels).

    ``None`` if the solution cannot be read. Keys: ``preds``/``gts`` (lists of :class:`DetObject`), ``parsed``,
    ``num_pred``, ``num_gt``, ``tp@0.5``, ``image_size``.
    """
    gts = parse_objects(item.solution)
    if gts is None:
        return None
    raw = parse_objects(item.completion, require_answer_tag)
    preds = [DetObject(None if o.box is None else [float(v) for v in item.box_to_original(o.box, 0)], o.label)
             for o in (raw or [])]
    return {"preds": preds, "gts": gts, "parsed": raw is not None, "num_pred": len(preds), "num_gt": len(gts),
            "tp@0.5": _greedy_matches(preds, gts, 0.5),
            "image_size": item.image_sizes[0] if item.image_sizes else None}


def coco_map(per: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """``(mAP@[.5:.95], AP50)`` of all images together with pycocotools' ``COCOeval`` (bbox).

    Each sample is one image; categories are the ground-truth labels of the whole set;
    every prediction scores 1.0 (the models give none). A prediction with a label absent from
    the ground truth, or a degenerate box, cannot be scored by COCO and is left out here (it
    still counts as a false positive in :func:`detection_summary`'s precision). ``nan`` when
    the set has no ground-truth box.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise ConfigError("detection metrics need pycocotools: pip install pycocotools") from exc

    cats: dict[str, int] = {}
    images, anns, dets = [], [], []
    for img_id, p in enumerate(per, start=1):
        w, h = p.get("image_size") or (1, 1)
        images.append({"id": img_id, "width": w, "height": h})
        for g in p["gts"]:
            if g.box is None or box_area(g.box) <= 0:
                continue
            cid = cats.setdefault(g.label, len(cats) + 1)
            x1, y1, x2, y2 = g.box
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cid,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": box_area(g.box), "iscrowd": 0})
    for img_id, p in enumerate(per, start=1):
        for o in p["preds"]:
            if o.box is not None and box_area(o.box) > 0 and o.label in cats:
                x1, y1, x2, y2 = o.box
                dets.append({"image_id": img_id, "category_id": cats[o.label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "score": 1.0})
    if not anns:
        return math.nan, math.nan
    if not dets:
        return 0.0, 0.0
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c, "name": n} for n, c in cats.items()]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on every call
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def detection_summary(per: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``mAP``, ``AP50`` (COCO, whole set), ``precision@0.5``, ``recall@0.5`` and ``parse_rate``."""
    if not per:
        return {"mAP": math.nan, "AP50": math.nan, "precision@0.5": math.nan, "recall@0.5": math.nan,
                "parse_rate": math.nan}
    m, ap50 = coco_map(per)
    tp = sum(p["tp@0.5"] for p in per)
    npred = sum(p["num_pred"] for p in per)
    ngt = sum(p["num_gt"] for p in per)
    return {"mAP": m, "AP50": ap50, "precision@0.5": tp / npred if npred else math.nan,
            "recall@0.5": tp / ngt if ngt else math.nan, "parse_rate": sum(p["parsed"] for p in per) / len(per)}


def reward_summary(scores: Sequence[float | None], threshold: float) -> dict[str, float]:
    """``accuracy`` (score >= threshold) and ``mean_score`` over applicable samples (not ``None``)."""
    vals = [s for s in scores if s is not None and math.isfinite(s)]
    if not vals:
        return {"accuracy": math.nan, "mean_score": math.nan}
    return {"accuracy": sum(v >= threshold for v in vals) / len(vals), "mean_score": sum(vals) / len(vals)}


# ---- metric kinds: declared by the rewards ---------------------------------------------------
#: Kinds computed here from the parsed answer (the field's standard metrics); every other kind is
#: the share of samples that a reward scores >= ``eval.threshold``.
BOX_KINDS = ("rec", "detection")
METRIC_CHOICES = ("auto", "rec", "detection", "KIND (a reward's eval_metric)", "reward:NAME")


@dataclass(frozen=True)
class MetricKind:
    """How one sample is scored: ``kind`` (the label in summaries) and the reward behind it.

    ``reward`` names the registry reward that scores reward-based kinds (``None`` for the box
    kinds, which this module computes from the answer itself).
    """

    kind: str
    reward: str | None = None


def kind_of_reward(registry: Registry, name: str) -> MetricKind:
    """The metric kind reward ``name`` declares (``Reward.eval_metric``), else ``reward:NAME``."""
    entry = registry.resolve("rewards", name)
    declared = getattr(entry.cls, "eval_metric", None)
    if declared in BOX_KINDS:
        return MetricKind(declared)
    return MetricKind(declared or f"reward:{entry.name}", entry.name)


def reward_for_method(registry: Registry, method: str) -> str | None:
    """The name of the installed reward serving ``reward_method`` ``method`` (``Reward.methods``)."""
    for e in registry.entries("rewards"):
        if method in getattr(e.cls, "methods", ()):
            return e.name
    return None


def metric_kind(sample: Sample, forced: str | None, registry: Registry, cfg: RunConfig) -> MetricKind:
    """The metric kind of one sample: ``--metric``, else the reward serving its ``reward_method``.

    A sample without a method is scored as the run's own eval reward (``eval.reward``, else the
    first configured reward) scores it.
    """
    if forced and forced != "auto":
        if forced in BOX_KINDS:
            return MetricKind(forced)
        if forced.startswith("reward:"):
            return kind_of_reward(registry, forced.split(":", 1)[1])
        for e in registry.entries("rewards"):
            if getattr(e.cls, "eval_metric", None) == forced:
                return MetricKind(forced, e.name)
        raise ConfigError(f"--metric {forced}: no installed reward declares eval_metric {forced!r}; "
                          f"use rec, detection or reward:NAME")
    method = sample.reward_method
    if method:
        name = reward_for_method(registry, method)
        if name is None:
            raise ConfigError(f"sample {sample.id!r}: no installed reward serves reward_method {method!r}; "
                              "install its plugin or pass --metric")
        return kind_of_reward(registry, name)
    return kind_of_reward(registry, cfg.eval.reward or cfg.rewards[0].name)


def reward_options(cfg: RunConfig, name: str) -> dict[str, Any]:
    """Options of reward ``name`` as configured for training, else ``{}``.

    Taken from a ``rewards`` entry of that name, or from the ``accuracy`` router's ``reward_options``.
    """
    for r in cfg.rewards:
        if r.name == name:
            return dict(r.options)
    for r in cfg.rewards:
        if r.name == "accuracy" and name in r.options.get("reward_options", {}):
            return dict(r.options["reward_options"][name])
    return {}


def check_metric(value: str) -> str:
    """Validate the form of a ``--metric`` value (whether a reward declares it is checked per sample)."""
    if value and value.strip() == value and (not value.startswith("reward:") or len(value) > len("reward:")):
        return value
    raise argparse.ArgumentTypeError(f"--metric {value!r}: choose auto, rec, detection, a reward's eval_metric "
                                     "(math, exact_match ...) or reward:NAME")


# ---- the evaluation ------------------------------------------------------------------------
@dataclass
class EvalResult:
    """What :func:`evaluate` returns: per-dataset summaries and the prediction records."""

    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def dataset_name(sample: Sample, default: str) -> str:
    """``meta["dataset"]``, else the source file's name, else ``default`` (the task name)."""
    meta = sample.meta or {}
    if meta.get("dataset"):
        return str(meta["dataset"])
    if meta.get("source_file"):
        return Path(str(meta["source_file"])).name
    return default


def select_samples(samples: Sequence[Sample], limit: int | None, seed: int, shuffle: bool) -> list[Sample]:
    """The first ``limit`` samples, or (``shuffle``) a seeded random ``limit`` kept in dataset order."""
    n = len(samples)
    k = n if limit is None else min(limit, n)
    if shuffle and k < n:
        import torch

        idx = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    else:
        idx = list(range(k))
    return [samples[i] for i in idx]


def to_jsonable(v: Any) -> Any:
    """``v`` with detection objects as dicts and non-finite floats as ``None`` (for JSON files)."""
    if isinstance(v, DetObject):
        return {"bbox_2d": v.box, "label": v.label}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def score_records(records: list[dict[str, Any]], cfg: RunConfig, registry: Registry, *,
                  require_answer_tag: bool = False) -> dict[str, Any]:
    """Fill each record's ``metrics`` and return the summary per dataset (and ``all``).

    ``records`` hold ``item`` (a :class:`RewardItem`), ``kind``, ``reward`` and ``dataset``. Reward-scored
    kinds are scored in one batch per kind with the reward's training options.
    """
    from core.interfaces import RewardBatch, RewardContext
    from core.runtime.reward_runner import RewardRunner, RewardSpec, reward_origin, setup_reward

    for kind in sorted({r["kind"] for r in records}):
        rows = [r for r in records if r["kind"] == kind]
        if kind == "rec":
            for r in rows:
                r["metrics"] = rec_sample(r["item"], require_answer_tag)
        elif kind == "detection":
            for r in rows:
                r["metrics"] = detection_sample(r["item"], require_answer_tag)
        else:
            name = rows[0]["reward"]
            try:
                reward = registry.create("rewards", name, reward_options(cfg, name))
            except LookupError as exc:
                raise ConfigError(f"metric {kind}: {exc}") from None
            origin = reward_origin(registry, name)
            setup_reward(reward, name, RewardContext(registry=registry, config=cfg), origin)
            timeout = next((rc.timeout_s for rc in cfg.rewards if rc.name == name), 30.0)
            runner = RewardRunner([RewardSpec(name, reward, 1.0, timeout, "zero", origin=origin)])
            values: list[float] = []
            failures: list[str | None] = []  # per row: None, "error" or "timeout" (scored 0 by on_error: zero)
            try:
                # Chunks of 64 so the training time limit (set for one step's batch) still fits.
                for start in range(0, len(rows), 64):
                    res = runner(RewardBatch([r["item"] for r in rows[start:start + 64]]))
                    values.extend(res.per_reward[:, 0].tolist())
                    failures.extend("timeout" if t else "error" if f else None
                                    for f, t in zip(res.failed[:, 0].tolist(), res.timed_out[:, 0].tolist(),
                                                    strict=True))
            finally:
                runner.close()
            for r, v, fail in zip(rows, values, failures, strict=True):
                score = None if math.isnan(v) else float(v)
                r["metrics"] = None if score is None else {"score": score,
                                                           "correct": score >= cfg.eval.threshold}
                if r["metrics"] is not None and fail:
                    # Kept in the accuracy as a wrong answer, but counted: an outage must not read as 0.
                    r["metrics"]["reward_failure"] = fail
    return summarize(records, cfg.eval.threshold)


def summarize(records: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Per dataset and kind: ``n``, ``skipped`` (not applicable) and the kind's metrics."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["kind"]), []).append(r)
    datasets = sorted({d for d, _ in groups})
    if len(datasets) > 1:  # an overall line per kind when several datasets are evaluated together
        for r in records:
            groups.setdefault(("all", r["kind"]), []).append(r)
    out: dict[str, Any] = {}
    for (ds, kind), rows in sorted(groups.items()):
        per = [r["metrics"] for r in rows if r.get("metrics") is not None]
        if kind == "rec":
            metrics = rec_summary(per)
        elif kind == "detection":
            metrics = detection_summary(per)
        else:
            metrics = reward_summary([p["score"] for p in per], threshold)
            metrics["reward_errors"] = sum(p.get("reward_failure") is not None for p in per)
            metrics["reward_timeouts"] = sum(p.get("reward_failure") == "timeout" for p in per)
        out.setdefault(ds, {})[kind] = {"n": len(per), "skipped": len(rows) - len(per), **metrics}
    return out


def evaluate(plan: Plan, registry: Registry, bundle: ModelBundle, engine: RolloutEngine, samples: Sequence[Sample],
             *, max_new_tokens: int, batch_size: int, temperature: float = 0.0, metric: str | None = None,
             require_answer_tag: bool = False, progress: bool = True, accelerator: Any = None) -> EvalResult:
    """Generate one answer per sample (greedy unless ``temperature > 0``) and score it.

    The one evaluator: ``core.evaluate`` and the evaluation inside training both call it, so the
    number a run prints and the number ``core.evaluate`` writes for the same checkpoint and
    split are the same number. With an ``accelerator`` of several processes the samples are
    sharded over ranks and the per-sample metrics gathered before summarising (``records``
    then holds this rank's samples only).
    """
    from tqdm.auto import tqdm

    from core.interfaces import SamplingParams
    from core.runtime.generation import generate_groups

    cfg = plan.config
    g = cfg.grpo
    world = accelerator.num_processes if accelerator is not None else 1
    if world > 1:
        samples = list(samples)[accelerator.process_index::world]
    sampling = SamplingParams(n=1, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else 1.0, top_p=g.top_p, top_k=g.top_k,
                              repetition_penalty=g.repetition_penalty)
    default_ds = cfg.task.name
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(samples), desc="eval", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start:start + batch_size])
        gen = generate_groups(bundle, engine, chunk, [1] * len(chunk), sampling)
        for s, comp, item in zip(gen.samples, gen.completions, gen.items, strict=True):
            mk = metric_kind(s, metric, registry, cfg)
            records.append({"sample": s, "item": item, "completion": comp, "dataset": dataset_name(s, default_ds),
                            "kind": mk.kind, "reward": mk.reward})
        bar.update(len(chunk))
    bar.close()
    summary = score_records(records, cfg, registry, require_answer_tag=require_answer_tag)
    if world > 1:
        from accelerate.utils import gather_object

        # RewardItems hold closures (the box transform): gather only what summarize reads.
        light = [{"dataset": r["dataset"], "kind": r["kind"], "metrics": r.get("metrics")} for r in records]
        summary = summarize(gather_object(light), cfg.eval.threshold)
    return EvalResult(summary, records)


# ---- KL to a fixed base model (eval.kl_base) --------------------------------------------------
def load_kl_base(plan: Plan, bundle: ModelBundle, path: str, device: Any = None, *,
                 verify_hashes: bool = True) -> Any:
    """The model at ``path`` (``eval.kl_base``) for :func:`kl_to_base`, on the policy's device.

    It is loaded with the policy's model family; its tokenizer must be the policy's (the same
    token ids), or the per-token log-ratio would compare different tokens.
    """
    from core.runtime.loader import load_checkpoint, resolve_checkpoint

    if bundle.model is None:
        raise ConfigError("eval.kl_base needs the policy's weights in this process (the transformers rollout "
                          "engine, or core.evaluate --load-model always)")
    if not Path(path).exists():
        raise ConfigError(f"eval.kl_base: {path} does not exist (it names the base model's checkpoint folder)")
    try:
        folder = resolve_checkpoint(path)
    except ConfigError as exc:
        raise ConfigError(f"eval.kl_base: {exc}") from None
    device_obj = plan.device.cls.from_options(plan.options.get("device"))
    if device is None:
        device = next(bundle.model.parameters()).device
    try:
        base = load_checkpoint(folder, bundle.family, device_obj, dtype=plan.config.model.dtype,
                               attn_implementation=plan.config.model.attn_implementation, torch_device=device,
                               verify_hashes=verify_hashes)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"eval.kl_base: cannot load {folder}: {exc}") from None
    mine = getattr(bundle.processor, "tokenizer", bundle.processor)
    theirs = getattr(base.processor, "tokenizer", base.processor)
    if mine.get_vocab() != theirs.get_vocab():
        raise ConfigError(f"eval.kl_base: {folder} has a different tokenizer from the policy's; KL per token "
                          "needs the same vocabulary")
    base.model.requires_grad_(False)
    return base.model


def training_result(result: EvalResult) -> dict[str, Any]:
    """What training prints and writes to ``eval.json``: the headline of :func:`evaluate`'s summary.

    ``accuracy`` is the main number of the first metric kind (Acc@0.5 for ``rec``, mAP for
    ``detection``, else the share scored >= ``eval.threshold``) over all evaluated datasets;
    ``datasets`` is the full summary, as ``core.evaluate`` writes it. With several datasets (the
    tasks of a ``mixture``), ``per_dataset`` maps each to its own main number and metric kind.
    """
    ds = result.summary
    key = "all" if "all" in ds else next(iter(ds), None)
    if key is None:
        return {"accuracy": math.nan, "metric": None, "num_samples": 0, "reward_errors": 0, "reward_timeouts": 0,
                "datasets": {}}
    per = ds[key]
    kind = sorted(per)[0]
    v = per[kind]
    out: dict[str, Any] = {
        "accuracy": headline({"datasets": ds}, key)[kind], "metric": kind,
        "num_samples": sum(x["n"] + x["skipped"] for x in per.values()),
        "reward_errors": sum(x.get("reward_errors", 0) for x in per.values()),
        "reward_timeouts": sum(x.get("reward_timeouts", 0) for x in per.values()),
    }
    if "mean_score" in v:
        out["mean_reward"] = v["mean_score"]
    parts = [d for d in ds if d != "all"]
    if len(parts) > 1:  # several datasets (e.g. the tasks of a mixture): each one's main number too
        out["per_dataset"] = {d: {"metric": k, "accuracy": v} for d in parts
                              for k, v in [sorted(headline({"datasets": ds}, d).items())[0]]}
    out["datasets"] = to_jsonable(ds)
    return out


def eval_line(label: str, res: dict[str, Any]) -> str:
    """The line training prints for :func:`training_result`; reward failures are always shown (0 when none)."""
    n = res["num_samples"]
    mean = f", mean score {res['mean_reward']:.3f}" if res.get("mean_reward") is not None else ""
    line = (f"eval {label}: accuracy {res['accuracy']:.3f} ({res.get('metric')}{mean}, n={n}; "
            f"reward errors {res.get('reward_errors', 0)}/{n}, timeouts {res.get('reward_timeouts', 0)})")
    if res.get("per_dataset"):
        line += "; per dataset: " + ", ".join(f"{d} {_fmt(v['accuracy'])} ({v['metric']})"
                                             for d, v in res["per_dataset"].items())
    if res.get("kl_to_base"):
        kl = res["kl_to_base"]
        line += f"; KL to base {_fmt(kl['per_token'])}/token ({kl['tokens']} tokens)"
    if res.get("reward_errors"):
        line += " -- WARNING: failed samples count as wrong; the accuracy is a lower bound"
    return line


def prediction_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``predictions.jsonl`` lines."""
    rows = []
    for r in records:
        s, item, comp, m = r["sample"], r["item"], r["completion"], r.get("metrics")
        if m is not None and r["kind"] == "detection":
            m = {k: v for k, v in m.items() if k not in ("gts",)}
        rows.append(to_jsonable({"id": s.id, "dataset": r["dataset"], "kind": r["kind"], "prompt": item.prompt,
                               "completion": item.completion, "solution": s.solution,
                               "completion_tokens": len(comp.ids), "truncated": comp.truncated, "metrics": m}))
    return rows


#: Metric columns shown per kind in the printed table (summary.json has all of them).
_TABLE_COLUMNS = {"rec": ("acc@0.5", "mean_iou", "parse_rate"),
                  "detection": ("mAP", "AP50", "precision@0.5", "recall@0.5", "parse_rate")}


def print_table(summary: dict[str, Any], title: str, file: Any = None) -> None:
    """One rich table per metric kind: a row per dataset."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file)
    kinds = sorted({k for per in summary.values() for k in per})
    for kind in kinds:
        cols = _TABLE_COLUMNS.get(kind, ("accuracy", "mean_score", "reward_errors", "reward_timeouts"))
        table = Table(title=f"{title} — {kind}")
        table.add_column("dataset")
        table.add_column("n", justify="right")
        for c in cols:
            table.add_column(c, justify="right")
        for ds, per in summary.items():
            if kind in per:
                v = per[kind]
                table.add_row(ds, str(v["n"]), *(_fmt(v.get(c)) for c in cols))
        console.print(table)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)



def load_summary(path: str | Path) -> dict[str, Any]:
    """Read a ``summary.json`` written by this module (for comparison tables)."""
    return json.loads(Path(path).read_text())


def headline(summary: dict[str, Any], dataset: str | None = None) -> dict[str, float]:
    """The main number per kind of a ``summary.json``: Acc@0.5 (rec), mAP (detection), else accuracy.

    Of ``dataset`` (default: ``all`` if present, else the first dataset).
    """
    ds = summary["datasets"]
    key = dataset or ("all" if "all" in ds else next(iter(ds)))
    main_metric: dict[str, Callable[[dict[str, Any]], Any]] = {
        "rec": lambda v: v["acc@0.5"], "detection": lambda v: v["mAP"]}
    return {kind: main_metric.get(kind, lambda v: v["accuracy"])(v) for kind, v in ds[key].items()}


# ---- a checkpoint, end to end (what python -m core.evaluate runs) ---------------------------
@dataclass
class EvalRequest:
    """What ``python -m core.evaluate`` asks for (its flags); see that module for each one's meaning."""

    checkpoint: str | None = None
    split: str = "eval"
    limit: int | None = None
    shuffle: bool = False
    seed: int = 0
    metric: str = "auto"
    temperature: float = 0.0
    max_new_tokens: int | None = None
    batch_size: int | None = None
    require_answer_tag: bool = False
    load_model: str = "auto"
    out: str | None = None
    quiet: bool = False
    verify_hashes: bool = True


def evaluate_checkpoint(plan: Plan, registry: Registry, args: EvalRequest,
                        kl_estimator: Callable[..., dict[str, Any]] | None = None) -> Path:
    """Load the checkpoint, evaluate a split, write ``predictions.jsonl`` / ``summary.json``, print the table.

    With ``eval.kl_base``, ``kl_estimator`` (:func:`core.grpo.base_kl.kl_to_base`, passed in by
    ``core.evaluate``: it needs the training forward, a layer above this one) adds ``kl_to_base``
    to the summary. Returns the output folder.
    """
    import sys
    import time

    import torch

    from core.interfaces import RolloutContext
    from core.runtime.data_limits import screen_loaded
    from core.runtime.loader import load_policy, resolve_checkpoint

    cfg = plan.config
    device_obj = plan.device.cls.from_options(plan.options.get("device"))
    device_obj.seed(args.seed)
    device = device_obj.torch_device()
    engine = registry.create("rollouts", cfg.rollout.name, plan.options["rollout"])
    load = args.load_model == "always" or (args.load_model == "auto" and plan.rollout.name == "transformers")
    bundle = load_policy(plan, registry, phase="infer", checkpoint=args.checkpoint, load_model=load, device=device,
                         verify_hashes=args.verify_hashes)
    engine.setup(RolloutContext(bundle.model, bundle.processor, bundle.family, device, bundle.suppressed))
    task = registry.create("tasks", cfg.task.name, plan.options["task"])
    try:
        data = task.load(args.split)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--split {args.split!r}: {exc}") from None
    # The rows are screened and the first rendered as training does.
    data = screen_loaded(bundle.processor, plan, task, data, split=args.split, family=bundle.family)
    samples = select_samples(data, args.limit, args.seed, args.shuffle)
    if not samples:
        raise ConfigError(f"task {cfg.task.name}: split {args.split!r} has no samples")
    name = Path(args.checkpoint or cfg.model.resolved_path()).name
    out = Path(args.out or Path("runs") / "eval" / f"{name}-{args.split}")
    max_new = args.max_new_tokens or cfg.eval.max_new_tokens or cfg.grpo.max_completion_length
    t0 = time.perf_counter()
    if cfg.eval.kl_base and kl_estimator is None:
        raise ConfigError("eval.kl_base: this caller cannot estimate KL (use python -m core.evaluate)")
    # Loaded before the evaluation, so a bad eval.kl_base fails before minutes of generation.
    kl_base = (load_kl_base(plan, bundle, cfg.eval.kl_base, verify_hashes=args.verify_hashes)
               if cfg.eval.kl_base else None)
    torch.manual_seed(args.seed)
    kl = None
    try:
        result = evaluate(plan, registry, bundle, engine, samples, max_new_tokens=max_new,
                          batch_size=args.batch_size or cfg.eval.batch_size, temperature=args.temperature,
                          metric=args.metric, require_answer_tag=args.require_answer_tag, progress=not args.quiet)
        if kl_base is not None and kl_estimator is not None:
            kl = {"base": cfg.eval.kl_base, **kl_estimator(
                bundle, engine, kl_base, samples, max_new_tokens=max_new,
                batch_size=args.batch_size or cfg.eval.batch_size,
                samples_per_prompt=cfg.eval.kl_samples_per_prompt, seed=args.seed)}
    finally:
        engine.close()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for row in prediction_rows(result.records):
            f.write(json.dumps(row) + "\n")
    summary = {
        "checkpoint": str(resolve_checkpoint(args.checkpoint)) if args.checkpoint else cfg.model.resolved_path(),
        "family": bundle.family.name,
        "task": cfg.task.name,
        "split": args.split,
        "num_samples": len(samples),
        "limit": args.limit,
        "shuffle": args.shuffle,
        "seed": args.seed,
        "rollout": cfg.rollout.name,
        "decoding": {"greedy": args.temperature == 0, "temperature": args.temperature,
                     "max_new_tokens": max_new},
        "seconds": round(time.perf_counter() - t0, 2),
        "datasets": to_jsonable(result.summary),
    }
    if kl is not None:
        summary["kl_to_base"] = to_jsonable(kl)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(result.summary, f"{name} ({args.split}, {'greedy' if args.temperature == 0 else 'sampled'})")
    for ds, per in result.summary.items():
        for kind, v in per.items():
            if v.get("reward_errors"):
                print(f"warning: {ds}/{kind}: the reward failed on {v['reward_errors']} of {v['n']} samples "
                      f"({v['reward_timeouts']} timeouts); they count as wrong, so the accuracy is a lower bound",
                      file=sys.stderr)
    if kl is not None:
        print(f"KL(policy || {kl['base']}): {_fmt(kl['per_token'])} per token, {_fmt(kl['per_sequence'])} per "
              f"completion ({kl['completions']} sampled completions, {kl['tokens']} tokens)")
    print(f"predictions and summary in {out}")
    return out
