"""Float32 linear-layer GEMMs on this CPU: PyTorch's own path (MKL) against oneDNN, with their accuracy.

    python benchmarks/linear_kernels.py [--threads 2] [--json out.json]

Why the CPU device routes ``nn.Linear`` through oneDNN (``device.options.onednn_linear``,
``core/plugins/builtin/onednn.py``): for each shape of the benchmark's vision model (hidden 384,
MLP 1024, vocabulary 512) at the training passes' row count (1320 token positions) and the
decode's (16 rows), and a square 2048^3 product, it times the three products of a linear layer
(forward ``x W^T``, input gradient ``g W``, weight gradient ``g^T x``) with ``torch`` (MKL's
sgemm) and with ``torch.ops.mkldnn._linear_pointwise`` (oneDNN), best of ``--reps``, and reports
GFLOP/s and the largest error of each against a float64 product (relative to the largest
output), so a speed-up bought with lower precision would show.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lin = torch.ops.mkldnn._linear_pointwise

    def best(fn) -> float:
        for _ in range(3):
            fn()
        out = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    shapes = [(2048, 2048, 2048)] + [(m, k, n) for m in (1320, 16) for k, n in ((384, 1024), (1024, 384), (384, 384),
                                                                                (384, 128), (384, 512))]
    rows = []
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()} {platform.processor()}, "
          f"{os.cpu_count()} CPU(s), load avg {os.getloadavg()[0]:.1f}  torch {torch.__version__}  "
          f"threads {args.threads}")
    print("| rows x in x out | product | MKL GFLOP/s | oneDNN GFLOP/s | oneDNN / MKL | MKL err | oneDNN err |")
    print("|---|---|---|---|---|---|---|")
    for m, k, n in shapes:
        torch.manual_seed(0)
        x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        # each product is a @ b_t.T, as a linear layer computes it: (a, b_t)
        products = {"forward": (x, w), "input grad": (g, w.t()), "weight grad": (g.t(), x.t())}
        for name, (a, b_t) in products.items():
            mkl = functools.partial(torch.mm, a, b_t.t())
            dnn = functools.partial(lin, a, b_t, None, "none", [], "")
            want = a.double() @ b_t.double().T
            scale = float(want.abs().max())
            err = {s: float((fn().double() - want).abs().max()) / scale for s, fn in (("mkl", mkl), ("onednn", dnn))}
            t = {"mkl": best(mkl), "onednn": best(dnn)}
            flops = 2 * m * k * n
            row = {"rows": m, "in": k, "out": n, "product": name, **{f"{s}_gflop_per_s": flops / v / 1e9
                                                                    for s, v in t.items()},
                   **{f"{s}_rel_err": e for s, e in err.items()}}
            rows.append(row)
            print(f"| {m} x {k} x {n} | {name} | {row['mkl_gflop_per_s']:.0f} | {row['onednn_gflop_per_s']:.0f} | "
                  f"{t['mkl'] / t['onednn']:.2f}x | {err['mkl']:.1e} | {err['onednn']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
