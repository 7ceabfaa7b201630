"""vlmr1-plugin-detection: detection rewards (COCO mAP / AP50, odLength, weighted_sum)."""

__version__ = "0.1.0"
