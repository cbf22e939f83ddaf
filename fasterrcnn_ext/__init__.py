"""fasterrcnn_ext: fast Faster R-CNN kernels (CPU and CUDA) and a drop-in torchvision-compatible detector.

    import fasterrcnn_ext.ops as ops            # instead of torchvision.ops
    keep = ops.nms(boxes, scores, 0.7)

Every op is also reachable as ``torch.ops.fasterrcnn_ext.<name>``. For code that calls torchvision itself:

    fasterrcnn_ext.patch_torchvision()          # our ops and detector behind torchvision's names (see patch.py)
"""

from ._version import package_version as _package_version

__version__ = _package_version()

from . import ops  # noqa: E402
from ._library import ExtensionNotBuiltError, build_info, library_path  # noqa: E402
from .ops.utils import ArgumentError  # noqa: E402
from .patch import TorchvisionPatch, patch_torchvision, patched, unpatch_torchvision  # noqa: E402

__all__ = ["ops", "build_info", "library_path", "ExtensionNotBuiltError", "ArgumentError", "patch_torchvision",
           "unpatch_torchvision", "patched", "TorchvisionPatch", "__version__"]
