"""vlmr1 core: a small GRPO engine for vision-language models, extended by plugins."""

__version__ = "0.2.0"
