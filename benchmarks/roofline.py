"""Per-phase roofline of one vlmr1 GRPO step: time, counted FLOPs, fraction of the measured peak.

    python benchmarks/roofline.py                         # vision config, G 8, 2 prompts, 64 new tokens
    python benchmarks/roofline.py --max-new-tokens 128 --json roofline.json

The machine's fp32 matmul peak is measured in the same process (a 2048^3 product, best of
several, with ``torch.mm`` (MKL) and with the oneDNN linear the CPU device runs the model's
layers through; the peak is the better of the two) and so is its memory bandwidth (a large
tensor copy: bytes read + written). A real
:class:`~core.grpo.trainer.GRPOTrainer` (the engine's defaults, the step loop's phases) runs one
warm-up step; then, from the same weights, optimizer state and seeds, the next step runs
``--repeats`` times timed (weights restored in between; median per phase) and once more under
``torch.utils.flop_counter.FlopCounterMode`` (its Python dispatch slows every op, so it is never
timed). The counted step must sample the same tokens as the timed ones; it is printed.

What is counted: the matmul-class ops in torch's FLOP registry (``mm``, ``addmm``, ``bmm``,
``baddbmm``, convolutions, SDPA attention), forward and backward, plus CPU SDPA
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward, registered here with torch's
own SDPA formula at full ``[q, k]`` size, masked or not) and the CPU device's oneDNN linears
(``mkldnn::_linear_pointwise``, forward and backward products). Element-wise work (norms,
activations, softmax outside SDPA, the optimizer's AdamW, sampling) counts 0 FLOPs; for those
phases, and for decode, a bytes-moved estimate is compared with the measured bandwidth.

Phases, by forward hooks on the policy / reference models and optimizer step hooks:
``prefill`` policy forwards without gradients over more than one position per row (the vision
tower runs inside them), ``decode`` those over one position, ``generation other`` the rest of
the rollout (processor, chat template, images, sampling, logits processors, cache bookkeeping),
``reward`` the reward phase, ``reference`` the reference model's forwards, ``policy fwd+bwd``
the update phase less the reference pass and the optimizer step (it holds the loss, input
packing and gradient clipping too), ``optimizer`` AdamW's ``step``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_vs_trl import CONFIGS, host, task_options  # noqa: E402

PHASES = ("prefill", "decode", "generation other", "reward", "reference", "policy fwd+bwd", "optimizer",
          "advantages")


def measure_peak(threads: int, n: int = 2048, reps: int = 10) -> dict[str, float]:
    """Best fp32 ``n x n`` product rate (FLOP/s) on ``threads`` threads, per kernel and overall.

    ``mkl``: ``torch.mm`` (PyTorch's own float32 path); ``onednn``: the oneDNN linear the CPU
    device runs the model's layers through (``device.options.onednn_linear``); ``peak``: the
    better of the two, the machine's measured float32 matmul peak.
    """
    import torch

    from core.plugins.builtin.onednn import onednn_available

    a, b = torch.randn(n, n), torch.randn(n, n)
    kernels = {"mkl": lambda: torch.mm(a, b)}
    if onednn_available():
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    out: dict[str, float] = {}
    for name, fn in kernels.items():
        for _ in range(2):
            fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best
    out["peak"] = max(out.values())
    return out


def measure_bandwidth(mib: int = 256, reps: int = 10) -> float:
    """Best copy rate (bytes read + written per second) of a ``mib`` MiB float32 tensor."""
    import torch

    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def measure_decode_matmuls(model: Any, rows: int, reps: int = 200) -> dict[str, float]:
    """The rate the decode's own matrix products reach in isolation, at the decode's row count.

    A decode forward multiplies ``rows`` activations (one token per row) by every language-model
    weight matrix: skinny products whose rate on a CPU is far below the square 2048^3 ``torch.mm``
    peak. Each distinct ``nn.Linear`` shape of the language model and output head (not the vision
    tower: it runs in prefill only) is timed alone, best of ``reps`` calls, on random inputs of
    ``rows`` rows; the result is the FLOP rate of one decode forward's linears if each ran at that
    best speed: the ceiling a decode step's matmul work can reach on this machine, without
    attention, norms or sampling.
    """
    import torch

    shapes: dict[tuple[int, int], int] = defaultdict(int)
    layer = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".visual." not in f".{name}.":
            shapes[(mod.in_features, mod.out_features)] += 1
            layer = layer or type(mod)  # the kernel the model runs (nn.Linear, or the CPU device's oneDNN one)
    flops = seconds = 0.0
    for (fan_in, fan_out), count in shapes.items():
        lin = torch.nn.Linear(fan_in, fan_out, bias=False)
        lin.__class__ = layer or torch.nn.Linear
        x = torch.randn(rows, fan_in)
        with torch.no_grad():
            for _ in range(10):
                lin(x)
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                lin(x)
                best = min(best, time.perf_counter() - t0)
        flops += count * 2 * rows * fan_in * fan_out
        seconds += count * best
    return {"rows": rows, "flop_per_s": flops / seconds, "linears": float(sum(shapes.values())),
            "shapes": float(len(shapes))}


def register_cpu_sdpa() -> None:
    """Count CPU SDPA (not in torch's registry) with torch's own SDPA forward/backward formulas."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = aten._scaled_dot_product_flash_attention_for_cpu
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd.default not in fc.flop_registry and fwd not in fc.flop_registry:
        @fc.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

        @fc.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    # The CPU device's oneDNN linears (core.plugins.builtin.onednn): input [..., K] x weight [N, K] (any
    # strides; the backward's products are the same op): 2 * rows * K * N.
    lin = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if lin is not None and lin not in fc.flop_registry and lin.default not in fc.flop_registry:
        @fc.register_flop_formula(lin)
        def _lin(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
            rows = 1
            for d in x_shape[:-1]:
                rows *= d
            return 2 * rows * x_shape[-1] * w_shape[0]


class Probe:
    """Hooks adding each pass's wall time, calls, token positions, FLOPs (when counting) and bytes."""

    def __init__(self, trainer: Any) -> None:
        import torch

        self.time: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.decode_bytes = self.update_flops = 0.0
        self.ops: dict[str, float] = {}
        self.counter: Any = None
        self._open: dict[int, tuple[str, float, float]] = {}
        policy = trainer.accelerator.unwrap_model(trainer.policy.model)
        tc = policy.config.get_text_config()
        self.kv_per_position = 2 * tc.num_hidden_layers * tc.num_key_value_heads * \
            (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads) * 4
        # Weights a decode step reads: every language-model matrix and the output head, not the
        # vision tower (it runs in prefill only) nor the embedding table (a gather of one row),
        # unless the head shares it.
        head = policy.get_output_embeddings().weight
        emb = policy.get_input_embeddings().weight
        self.decode_weight_bytes = sum(p.numel() * p.element_size() for n, p in policy.named_parameters()
                                       if ".visual." not in f".{n}" and p is not emb) + \
            (head.numel() * head.element_size() if head is emb else 0)
        self.param_elems = sum(p.numel() for p in trainer.policy.trainable)
        self._hook(policy, "policy")
        if trainer.bundle.ref_model is not None:
            self._hook(trainer.bundle.ref_model, "reference")
        opt = getattr(trainer.policy.optimizer, "optimizer", trainer.policy.optimizer)
        opt.register_step_pre_hook(lambda *_: self._start("optimizer", 0))
        opt.register_step_post_hook(lambda *_: self._stop(0))
        self.grad_enabled = torch.is_grad_enabled

    def _flops(self) -> float:
        return float(self.counter.get_total_flops()) if self.counter is not None else 0.0

    def _start(self, phase: str, key: int) -> None:
        self._open[key] = (phase, time.perf_counter(), self._flops())

    def _stop(self, key: int) -> None:
        phase, t0, f0 = self._open.pop(key)
        self.time[phase] += time.perf_counter() - t0
        self.flops[phase] += self._flops() - f0
        self.calls[phase] += 1

    def _hook(self, model: Any, kind: str) -> None:
        key = id(model)

        def pre(_m: Any, args: Any, kwargs: dict[str, Any]) -> None:
            x = kwargs.get("input_ids", args[0] if args else None)
            if x is None:
                x = kwargs.get("inputs_embeds")
            rows, pos = (x.shape[0], x.shape[1]) if x is not None else (0, 0)
            if kind == "reference":
                phase = "reference"
            elif self.grad_enabled():
                phase = "policy forward"
            else:
                phase = "prefill" if pos > 1 else "decode"
            if phase == "decode":
                mask = kwargs.get("attention_mask")
                ctx = mask.shape[-1] if mask is not None else pos
                self.decode_bytes += self.decode_weight_bytes + rows * ctx * self.kv_per_position
            self.tokens[phase] += rows * pos
            self._start(phase, key)

        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(lambda *_: self._stop(key))


def one_step(trainer: Any, step: int) -> Any:
    """The phases of :meth:`GRPOTrainer.fit`'s loop body for ``step`` (no sync, log or save)."""
    import torch

    from core.grpo.batch import StepBatch
    from core.grpo.update import policy_update

    batch = StepBatch(step)
    torch.manual_seed(trainer.cfg.train.seed * 1_000_003 + step * 1009 + trainer.rank)
    t0 = time.perf_counter()
    trainer.phase_rollout_and_rewards(batch)
    with batch.timed("advantages"):
        trainer.phase_advantages(batch)
    with batch.timed("update"):
        policy_update(trainer.policy, batch)
    batch.timings["step"] = time.perf_counter() - t0
    return batch


def phase_rows(probe: Probe, batch: Any) -> dict[str, dict[str, float]]:
    """Seconds, counted FLOPs and token positions per phase of one step."""
    t, f = probe.time, probe.flops
    tim = batch.timings
    rows = {
        "prefill": (t["prefill"], f["prefill"]),
        "decode": (t["decode"], f["decode"]),
        "generation other": (tim["rollout"] - t["prefill"] - t["decode"], 0.0),
        "reward": (tim["rewards"], 0.0),
        "reference": (t["reference"], f["reference"]),
        "policy fwd+bwd": (tim["update"] - t["reference"] - t["optimizer"],
                           probe.update_flops - f["reference"] - f["optimizer"]),
        "optimizer": (t["optimizer"], f["optimizer"]),
        "advantages": (tim["advantages"], 0.0),
    }
    out = {k: {"s": s, "flops": fl, "tokens": float(probe.tokens.get(k, 0))} for k, (s, fl) in rows.items()}
    out["policy fwd+bwd"]["tokens"] = float(probe.tokens.get("policy forward", 0))
    out["step"] = {"s": tim["step"], "flops": probe.update_flops + f["prefill"] + f["decode"], "tokens": 0.0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="vision")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the measured step (median per phase)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from core.config import build_config
    from core.grpo.trainer import GRPOTrainer
    from core.plugins.plan import make_plan

    torch.set_num_threads(args.threads)
    register_cpu_sdpa()
    peaks, bw = measure_peak(args.threads), measure_bandwidth()
    peak = peaks["peak"]
    cfg = CONFIGS[args.config]
    h = host()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp, "tiny-qwen2.5-vl"))
        h.registry.get("models", "qwen2_5_vl").build_tiny_checkpoint(ckpt, **cfg["tiny"])
        raw = {
            "model": {"path": ckpt, "family": "qwen2_5_vl"},
            "task": {"name": "synthetic_color", "options": task_options(cfg)},
            "rewards": [{"name": "all_match"}],
            "grpo": {"num_generations": args.generations, "max_completion_length": args.max_new_tokens,
                     "beta": args.beta, "temperature": 1.0},
            "train": {"learning_rate": 1e-5, "per_device_batch_size": args.generations * args.prompts,
                      "max_steps": 2, "max_grad_norm": 1.0},
            "logging": {"output_dir": str(Path(tmp, "run")), "tensorboard": False, "progress_bar": False},
            "eval": {"enabled": False},
        }
        trainer = GRPOTrainer(make_plan(build_config(raw), h.registry), h.registry)
        try:
            one_step(trainer, 0)  # warm-up
            probe = Probe(trainer)
            pol, opt = trainer.policy, trainer.policy.optimizer
            saved = (copy.deepcopy(pol.model.state_dict()), copy.deepcopy(opt.state_dict()),
                     copy.deepcopy(pol.scheduler.state_dict()))

            def restore() -> None:
                pol.model.load_state_dict(saved[0])
                opt.load_state_dict(copy.deepcopy(saved[1]))
                pol.scheduler.load_state_dict(saved[2])

            def run(counted: bool) -> tuple[dict[str, dict[str, float]], list[list[int]], float]:
                restore()
                for d in (probe.time, probe.flops, probe.calls, probe.tokens):  # hooks stay; tallies reset
                    d.clear()
                probe.decode_bytes = 0.0
                if counted:
                    probe.counter = FlopCounterMode(display=False)
                    with probe.counter:
                        batch = one_step(trainer, 1)
                    probe.update_flops = float(probe.counter.get_total_flops()) - probe.flops["prefill"] - \
                        probe.flops["decode"]
                    probe.ops = {str(op): float(n) for op, n in probe.counter.get_flop_counts()["Global"].items()}
                    probe.counter = None
                else:
                    probe.update_flops = 0.0
                    batch = one_step(trainer, 1)
                return phase_rows(probe, batch), [c.ids for c in batch.generations.completions], probe.decode_bytes

            timed = [run(False) for _ in range(args.repeats)]
            ceiling = measure_decode_matmuls(trainer.accelerator.unwrap_model(pol.model),
                                             args.generations * args.prompts)
            counted, counted_ids, decode_bytes = run(True)
        finally:
            trainer.finish()
    same_tokens = all(ids == counted_ids for _, ids, _ in timed)
    rows: dict[str, dict[str, float]] = {}
    for ph in (*PHASES, "step"):
        s = statistics.median(r[ph]["s"] for r, _, _ in timed)
        rows[ph] = {"s": s, "flops": counted[ph]["flops"], "tokens": counted[ph]["tokens"],
                    "flop_per_s": counted[ph]["flops"] / s if s > 0 else 0.0}
        rows[ph]["peak_frac"] = rows[ph]["flop_per_s"] / peak
    # Bytes-bound phases: decode (weights + KV cache per forward) and AdamW (p, g, m, v read; p, m, v written).
    rows["decode"]["bytes"] = decode_bytes
    rows["optimizer"]["bytes"] = 7 * 4 * float(probe.param_elems)
    for ph in ("decode", "optimizer"):
        rows[ph]["bytes_per_s"] = rows[ph]["bytes"] / rows[ph]["s"] if rows[ph]["s"] > 0 else 0.0
        rows[ph]["bandwidth_frac"] = rows[ph]["bytes_per_s"] / bw
    mean_len = statistics.mean(len(i) for i in counted_ids)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), load avg {os.getloadavg()[0]:.1f} at start",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "threads": args.threads, "config": args.config, "G": args.generations, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "peak_flop_per_s": peak,
        "peak_by_kernel_flop_per_s": peaks,
        "bandwidth_bytes_per_s": bw, "mean_completion": mean_len, "counted_step_same_tokens": same_tokens,
        "phases": rows, "counted_flops_by_op": probe.ops, "decode_matmul_ceiling": ceiling,
    }
    print(f"{report['date']}  {report['machine']}  torch {report['torch']}  threads {args.threads}")
    print(f"config {args.config}: G={args.generations}, prompts/step={args.prompts}, "
          f"max_new_tokens={args.max_new_tokens} (mean completion {mean_len:.1f}); timed step: median of "
          f"{args.repeats}; FLOPs counted on a replay of the same step (same sampled tokens: "
          f"{'yes' if same_tokens else 'NO'})")
    by_kernel = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items() if k != "peak")
    print(f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3; {by_kernel}), copy bandwidth "
          f"{bw / 1e9:.1f} GB/s (256 MiB, read + write)")
    print("| phase | s | share | GFLOP counted | GFLOP/s | of peak | token positions | GB moved (est.) | GB/s | "
          "of bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    step_s = rows["step"]["s"]
    for ph in (*PHASES, "step"):
        r = rows[ph]
        mem = (f"{r['bytes'] / 1e9:.2f} | {r['bytes_per_s'] / 1e9:.1f} | {r['bandwidth_frac']:.0%}"
               if "bytes" in r else "| |")
        print(f"| {ph} | {r['s']:.3f} | {r['s'] / step_s:.0%} | {r['flops'] / 1e9:.2f} | "
              f"{r['flop_per_s'] / 1e9:.1f} | {r['peak_frac']:.0%} | {r['tokens']:.0f} | {mem} |")
    dec = rows["decode"]
    print(f"decode-shaped matmuls alone ({ceiling['rows']} rows x each of the language model's "
          f"{ceiling['linears']:.0f} linears, best of 200 calls per shape): {ceiling['flop_per_s'] / 1e9:.1f} GFLOP/s "
          f"= {ceiling['flop_per_s'] / peak:.0%} of the 2048^3 peak; decode reached "
          f"{dec['flop_per_s'] / ceiling['flop_per_s']:.0%} of that ceiling")
    print("counted by op: " + ", ".join(f"{op} {n / 1e9:.2f} GFLOP" for op, n in probe.ops.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
