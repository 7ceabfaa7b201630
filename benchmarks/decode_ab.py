"""The built-in rollout with and without compact decoding, alternating, same prompts and seeds.

    python benchmarks/decode_ab.py                                   # vision config, G 8, 2 prompts, 256 tokens
    python benchmarks/decode_ab.py --eos-boost -100                  # no early EOS: nothing to drop

``rollout.options.compact_decode`` (``core/plugins/builtin/decode.py``) drops rows that have
ended from the decode batch; ``generate`` computes every row until the longest one ends. What it
saves depends on how much completion lengths differ inside a batch, which a random tiny policy
does not show (it rarely samples EOS, so every row runs to the limit). So the policy's EOS logit
is raised by ``--eos-boost`` (a forward hook that depends on nothing but the logits: the same
distribution on both paths), which gives the geometric spread of lengths printed with the
result; real R1-style groups spread from tens to hundreds of tokens.

Each repeat samples the same prompts with the same seed on both paths (alternating which goes
first); reported per path: median rollout seconds, mean completion length, and the decode
forwards' row-positions (counted by a hook: rows x one position per step). The completions
differ between the paths after the first dropped row (another random stream, same per-token
distributions), so their length statistics are compared, not their tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_vs_trl import CONFIGS, host, task_options  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="vision")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--eos-boost", type=float, default=1.5, help="added to the EOS logit at every step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--static-compile", action="store_true",
                   help="also time plain generate with a static KV cache and torch.compile (transformers' "
                        "CompileConfig, forced on CPU) against plain generate with its dynamic cache")
    args = p.parse_args()

    import torch

    from core.interfaces import PromptInput, RolloutContext, SamplingParams, eos_token_ids
    from core.plugins.builtin.rollout import TransformersRollout
    from core.testing.models import eos_bias_hook

    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    h = host()
    family_cls = h.registry.get("models", "qwen2_5_vl")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp, "tiny"))
        family_cls.build_tiny_checkpoint(ckpt, **cfg["tiny"])
        family = family_cls()
        model = family.load_model(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
        processor = family.load_processor(ckpt)
    eos = sorted(eos_token_ids(model, processor))
    eos_bias_hook(model, eos, args.eos_boost)
    rows = {"n": 0}

    def count(_m, args_, kwargs):
        x = kwargs.get("input_ids", args_[0] if args_ else None)
        if x is not None and x.shape[1] == 1:
            rows["n"] += x.shape[0]

    model.register_forward_pre_hook(count, with_kwargs=True)
    task = h.registry.create("tasks", "synthetic_color", task_options(cfg))
    samples = task.load("train")[:args.prompts]
    prompts = [PromptInput(s.messages, family.render_prompt(processor, s.messages), s.load_images()) for s in samples]
    ctx = RolloutContext(model=model, processor=processor, family=family, device=torch.device("cpu"),
                         suppressed_token_ids=family.suppressed_token_ids(processor, model))
    engines = {}
    for on in (True, False):
        engines[on] = TransformersRollout.from_options({"compact_decode": on})
        engines[on].setup(ctx)
    sp = SamplingParams(n=args.generations, max_new_tokens=args.max_new_tokens, temperature=1.0)
    res: dict[bool, dict[str, list[float]]] = {on: {"s": [], "len": [], "rows": []} for on in (True, False)}
    for r in range(args.repeats + 1):  # the first repeat warms up and is dropped
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            torch.manual_seed(r)
            rows["n"] = 0
            t0 = time.perf_counter()
            groups = engines[on].generate(prompts, sp)
            dt = time.perf_counter() - t0
            if r == 0:
                continue
            lens = [len(c.ids) for g in groups for c in g]
            res[on]["s"].append(dt)
            res[on]["len"].append(statistics.mean(lens))
            res[on]["rows"].append(rows["n"])
            if on:
                spread = (min(lens), statistics.median(lens), max(lens))
    name = {True: "compact_decode on ", False: "compact_decode off"}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()}, {os.cpu_count()} CPU(s), "
          f"load avg {os.getloadavg()[0]:.1f}  torch {torch.__version__}  threads {args.threads}")
    print(f"config {args.config}: {args.prompts} prompts x G {args.generations}, max {args.max_new_tokens} new tokens, "
          f"EOS logit +{args.eos_boost}; {args.repeats} repeats after 1 warm-up, alternating; last repeat's lengths "
          f"(on) min/median/max {spread[0]}/{spread[1]:g}/{spread[2]}")
    for on in (True, False):
        x = res[on]
        print(f"  {name[on]}: median {statistics.median(x['s']):.3f} s per rollout, mean completion "
              f"{statistics.mean(x['len']):.1f} tokens, decode row-positions {statistics.mean(x['rows']):.0f}")
    ratios = [a / b for a, b in zip(res[True]["s"], res[False]["s"], strict=True)]
    print(f"  on/off: paired-median time {statistics.median(ratios):.2f}x; decode row-positions "
          f"{statistics.mean(res[True]['rows']) / statistics.mean(res[False]['rows']):.2f}x")
    if args.static_compile:
        static_compile(model, family, processor, prompts, args, eos)


def static_compile(model, family, processor, prompts, args, eos: list[int]) -> None:
    """Plain ``generate`` with a static cache compiled by torch.compile vs its dynamic cache, same rows.

    Every row runs to ``--max-new-tokens`` (``min_new_tokens``), so both do the same forwards and
    sample the same tokens; the first compiled call (the compilation) is timed on its own.
    """
    import torch
    from transformers import CompileConfig

    inputs = family.process(processor, [p.text for p in prompts], [p.images for p in prompts])
    compile_cfg = CompileConfig()
    compile_cfg._compile_all_devices = True  # transformers compiles on CUDA-like devices only, unless told
    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=True,
              temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.generations,
              pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=eos)
    paths = {"dynamic cache": {}, "static cache + compile": {"cache_implementation": "static",
                                                             "compile_config": compile_cfg}}
    times: dict[str, list[float]] = {k: [] for k in paths}
    first: dict[str, float] = {}
    outs: dict[str, object] = {}
    for r in range(args.repeats + 1):
        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            with torch.no_grad():
                outs[name] = model.generate(**inputs, **kw, **paths[name])
            dt = time.perf_counter() - t0
            if r == 0:
                first[name] = dt
            else:
                times[name].append(dt)
        same = all(torch.equal(outs[n], outs["dynamic cache"]) for n in paths)
    print(f"plain generate, every row to {args.max_new_tokens} tokens, {args.repeats} repeats after the first call:")
    for name in paths:
        print(f"  {name:22s}: median {statistics.median(times[name]):.3f} s per rollout (first call "
              f"{first[name]:.1f} s)")
    ratios = [a / b for a, b in zip(times["static cache + compile"], times["dynamic cache"], strict=True)]
    print(f"  static+compile / dynamic: paired-median time {statistics.median(ratios):.2f}x; "
          f"same tokens in the last repeat: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
