"""Detection answers, re-exported from :mod:`core.interfaces.boxes`.

JSON lists of ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}``, or "None"; boxes in the
continuous convention pycocotools uses (``x2``/``y2`` exclusive). The parser is shared with
``core.evaluate`` so evaluation reads answers exactly as this plugin's rewards do.
"""

from core.interfaces import DetObject, iou, normalize_label, parse_objects

#: The name this plugin has always used for one parsed object.
Obj = DetObject

__all__ = ["DetObject", "Obj", "iou", "normalize_label", "parse_objects"]
