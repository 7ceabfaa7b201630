"""Run logs: metrics, completions, TensorBoard/W&B scalars and the reward-curve PNG.

``metrics.jsonl`` has one object per optimizer step; ``completions.jsonl`` the sampled
completions with their rewards; ``reward_curve.png`` is drawn at the end of a run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends metrics and completions; only the main process writes."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, wandb: bool = False,
                 is_main: bool = True, run_config: dict[str, Any] | None = None) -> None:
        self.dir = Path(output_dir)
        self.is_main = is_main
        self._tb = None
        self._wandb = None
        if not is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        if wandb:
            from core.config.extras import require

            require("wandb", "wandb", "logging.wandb=true")
            import wandb as wb

            self._wandb = wb.init(config=run_config or {}, dir=str(self.dir))

    def truncate_after(self, step: int) -> dict[str, int]:
        """On resume: drop records of steps after ``step`` (written before a crash).

        A line that does not parse (torn by a kill or a full disk mid-write) is dropped too,
        so the next append starts on a clean line. Returns the dropped-line count per file.
        """
        dropped: dict[str, int] = {}
        if not self.is_main:
            return dropped
        for name in ("metrics.jsonl", "completions.jsonl"):
            path = self.dir / name
            if not path.exists():
                continue
            rows = read_jsonl(path)
            kept = [ln for ln, rec in rows if rec is not None and rec.get("step", 0) <= step]
            torn = sum(rec is None for _, rec in rows)
            if torn:
                dropped[name] = torn
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(path)  # a kill mid-rewrite keeps the old file, never half of it
        return dropped

    def last_step(self) -> int:
        """The highest step in ``metrics.jsonl`` (0 when empty or absent)."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return 0
        return max((int(rec.get("step", 0)) for _, rec in read_jsonl(path) if rec is not None), default=0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one step's metrics."""
        if not self.is_main:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_completions(self, records: list[dict[str, Any]]) -> None:
        """Append sampled prompts, completions and their rewards."""
        if not self.is_main or not records:
            return
        with open(self.dir / "completions.jsonl", "a") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")

    def close(self) -> None:
        """Flush and close the writers."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any] | None]]:
    """``(line, record)`` per non-empty line; ``record`` is None where the line is not a JSON object.

    Bytes that are not UTF-8 (a torn multi-byte character) are replaced rather than fatal.
    """
    out: list[tuple[str, dict[str, Any] | None]] = []
    for ln in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError:
            rec = None
        out.append((ln, rec if isinstance(rec, dict) else None))
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def plot_rewards(output_dir: str | Path, keys: tuple[str, ...] = ("reward",)) -> Path | None:
    """Plot reward (and per-reward) curves from ``metrics.jsonl`` into ``reward_curve.png``.

    The total (``reward``, the weighted sum) is the thick black line. A per-reward curve equal to
    it at every step (one reward of weight 1) would lie exactly under it, so it is not drawn and
    the total's label names it instead (:func:`reward_curves`).
    """
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [rec for _, rec in read_jsonl(path) if rec is not None and isinstance(rec.get("step"), int | float)]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ys, total in reward_curves(rows, keys):
        style = {"color": "black", "linewidth": 2.2, "zorder": 3} if total else {"linewidth": 1.2}
        ax.plot(steps, [float("nan") if y is None else y for y in ys], label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("GRPO training reward")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(output_dir) / "reward_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def reward_curves(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("reward",)) -> list[tuple[str, list, bool]]:
    """``(label, values per row, is_total)`` of each curve :func:`plot_rewards` draws.

    ``keys`` are the totals; every ``rewards/<name>`` mean follows. A per-reward series equal to a
    total at every step is dropped and named in the total's label.
    """
    per_reward = sorted({k for r in rows for k in r if k.startswith("rewards/") and k.count("/") == 1
                         and not k.endswith(("_std", "_frac", "_errors", "_timeouts"))})
    series = {name: [r.get(name) for r in rows] for name in [*keys, *per_reward]}
    series = {name: ys for name, ys in series.items() if any(y is not None for y in ys)}
    labels = {name: name for name in series}
    for total in [k for k in keys if k in series]:
        for name in [k for k in per_reward if k in series]:
            if _same_curve(series[total], series[name]):
                labels[total] += f" (= {name})"
                del series[name]
    return [(labels[name], ys, name in keys) for name, ys in series.items()]


def _same_curve(a: list[Any], b: list[Any]) -> bool:
    """Whether two metric series are equal at every step (missing where the other is missing)."""
    return all((x is None) == (y is None) and (x is None or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12))
               for x, y in zip(a, b, strict=True))
