"""Box parsing and IoU, re-exported from :mod:`core.interfaces.boxes`.

The implementation is shared with ``core.evaluate``, so evaluation reads boxes exactly as this
plugin's rewards do.

See :mod:`core.interfaces.boxes` for the box convention (continuous, x2/y2 exclusive) and how it differs
from the original VLM-R1 ``iou``.
"""

from core.interfaces import area, as_box, iou, last_answer, parse_box

__all__ = ["area", "as_box", "iou", "last_answer", "parse_box"]
