"""vlmr1-plugin-judge: an OpenAI-compatible chat-completions endpoint as a reward."""

__version__ = "0.1.0"
