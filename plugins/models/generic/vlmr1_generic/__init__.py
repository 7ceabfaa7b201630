"""vlmr1 generic model family: any ``AutoModelForImageTextToText`` checkpoint, as a fallback."""

__version__ = "0.1.0"
