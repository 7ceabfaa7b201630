"""vlmr1-plugin-text: rule-based text rewards (format, exact match, mcq, yes/no, default, length, repetition)."""

__version__ = "0.1.0"
