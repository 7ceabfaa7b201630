"""vlmr1-plugin-math: math-verify equivalence reward with a hard per-completion time limit."""

__version__ = "0.1.0"
