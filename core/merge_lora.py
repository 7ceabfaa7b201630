"""Merge a LoRA adapter into a full checkpoint: ``python -m core.merge_lora ADAPTER_DIR --out DIR``.

A ``train.mode=lora`` run saves each ``checkpoint-<step>/`` as a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) with the processor files beside it.
This folds the adapter into the base weights (peft ``merge_and_unload``) and writes a normal
transformers checkpoint (weights, ``config.json``, ``generation_config.json``, processor) that
``AutoModelForImageTextToText.from_pretrained`` loads with no peft installed.

The base model is the adapter's ``base_model_name_or_path`` (the ``model.path`` the run
trained from) unless ``--base`` names another copy of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from core.cli import run_app
from core.config import ConfigError


def merge_lora(adapter_dir: str | Path, out: str | Path, base: str | Path | None = None,
               dtype: str = "auto") -> Path:
    """Merge the adapter in ``adapter_dir`` into its base model and save the result to ``out``.

    Args:
        adapter_dir: a folder with ``adapter_config.json`` (e.g. a LoRA run's checkpoint).
        out: the folder to write; created if missing.
        base: the base checkpoint; default: the adapter's ``base_model_name_or_path``.
        dtype: ``auto`` keeps the base checkpoint's dtype; or ``float32`` / ``bfloat16`` / ``float16``.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (is this a train.mode=lora checkpoint?)")
    base_path = str(base) if base is not None else PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base_path:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base model; pass --base")
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)  # also writes config.json and generation_config.json
    # The run saved its processor beside the adapter; older/foreign adapters may lack it.
    proc_src = adapter_dir if (adapter_dir / "processor_config.json").is_file() or \
        (adapter_dir / "preprocessor_config.json").is_file() else base_path
    AutoProcessor.from_pretrained(str(proc_src)).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m core.merge_lora", description=__doc__.split("\n")[0])
    p.add_argument("adapter_dir", help="a LoRA checkpoint folder (adapter_config.json + adapter weights)")
    p.add_argument("--out", required=True, help="folder for the merged transformers checkpoint")
    p.add_argument("--base", help="base checkpoint (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (default: the base checkpoint's)")
    args = p.parse_args(argv)

    def body() -> int:
        try:
            out = merge_lora(args.adapter_dir, args.out, args.base, args.dtype)
        except (FileNotFoundError, ValueError, OSError) as exc:  # a missing/bad adapter or base: bad input
            raise ConfigError(str(exc)) from None
        print(f"merged checkpoint in {out}")
        return 0

    return run_app(body)


if __name__ == "__main__":
    sys.exit(main())
