"""Evaluation: ``python -m core.evaluate --config FILE [--checkpoint PATH] [options] [key=value ...]``.

Evaluates a checkpoint on a task's split with the same config sections (model, task,
rewards, rollout) as training, so prompts, templates and answer parsing are the training
ones. Decoding is greedy by default; any rollout engine works (the built-in ``transformers``
one, or a plugin such as ``openai_server`` against ``python -m core.serve`` or vLLM).

Metrics are chosen per sample from its ``reward_method`` (or forced with ``--metric``):

==============  ============================================================  ==========================
kind            metrics                                                       ``reward_method`` values
==============  ============================================================  ==========================
``rec``         Acc@0.5 (IoU > 0.5, box mapped to original pixels), mean IoU  ``iou``, ``rec``
``detection``   COCO mAP@[.5:.95] and AP50 over the dataset (pycocotools),    ``map``, ``od_ap``,
                precision / recall at IoU 0.5                                 ``od_ap50``, ``odLength``,
                                                                              ``weighted_sum``
``math``        accuracy by answer equivalence (the ``math`` reward)          ``math``
``exact_match`` accuracy by normalised exact match (the ``all_match`` reward) ``all_match``, ``exact_match``
``reward:NAME`` accuracy = share of samples whose reward ``NAME`` scores >=   any other method: the reward
                ``eval.threshold`` (default 1.0), and the mean score          serving it
==============  ============================================================  ==========================

Outputs in ``--out``: ``predictions.jsonl`` (one line per sample: id, dataset, kind, prompt,
completion, solution and the per-sample metric values) and ``summary.json`` (per dataset =
``meta["dataset"]``, else the source file name, else the task name); a table is printed.
Reward-scored kinds also report ``reward_errors`` / ``reward_timeouts``: samples whose reward
raised or timed out. They count as wrong in the accuracy, so the counts tell a low score from an
outage (a warning is printed when any occurred).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import ConfigError, RunConfig, build_config, load_raw
from core.interfaces import boxes

if TYPE_CHECKING:
    from core.grpo.trainer import ModelBundle
    from core.interfaces import RewardItem, RolloutEngine, Sample
    from core.plugins.plan import Plan
    from core.plugins.registry import Registry

#: ``reward_method`` -> metric kind (methods not listed use the reward that serves them).
METHOD_KINDS: dict[str, str] = {
    "iou": "rec",
    "rec": "rec",
    "map": "detection",
    "od_ap": "detection",
    "od_ap50": "detection",
    "odLength": "detection",
    "weighted_sum": "detection",
    "math": "math",
    "all_match": "exact_match",
    "exact_match": "exact_match",
}
#: Metric kinds scored by a reward (kind -> reward name).
REWARD_KINDS: dict[str, str] = {"math": "math", "exact_match": "all_match"}
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


# ---- metric kinds and rewards ----------------------------------------------------------------
METRIC_CHOICES = ("auto", "rec", "detection", "math", "exact_match", "reward:NAME")


def metric_kind(sample: Sample, forced: str | None, registry: Registry | None, cfg: RunConfig) -> str:
    """The metric kind of one sample: ``--metric``, else by ``reward_method`` (see the module doc)."""
    if forced and forced != "auto":
        return forced
    method = sample.reward_method
    if method in METHOD_KINDS:
        return METHOD_KINDS[method]
    if method and registry is not None:
        for e in registry.entries("rewards"):
            if method in getattr(e.cls, "methods", ()):
                return f"reward:{e.name}"
        raise ConfigError(f"sample {sample.id!r}: no installed reward serves reward_method {method!r}; "
                          "install its plugin or pass --metric")
    # No method on the sample: what the training run's own eval uses.
    return f"reward:{cfg.eval.reward or cfg.rewards[0].name}"


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
    """Validate a ``--metric`` value."""
    if value in ("auto", "rec", "detection", "math", "exact_match") or (
            value.startswith("reward:") and len(value) > len("reward:")):
        return value
    raise argparse.ArgumentTypeError(f"--metric {value!r}: choose one of {', '.join(METRIC_CHOICES)}")


# ---- loading -------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder: ``path`` itself, or the newest ``checkpoint-N`` inside an output folder."""
    from core.runtime.checkpoint import latest_checkpoint

    p = Path(path)
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return p
    found = latest_checkpoint(p)
    if found is not None:
        return found
    raise ConfigError(f"--checkpoint {p}: not a transformers checkpoint folder (no config.json or "
                      "adapter_config.json) and no complete checkpoint-N folder inside it")


def load_for_inference(plan: Plan, registry: Registry, checkpoint: str | Path | None = None, *,
                       load_model: bool = True, device: Any = None) -> ModelBundle:
    """Load the policy for generation without an ``Accelerator``: model, processor, family.

    ``checkpoint`` (a folder, or an output folder whose newest ``checkpoint-N`` is taken)
    replaces ``model.path``; a PEFT adapter checkpoint is applied to ``model.path`` and
    merged. A ``model.tiny`` checkpoint is built first when missing (as training does).
    ``load_model=False`` loads only the processor and family (server back ends).
    """
    import torch

    from core.grpo.trainer import ModelBundle, resolve_family, torch_dtype

    cfg = plan.config
    base = cfg.model.resolved_path()
    ckpt = resolve_checkpoint(checkpoint) if checkpoint is not None else None
    adapter = ckpt is not None and not (ckpt / "config.json").is_file()
    if cfg.model.tiny is not None and (ckpt is None or adapter) and not Path(base, "config.json").is_file():
        plan.model_family.cls.build_tiny_checkpoint(base, **cfg.model.tiny)
    weights = str(base if (ckpt is None or adapter) else ckpt)
    family = resolve_family(plan, registry, weights)
    proc_path = str(ckpt) if ckpt is not None and (ckpt / "tokenizer_config.json").is_file() else base
    processor = family.load_processor(proc_path)
    if device is None:
        device = plan.device.cls.from_options(plan.options.get("device")).torch_device()
    model = None
    if load_model:
        device_obj = plan.device.cls.from_options(plan.options.get("device"))
        dtype = torch_dtype(cfg.model.dtype, device_obj, torch.device(device).type)
        model = family.load_model(weights, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
        model.to(device)
        model.eval()
    suppressed = family.suppressed_token_ids(processor, model) if model is not None else []
    return ModelBundle(family, model, processor, None, False, suppressed)


def plan_without_groups(cfg: RunConfig, registry: Registry) -> Plan:
    """``make_plan`` (every component and option checked) minus GRPO's group arithmetic.

    In SFT ``train.per_device_batch_size`` counts samples, so it need not be a multiple of
    ``grpo.num_generations``; the components are validated on a copy whose batch divides.
    """
    from core.plugins.plan import make_plan

    probe = cfg.model_copy(deep=True)
    probe.train.per_device_batch_size = cfg.grpo.num_generations
    probe.train.gradient_accumulation_steps = 1
    probe._source, probe._lines, probe._overrides = cfg._source, cfg._lines, cfg._overrides
    plan = make_plan(probe, registry, 1)
    plan.config = cfg
    return plan


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


def _jsonable(v: Any) -> Any:
    if isinstance(v, DetObject):
        return {"bbox_2d": v.box, "label": v.label}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def score_records(records: list[dict[str, Any]], cfg: RunConfig, registry: Registry | None, *,
                  require_answer_tag: bool = False) -> dict[str, Any]:
    """Fill each record's ``metrics`` and return the summary per dataset (and ``all``).

    ``records`` hold ``item`` (a :class:`RewardItem`), ``kind`` and ``dataset``. Reward-scored
    kinds are scored in one batch per kind with the reward's training options.
    """
    from core.interfaces import RewardBatch, RewardContext
    from core.runtime.reward_runner import RewardRunner, RewardSpec

    for kind in sorted({r["kind"] for r in records}):
        rows = [r for r in records if r["kind"] == kind]
        if kind == "rec":
            for r in rows:
                r["metrics"] = rec_sample(r["item"], require_answer_tag)
        elif kind == "detection":
            for r in rows:
                r["metrics"] = detection_sample(r["item"], require_answer_tag)
        else:
            name = REWARD_KINDS.get(kind) or kind.split(":", 1)[1]
            if registry is None:
                raise ConfigError(f"metric {kind}: needs the plugin registry to build reward {name!r}")
            try:
                reward = registry.create("rewards", name, reward_options(cfg, name))
            except LookupError as exc:
                raise ConfigError(f"metric {kind}: {exc}") from None
            reward.setup(RewardContext(registry=registry, config=cfg))
            timeout = next((rc.timeout_s for rc in cfg.rewards if rc.name == name), 30.0)
            runner = RewardRunner([RewardSpec(name, reward, 1.0, timeout, "zero")])
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
             require_answer_tag: bool = False, progress: bool = True) -> EvalResult:
    """Generate one answer per sample (greedy unless ``temperature > 0``) and score it."""
    from tqdm.auto import tqdm

    from core.grpo.trainer import generate_groups
    from core.interfaces import SamplingParams

    cfg = plan.config
    g = cfg.grpo
    sampling = SamplingParams(n=1, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else 1.0, top_p=g.top_p, top_k=g.top_k,
                              repetition_penalty=g.repetition_penalty)
    default_ds = cfg.task.name
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(samples), desc="eval", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start:start + batch_size])
        ro = generate_groups(bundle, engine, chunk, [1] * len(chunk), sampling)
        for s, comp, item in zip(ro.samples, ro.completions, ro.items, strict=True):
            records.append({"sample": s, "item": item, "completion": comp, "dataset": dataset_name(s, default_ds),
                            "kind": metric_kind(s, metric, registry, cfg)})
        bar.update(len(chunk))
    bar.close()
    summary = score_records(records, cfg, registry, require_answer_tag=require_answer_tag)
    return EvalResult(summary, records)


def prediction_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``predictions.jsonl`` lines."""
    rows = []
    for r in records:
        s, item, comp, m = r["sample"], r["item"], r["completion"], r.get("metrics")
        if m is not None and r["kind"] == "detection":
            m = {k: v for k, v in m.items() if k not in ("gts",)}
        rows.append(_jsonable({"id": s.id, "dataset": r["dataset"], "kind": r["kind"], "prompt": item.prompt,
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


# ---- command line --------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; trailing ``key.path=value`` items are config overrides."""
    p = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (the training one; default: the CPU quickstart)")
    p.add_argument("--checkpoint", help="checkpoint folder (or an output folder: its newest checkpoint-N); "
                                        "default: model.path")
    p.add_argument("--split", default="eval", help="task split to evaluate (default: eval)")
    p.add_argument("--limit", type=int, help="evaluate at most N samples (the first N, or see --shuffle)")
    p.add_argument("--shuffle", action="store_true", help="with --limit: a seeded random subset instead")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle and of sampling (default 0)")
    p.add_argument("--rollout", help="rollout engine name (default: the config's rollout.name); its options "
                                     "come from rollout.options overrides")
    p.add_argument("--metric", type=check_metric, default="auto",
                   help="auto (by each sample's reward_method) | rec | detection | math | exact_match | reward:NAME")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens or grpo.max_completion_length")
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default: eval.batch_size)")
    p.add_argument("--require-answer-tag", action="store_true",
                   help="read boxes only from an <answer> block (VLM-R1's eval); default: the block if present, "
                        "else the whole completion")
    p.add_argument("--load-model", choices=("auto", "always", "never"), default="auto",
                   help="load the weights locally: auto = only for the built-in transformers engine")
    p.add_argument("--out", help="output folder (default: runs/eval/<checkpoint or model name>-<split>)")
    p.add_argument("--plugins", help="comma-separated plugin distributions to load; 'none' = built-ins only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. task.options.num_eval=100")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate, load, generate, score, write ``predictions.jsonl`` / ``summary.json``, print the table."""
    from core.plugins import PluginError, PluginHost
    from core.train import DEFAULT_CONFIG

    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.rollout:
            overrides.append(f"rollout.name={args.rollout}")
        cfg = build_config(load_raw(args.config, DEFAULT_CONFIG), overrides, source=args.config or "default config")
        host = PluginHost(args.plugins if args.plugins is not None else cfg.plugins)
        host.warn_failures()
        plan = plan_without_groups(cfg, host.registry)
        for name, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                            ("--max-new-tokens", args.max_new_tokens)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if args.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    except (ConfigError, PluginError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from core.interfaces import DataError
    from core.train import describe_os_error

    try:
        return _run(args, plan, host.registry)
    except (ConfigError, DataError) as exc:  # a bad image or row names its file and line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable checkpoint, full disk: one line, not a traceback
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, plan: Plan, registry: Registry) -> int:
    import torch

    from core.interfaces import RolloutContext

    cfg = plan.config
    device_obj = plan.device.cls.from_options(plan.options.get("device"))
    device_obj.seed(args.seed)
    device = device_obj.torch_device()
    engine = registry.create("rollouts", cfg.rollout.name, plan.options["rollout"])
    load = args.load_model == "always" or (args.load_model == "auto" and plan.rollout.name == "transformers")
    bundle = load_for_inference(plan, registry, args.checkpoint, load_model=load, device=device)
    engine.setup(RolloutContext(bundle.model, bundle.processor, bundle.family, device, bundle.suppressed))
    task = registry.create("tasks", cfg.task.name, plan.options["task"])
    try:
        data = task.load(args.split)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--split {args.split!r}: {exc}") from None
    samples = select_samples(data, args.limit, args.seed, args.shuffle)
    if not samples:
        raise ConfigError(f"task {cfg.task.name}: split {args.split!r} has no samples")
    name = Path(args.checkpoint or cfg.model.resolved_path()).name
    out = Path(args.out or Path("runs") / "eval" / f"{name}-{args.split}")
    max_new = args.max_new_tokens or cfg.eval.max_new_tokens or cfg.grpo.max_completion_length
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    try:
        result = evaluate(plan, registry, bundle, engine, samples, max_new_tokens=max_new,
                          batch_size=args.batch_size or cfg.eval.batch_size, temperature=args.temperature,
                          metric=args.metric, require_answer_tag=args.require_answer_tag, progress=not args.quiet)
    finally:
        closer = getattr(engine, "close", None)
        if callable(closer):
            closer()
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
        "datasets": _jsonable(result.summary),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(result.summary, f"{name} ({args.split}, {'greedy' if args.temperature == 0 else 'sampled'})")
    for ds, per in result.summary.items():
        for kind, v in per.items():
            if v.get("reward_errors"):
                print(f"warning: {ds}/{kind}: the reward failed on {v['reward_errors']} of {v['n']} samples "
                      f"({v['reward_timeouts']} timeouts); they count as wrong, so the accuracy is a lower bound",
                      file=sys.stderr)
    print(f"predictions and summary in {out}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
