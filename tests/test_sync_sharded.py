"""Engines holding their own weights (vLLM, servers) are synced from the WHOLE weights under ZeRO-3.

Under ZeRO-3 each process holds a shard of every weight (the unwrapped model's parameters are
empty placeholders), so an engine that reads ``model.named_parameters()`` in ``sync_weights``
(vLLM server mode streams them; colocate reloads them) would send empty tensors. The trainer
gathers the weights around the sync for every engine that does not sample from the policy itself.

A throwaway rollout plugin stands in for such an engine: it answers with fixed colour words and,
at each sync, records on every process the number of elements and the sum of |w| of the weights
it was given. They must equal the checkpoint saved after the same step (the consolidated weights).
The run also builds its ``model.tiny`` checkpoint under the ZeRO-3 launch (the main process first,
outside ``deepspeed.zero.Init``: inside it the build's broadcasts deadlocked the other process).
``slow`` and ``distributed`` (``make test-distributed``); needs ``vlmr1[deepspeed]``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from core.testing import write_distribution
from core.testing.procs import run_command

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs the deepspeed extra: pip install 'vlmr1[deepspeed]'")]

_ENGINE = '''
import json
import os

import torch

from core.hookspecs import hookimpl
from core.interfaces import Completion, RolloutEngine, NoOptions


class RecordingEngine(RolloutEngine):
    """Fixed colour answers; records what each sync receives (a stand-in for a vLLM server)."""

    name = "recording"
    Options = NoOptions

    def generate(self, prompts, sampling):
        tok = self.ctx.processor.tokenizer
        words = ["red", "blue", "green", "yellow"]
        out = []
        for _ in prompts:
            group = []
            for j in range(sampling.n):
                ids = tok.encode(words[j % 4], add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
                group.append(Completion(ids=ids, text=words[j % 4]))
            out.append(group)
        return out

    def sync_weights(self, model):
        rank = int(os.environ.get("RANK", "0"))
        self.n = getattr(self, "n", 0) + 1
        params = [p for _, p in model.named_parameters()]
        rec = {"numel": sum(p.numel() for p in params),
               "abs_sum": float(sum(p.detach().float().abs().sum() for p in params))}
        path = os.path.join(os.environ["SYNC_LOG"], f"rank{rank}-sync{self.n}.json")
        with open(path, "w") as f:
            json.dump(rec, f)


@hookimpl
def vlmr1_register_rollouts(register):
    register(RecordingEngine)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_sync_hands_the_engine_whole_weights(tmp_path):
    site = tmp_path / "site"
    write_distribution(site, "vlmr1-plugin-recording", "0.1.0", modules={"recording_pkg/hooks.py": _ENGINE},
                       entry_points={"recording": "recording_pkg.hooks"})
    cfg = {
        "plugins": ["qwen-vl", "synthetic", "text", "recording"],
        "model": {"family": "qwen2_5_vl", "path": str(tmp_path / "tiny"), "tiny": {"hidden_size": 64, "num_layers": 2}},
        "task": {"name": "synthetic_color", "options": {"num_train": 16, "num_eval": 2}},
        "rewards": [{"name": "default"}],
        "rollout": {"name": "recording"},
        "grpo": {"num_generations": 4, "max_completion_length": 4, "beta": 0.0},
        "train": {"learning_rate": 3e-3, "per_device_batch_size": 4, "max_steps": 2, "seed": 0,
                  "distributed_timeout_s": 60},
        "device": {"name": "cpu"},
        "logging": {"output_dir": str(tmp_path / "out"), "tensorboard": False, "progress_bar": False, "plot": False},
        "checkpoint": {"save_every": 1, "keep_last": 5},
        "eval": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "sync"
    log.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "SYNC_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "multinode" / "accelerate_zero3.yaml"), "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "core.train", "--config", str(path)]
    # Generous: ~1 min on 2 idle cores; the limit only guards against a hang.
    proc = run_command(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "backend: DeepSpeed ZeRO-3 (gloo), 2 processes" in proc.stdout.splitlines()
    saved = load_file(str(tmp_path / "out" / "checkpoint-1" / "model.safetensors"))
    numel = sum(t.numel() for t in saved.values())
    abs_sum = float(sum(t.float().abs().sum() for t in saved.values()))
    base = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    moved = abs(abs_sum - float(sum(t.float().abs().sum() for t in base.values())))
    assert moved > 1e-2, "step 1 did not change the weights: the check below would not tell steps apart"
    for rank in (0, 1):
        rec = json.loads((log / f"rank{rank}-sync1.json").read_text())
        # Without the gather each process sees its shard only: numel ~ half (ZeRO-3 partitions).
        assert rec["numel"] == numel, (rank, rec, numel)
        assert rec["abs_sum"] == pytest.approx(abs_sum, rel=1e-6), (rank, rec, abs_sum)
