"""fasterrcnn_ext: fast Faster R-CNN kernels (CPU and CUDA) and a drop-in torchvision-compatible detector.

    import fasterrcnn_ext.ops as ops            # instead of torchvision.ops
    keep = ops.nms(boxes, scores, 0.7)

Every op is also reachable as ``torch.ops.fasterrcnn_ext.<name>``.
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402
from ._library import ExtensionNotBuiltError, build_info  # noqa: E402

__all__ = ["ops", "build_info", "ExtensionNotBuiltError", "__version__"]
