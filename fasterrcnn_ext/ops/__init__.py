"""Drop-in replacements for torchvision.ops, on fasterrcnn_ext's kernels."""

from .boxes import batched_nms, nms

__all__ = ["nms", "batched_nms"]
