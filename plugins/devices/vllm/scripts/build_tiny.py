"""Build the tiny Qwen2.5-VL checkpoint the vLLM CPU tests serve (run with the project's venv).

    python plugins/devices/vllm/scripts/build_tiny.py DIR [--seed 0]

The quickstart's tiny model (hidden 64, 2 layers, 2-layer vision tower, 512-token tokenizer),
except for 2 attention heads (1 KV head) instead of 4: vLLM's CPU attention kernels take head
sizes from 32 up (32, 64, 80, ..., 512), and the quickstart's 16 is refused.
"""

from __future__ import annotations

import argparse

#: The options vLLM's CPU backend needs on top of the quickstart's tiny model.
VLLM_CPU_TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from core.plugins import PluginHost

    fam = PluginHost().registry.get("models", "qwen2_5_vl")
    print(fam.build_tiny_checkpoint(a.dir, seed=a.seed, **VLLM_CPU_TINY))


if __name__ == "__main__":
    main()
