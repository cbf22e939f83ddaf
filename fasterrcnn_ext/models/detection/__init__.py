"""Faster R-CNN on fasterrcnn_ext's kernels, mirroring torchvision.models.detection (same builders, arguments and
state_dict keys), plus the classic VGG16 model (docs/design.md)."""

from torchvision.models.detection.faster_rcnn import (
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ...files import load_checkpoint_state_dict
from ._utils import BoxCoder
from .anchor_utils import AnchorGenerator
from .cuda_graph import CUDAGraphDetector
from .faster_rcnn import (
    FasterRCNN,
    FastRCNNPredictor,
    RoIPoolLevel,
    TwoMLPHead,
    VGG16BoxHead,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
    fasterrcnn_vgg16,
    padded_detections_to_list,
)
from .fixed_shape import FixedShapeDetector
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork, RPNHead
from .tiny import TinyBackbone, fasterrcnn_tiny

__all__ = [
    "AnchorGenerator", "BoxCoder", "CUDAGraphDetector", "FasterRCNN", "FixedShapeDetector", "FastRCNNPredictor",
    "GeneralizedRCNNTransform",
    "RPNHead", "RegionProposalNetwork", "RoIHeads", "RoIPoolLevel", "TinyBackbone", "TwoMLPHead", "VGG16BoxHead",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_tiny", "fasterrcnn_vgg16", "load_checkpoint_state_dict",
    "padded_detections_to_list",
    # torchvision's weights enums, which the builders take as they are: `from ... import` them from here too
    "FasterRCNN_ResNet50_FPN_Weights", "FasterRCNN_ResNet50_FPN_V2_Weights",
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights", "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights",
]
