"""vlmr1-plugin-grounding: REC rewards (IoU in original-image pixels, REC answer format)."""

__version__ = "0.1.0"
