"""vlmr1 model family for GLM-4.1V / GLM-4.5V / GLM-4.6V (transformers-native)."""

__version__ = "0.1.0"
