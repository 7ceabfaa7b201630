"""Offline, seeded synthetic visual tasks for vlmr1 (no files, no downloads).

Components: :class:`~vlmr1_synthetic.color.SyntheticColor` (``synthetic_color``) and
:class:`~vlmr1_synthetic.grounding.SyntheticGrounding` (``synthetic_grounding``).
"""

__version__ = "0.1.0"
