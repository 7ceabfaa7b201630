"""vlmr1 model family for Mistral 3 (Mistral-Small-3.1 and its Pixtral vision tower); the tutorial's example."""

__version__ = "0.2.0"
