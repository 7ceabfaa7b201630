"""vlmr1 model families for Qwen2-VL, Qwen2.5-VL and (where transformers has it) Qwen3-VL."""

__version__ = "0.1.0"
