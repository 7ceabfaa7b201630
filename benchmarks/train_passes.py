"""CPU seconds of vlmr1's training passes, plain rows vs the two shared-prefix layouts, on one rollout.

    python benchmarks/train_passes.py [--config vision] [--reps 3]

Times what ``grpo.prefix_sharing`` changes and nothing else (plain rows; ``packed``: one row per
prompt under a block-causal mask; ``cached``: one prompt pass, the completions on its KV cache):
the reference forward (no grad)
plus the policy forward and backward of one step's completions (``--prompts`` groups of
``--generations`` completions of ``--max-new-tokens`` tokens, random non-vision token ids),
on the checkpoint of ``step_vs_trl.py --config``. The two paths alternate; each rep reports
process CPU seconds (all threads), which a busy shared machine disturbs far less than wall
time, and the vision-tower pixels and language-model token positions each path processed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    import torch
    from step_vs_trl import CONFIGS, task_options

    from core.grpo.logprobs import build_train_inputs, completion_logprobs, pad_completions
    from core.grpo.prefix import cached_logprobs, pack, packed_logprobs, prepare_cached
    from core.interfaces import PromptInput
    from core.plugins import PluginHost

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="vision")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    host = PluginHost()
    fam_cls = host.registry.get("models", "qwen2_5_vl")
    with tempfile.TemporaryDirectory() as tmp:
        path = fam_cls.build_tiny_checkpoint(Path(tmp, "m"), **cfg["tiny"])
        fam = fam_cls.from_options({})
        model, ref = fam.load_model(path, dtype=torch.float32), fam.load_model(path, dtype=torch.float32)
        proc = fam.load_processor(path)
    ref.requires_grad_(False)
    samples = host.registry.create("tasks", "synthetic_color", task_options(cfg)).load("train")[:args.prompts]
    prompts = [PromptInput(s.messages, fam.render_prompt(proc, s.messages), s.load_images()) for s in samples]
    rows = [pr for pr in prompts for _ in range(args.generations)]
    torch.manual_seed(0)
    ids, mask = pad_completions(torch.randint(20, 300, (len(rows), args.max_new_tokens)).tolist(),
                                proc.tokenizer.pad_token_id)
    counts = {"pixels": 0, "tokens": 0}
    model.get_submodule("model.visual").register_forward_pre_hook(
        lambda _m, a: counts.__setitem__("pixels", counts["pixels"] + a[0].numel()))
    model.get_submodule("model.language_model").register_forward_pre_hook(
        lambda _m, a, k: counts.__setitem__("tokens", counts["tokens"] + k["inputs_embeds"].shape[:2].numel()),
        with_kwargs=True)

    def plain() -> None:
        rep = fam.process(proc, [r.text for r in rows], [r.images for r in rows])
        inputs = build_train_inputs(rep, ids, mask, fam.per_token_keys)
        with torch.no_grad():
            completion_logprobs(ref, inputs, ids.shape[1])
        (completion_logprobs(model, inputs, ids.shape[1]) * mask).sum().backward()

    def packed() -> None:
        inputs = pack(fam, model, proc, rows, ids, force=True)
        with torch.no_grad():
            packed_logprobs(ref, inputs)
        (packed_logprobs(model, inputs) * mask).sum().backward()

    def cached() -> None:
        inputs = prepare_cached(fam, model, proc, rows, ids)
        with torch.no_grad():
            cached_logprobs(ref, inputs)
        (cached_logprobs(model, inputs) * mask).sum().backward()

    paths = (("plain", plain), ("packed", packed), ("cached", cached))
    cpu: dict[str, list[float]] = {name: [] for name, _ in paths}
    work: dict[str, dict[str, int]] = {}
    for _ in range(args.reps + 1):  # the first round warms up
        for name, fn in paths:
            counts.update(pixels=0, tokens=0)
            model.zero_grad(set_to_none=True)
            c0 = time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            work[name] = dict(counts)
    for name in cpu:
        cpu[name] = cpu[name][1:]
    print(f"config {args.config}: {args.prompts} prompts x G={args.generations}, {args.max_new_tokens} completion "
          f"tokens, {args.threads} threads; policy forward+backward and reference forward (policy-side counts)")
    for name in cpu:
        print(f"  {name:6s} CPU s {[round(x, 2) for x in cpu[name]]} (median {statistics.median(cpu[name]):.2f}); "
              f"vision pixels {work[name]['pixels']}, LM token positions {work[name]['tokens']}")
    for name in ("packed", "cached"):
        ratio = statistics.median(a / b for a, b in zip(cpu[name], cpu["plain"], strict=True))
        print(f"  {name} / plain CPU time: {ratio:.2f}x (paired median)")


if __name__ == "__main__":
    main()
