"""vlmr1 model family for the transformers-native InternVL (InternVL3 / InternVL3.5 ``*-hf``)."""

__version__ = "0.1.0"
