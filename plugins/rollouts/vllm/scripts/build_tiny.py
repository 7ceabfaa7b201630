"""Build the tiny Qwen2.5-VL checkpoint the vLLM CPU tests serve (run with the project's venv).

    python plugins/rollouts/vllm/scripts/build_tiny.py DIR [--seed 0]

The quickstart's tiny model (hidden 64, 2 layers, 2-layer vision tower, 512-token tokenizer),
except for 2 attention heads (1 KV head) instead of 4: vLLM's CPU attention kernels take head
sizes from 32 up (32, 64, 80, ..., 512), and the quickstart's 16 is refused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: The options vLLM's CPU backend needs on top of the quickstart's tiny model.
VLLM_CPU_TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    # The plugin host's own command finds the family: a plugin imports nothing from core beyond
    # the plugin API, and never another plugin (vlmr1_qwen_vl) directly.
    options = json.dumps({**VLLM_CPU_TINY, "seed": a.seed})
    return subprocess.call([sys.executable, "-m", "core.plugins", "build-tiny", "qwen2_5_vl", a.dir,
                            "--options", options])


if __name__ == "__main__":
    sys.exit(main())
