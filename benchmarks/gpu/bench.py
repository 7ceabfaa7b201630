"""GPU GRPO step benchmark: vlmr1 vs trl.GRPOTrainer on a random model of real shape.

    python benchmarks/gpu/bench.py --size 3b --out DIR            # on a CUDA machine (bf16, SDPA)
    python benchmarks/gpu/bench.py --size tiny --device cpu --out DIR --max-new-tokens 8 --image-size 56

Both sides train the same randomly initialised Qwen2.5-VL checkpoint (``--size``: ``3b`` is
Qwen2.5-VL-3B's shape with the tiny 512-token tokenizer; ``1b`` a smaller fallback; ``tiny`` the
test model) on the same synthetic colour prompts with ``--image-size``² images, the same G,
completion length, beta, learning rate, temperature, reward and gradient checkpointing setting
(off for both unless ``--gradient-checkpointing``). Each side runs in a fresh process (its peak
GPU memory is its own); sides alternate over ``--rounds`` (vlmr1 first in odd rounds, TRL first in
even ones); in each run the first ``--warmup`` steps are dropped and the median of the rest kept.

It is a GPU-specific sibling of ``benchmarks/step_vs_trl.py`` (the CPU benchmark) with the same
fairness rules, plus tokens/s, MFU and peak GPU memory. MFU counts the same "useful" model FLOPs
for both sides (see :func:`useful_flops`) over each side's own step time and ``--peak-tflops``.
Results: ``DIR/bench.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: Model shapes. ``3b`` follows Qwen2.5-VL-3B-Instruct's config.json (text and vision tower).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    # Real-shape code path (depth set after the 1-layer build, window/full attention) at CPU size.
    "small": {"hidden_size": 128, "num_layers": 3, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 256,
              "rope_theta": 1e6, "vision_hidden_size": 64, "vision_depth": 9, "vision_heads": 2,
              "vision_intermediate_size": 96},
    "1b": {"hidden_size": 1536, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2, "intermediate_size": 8960,
           "rope_theta": 1e6, "vision_hidden_size": 1280, "vision_depth": 32, "vision_heads": 16,
           "vision_intermediate_size": 3420},
    "3b": {"hidden_size": 2048, "num_layers": 36, "num_heads": 16, "num_kv_heads": 2, "intermediate_size": 11008,
           "rope_theta": 1e6, "vision_hidden_size": 1280, "vision_depth": 32, "vision_heads": 16,
           "vision_intermediate_size": 3420},
}
#: Dense bf16 peak (TFLOP/s) by device-name fragment, from the vendors' spec sheets.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def host():
    from core.plugins import PluginHost

    return PluginHost()


def build_checkpoint(size: str, image_size: int, path: Path, device: str) -> Path:
    """Random Qwen2.5-VL of ``size`` at ``path``, its processor sized so an image is ``image_size``² pixels.

    The tokenizer, processor and config come from the family's tiny builder (1 layer, so it is
    quick); the depth is then set to the real one and the model initialised directly on
    ``device`` in bf16 (CUDA) or float32 (CPU) and saved, so a 3B model needs no CPU-side init.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    fam = host().registry.get("models", "qwen2_5_vl")
    preset = dict(SIZES[size])
    px = image_size * image_size
    if not preset:
        fam.build_tiny_checkpoint(path, min_pixels=px, max_pixels=px)
        return path
    layers, depth = preset.pop("num_layers"), preset.pop("vision_depth")
    vis_inter = preset.pop("vision_intermediate_size")
    fam.build_tiny_checkpoint(path, num_layers=1, vision_depth=1, min_pixels=px, max_pixels=px, **preset)
    cfg = AutoConfig.from_pretrained(path)
    cfg.text_config.num_hidden_layers = layers
    cfg.text_config.layer_types = ["full_attention"] * layers
    v = cfg.vision_config
    v.depth, v.intermediate_size, v.window_size = depth, vis_inter, 112
    v.fullatt_block_indexes = [i for i in range(depth) if i % 8 == 7]  # [7, 15, 23, 31] as in the 3B
    gen = GenerationConfig.from_pretrained(path)
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.generation_config = gen
    model.save_pretrained(path)
    del model
    return path


def prompt_facts(ckpt: Path, image_size: int) -> dict[str, Any]:
    """Prompt tokens and vision patches of one benchmark prompt, and parameter counts (for FLOPs)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    task = host().registry.create("tasks", "synthetic_color", {"num_train": 8, "num_eval": 8, "image_size": image_size})
    s = next(iter(task.load("train")))
    proc = AutoProcessor.from_pretrained(ckpt)
    text = proc.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=s.load_images(), return_tensors="pt")
    cfg = AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    vis = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight
    tied = head is model.get_input_embeddings().weight
    # Language-model compute per token: its non-embedding weights plus the LM head matmul
    # (counted once, tied to the embeddings or not).
    text_params = total - vis - emb - (0 if tied else head.numel()) + head.numel()
    return {"prompt_tokens": int(enc["input_ids"].shape[1]), "vision_patches": int(enc["image_grid_thw"].prod()),
            "text_params": int(text_params), "vision_params": int(vis), "total_params": int(total)}


def useful_flops(f: dict[str, Any], prompts: int, G: int, completion_len: float, beta: float) -> float:
    """Model FLOPs of one GRPO step's *necessary* work, the same for both sides.

    Generation: each prompt's image encoded and prompt prefilled once, then one forward per
    generated token (2·N per token). Training: policy forward+backward (6·N) over the P·G
    sequences of prompt + completion, vision once per prompt; the reference forward (2·N) when
    beta > 0. Attention's quadratic term is left out (prompts are ~300 tokens). Work a side
    repeats (e.g. prefilling each prompt G times) is not counted, so it shows as lower MFU.
    """
    nt, nv, lp, v = f["text_params"], f["vision_params"], f["prompt_tokens"], f["vision_patches"]
    seq_tokens = prompts * G * (lp + completion_len)
    gen = 2 * nt * (prompts * lp + prompts * G * completion_len) + 2 * nv * prompts * v
    train = 6 * nt * seq_tokens + 6 * nv * prompts * v
    ref = (2 * nt * seq_tokens + 2 * nv * prompts * v) if beta > 0 else 0
    return float(gen + train + ref)


def common(a: argparse.Namespace) -> dict[str, Any]:
    return {"G": a.generations, "prompts": a.prompts, "max_new": a.max_new_tokens, "beta": a.beta, "lr": a.lr,
            "steps": a.steps, "temperature": 1.0, "gc": a.gradient_checkpointing}


def run_vlmr1(a: argparse.Namespace, out: str) -> dict[str, Any]:
    from core.config import build_config
    from core.grpo.trainer import run
    from core.plugins.plan import make_plan

    c = common(a)
    cuda = a.device == "cuda"
    raw = {
        "model": {"path": a.ckpt, "family": "qwen2_5_vl", "dtype": "bfloat16" if cuda else "float32",
                  "attn_implementation": "sdpa"},
        "task": {"name": "synthetic_color", "options": {"num_train": 256, "num_eval": 8, "image_size": a.image_size}},
        "rewards": [{"name": "all_match"}],
        "grpo": {"num_generations": c["G"], "max_completion_length": c["max_new"], "beta": c["beta"],
                 "temperature": c["temperature"]},
        "train": {"learning_rate": c["lr"], "per_device_batch_size": c["G"] * c["prompts"], "max_steps": c["steps"],
                  "max_grad_norm": 1.0, "gradient_checkpointing": c["gc"]},
        "device": {"name": a.device},
        "logging": {"output_dir": out, "tensorboard": False, "progress_bar": False, "plot": False,
                    "log_completions_every": 0},
        "checkpoint": {"save_final": False},
        "eval": {"enabled": False},
    }
    h = host()
    run(make_plan(build_config(raw), h.registry), h.registry)
    rows = [json.loads(ln) for ln in Path(out, "metrics.jsonl").read_text().splitlines()]
    return {"step_times": [r["step_time_s"] for r in rows], "completion_length": [r["completion_length"] for r in rows]}


def run_trl(a: argparse.Namespace, out: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    c = common(a)
    cuda = a.device == "cuda"
    task = host().registry.create("tasks", "synthetic_color",
                                  {"num_train": 256, "num_eval": 8, "image_size": a.image_size})
    ds = Dataset.from_list([{"prompt": s.messages, "image": s.load_images()[0], "solution": s.solution}
                            for s in task.load("train")])

    def exact(completions, solution, **_):
        texts = [comp[0]["content"] if isinstance(comp, list) else comp for comp in completions]
        return [1.0 if t.strip().lower() == str(s).strip().lower() else 0.0
                for t, s in zip(texts, solution, strict=True)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    processor = AutoProcessor.from_pretrained(a.ckpt)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(a.ckpt, dtype=torch.bfloat16 if cuda else torch.float32,
                                                        attn_implementation="sdpa")
    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=c["G"] * c["prompts"], num_generations=c["G"],
                     max_completion_length=c["max_new"], beta=c["beta"], learning_rate=c["lr"], max_steps=c["steps"],
                     temperature=c["temperature"], use_cpu=not cuda, bf16=cuda, report_to="none",
                     save_strategy="no", logging_steps=1, lr_scheduler_type="constant", warmup_steps=0,
                     max_grad_norm=1.0, weight_decay=0.0, dataloader_num_workers=0, seed=0,
                     gradient_checkpointing=c["gc"])  # TRL's default is on: set it equal to vlmr1's
    trainer = GRPOTrainer(model=model, reward_funcs=[exact], args=cfg, train_dataset=ds, processing_class=processor,
                          callbacks=[Timer()])
    trainer.train()
    lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_times": times, "completion_length": lens}


def child(a: argparse.Namespace) -> None:
    import tempfile

    import torch

    fn = run_vlmr1 if a.side == "vlmr1" else run_trl
    with tempfile.TemporaryDirectory() as out:
        res = fn(a, out)
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if a.device == "cuda":
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print("RESULT " + json.dumps(res), flush=True)


def summarise(a: argparse.Namespace, runs: list[dict[str, Any]], facts: dict[str, Any], peak: float | None):
    out: dict[str, Any] = {}
    for side in ("vlmr1", "trl"):
        rs = [r for r in runs if r["side"] == side]
        times = [t for r in rs for t in r["step_times"][a.warmup:]]
        lens = [x for r in rs for x in r["completion_length"][a.warmup:]] or [float(a.max_new_tokens)]
        med, clen = statistics.median(times), statistics.mean(lens)
        flops = useful_flops(facts, a.prompts, a.generations, clen, a.beta)
        s = {"median_s_per_step": med, "min_s": min(times), "max_s": max(times), "n": len(times),
             "mean_completion_length": clen, "gen_tokens_per_s": a.prompts * a.generations * clen / med,
             "useful_tflop_per_step": flops / 1e12, "achieved_tflops": flops / med / 1e12,
             "peak_rss_gib": max(r["peak_rss_gib"] for r in rs)}
        if peak:
            s["mfu"] = flops / med / (peak * 1e12)
        if a.device == "cuda":
            s["peak_gpu_gib"] = max(r["peak_gpu_gib"] for r in rs)
            s["peak_gpu_reserved_gib"] = max(r["peak_gpu_reserved_gib"] for r in rs)
        out[side] = s
    out["ratio_time_vlmr1_over_trl"] = out["vlmr1"]["median_s_per_step"] / out["trl"]["median_s_per_step"]
    return out


def device_facts(device: str) -> tuple[dict[str, Any], float | None]:
    import torch

    info: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}
    peak = None
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        info.update(gpu=name, capability=list(torch.cuda.get_device_capability(0)), cuda=torch.version.cuda)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return info, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="3b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default="runs/gpu-bench")
    p.add_argument("--steps", type=int, default=4, help="steps per run (the first --warmup are dropped)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="runs per side, alternating which side goes first")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (batch = prompts x G completions)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--gradient-checkpointing", action="store_true", help="on for both sides (default: off for both)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak (default: by name)")
    p.add_argument("--ckpt", help="reuse a checkpoint built earlier (default: build one under --out)")
    p.add_argument("--side", choices=["vlmr1", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        child(a)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not a.ckpt:
        a.ckpt = str(build_checkpoint(a.size, a.image_size, out / f"model-{a.size}", a.device))
    build_s = time.perf_counter() - t0
    facts = prompt_facts(Path(a.ckpt), a.image_size)
    info, peak = device_facts(a.device)
    peak = a.peak_tflops or peak
    runs = []
    for r in range(a.rounds):
        for side in (("vlmr1", "trl") if r % 2 == 0 else ("trl", "vlmr1")):
            argv = [x for x in sys.argv[1:] if x != "--ckpt"]
            cmd = [sys.executable, __file__, *argv, "--side", side, "--ckpt", a.ckpt]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            Path(out, f"{side}-round{r}.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n"
                                                         + proc.stderr[-20000:])
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{side} run failed (exit {proc.returncode}); log: {out}/{side}-round{r}.log\n"
                         f"{proc.stderr[-3000:]}")
            runs.append({"side": side, "round": r, "wall_s": time.perf_counter() - t, **json.loads(line[7:])})
    summary = summarise(a, runs, facts, peak)
    report = {"args": {k: v for k, v in vars(a).items() if k != "side"}, "device": info, "peak_bf16_tflops": peak,
              "model": facts, "build_s": build_s, "summary": summary, "runs": runs}
    Path(out, "bench.json").write_text(json.dumps(report, indent=2))
    print(f"{info.get('gpu', info['machine'])}: size {a.size} ({facts['total_params'] / 1e9:.2f}B params), "
          f"G={a.generations}, prompts/step={a.prompts}, {a.image_size}px images ({facts['prompt_tokens']} prompt "
          f"tokens), max_new_tokens={a.max_new_tokens}, beta={a.beta}, gradient checkpointing "
          f"{'on' if a.gradient_checkpointing else 'off'} (both), steps={a.steps} (first {a.warmup} dropped) "
          f"x {a.rounds} round(s)")
    for side in ("vlmr1", "trl"):
        s = summary[side]
        mfu = f"  MFU {100 * s['mfu']:.1f}%" if "mfu" in s else ""
        mem = (f"  peak GPU {s['peak_gpu_gib']:.1f} GiB" if "peak_gpu_gib" in s
               else f"  peak RSS {s['peak_rss_gib']:.2f} GiB")
        print(f"{side:6s} median {s['median_s_per_step']:.3f} s/step  {s['gen_tokens_per_s']:.0f} gen tok/s  "
              f"{s['achieved_tflops']:.1f} TFLOP/s{mfu}{mem}  "
              f"(n={s['n']}, completion {s['mean_completion_length']:.0f})")
    print(f"ratio vlmr1/trl: time {summary['ratio_time_vlmr1_over_trl']:.2f}x")


if __name__ == "__main__":
    main()
