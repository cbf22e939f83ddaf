"""fasterrcnn_tiny: a small Faster R-CNN that trains from scratch on a CPU in minutes (the synthetic-shapes demo, fast
tests). The same detector as the other builders (our FasterRCNN, RPN, RoIAlign, heads), on a 6-conv backbone.

Shapes: N images of H x W (resized so the short side is ``min_size``), one feature map of C=128 channels at stride
8 (H/8 x W/8), A=9 anchors per location (sizes 16, 32, 64 x ratios 0.5, 1, 2 by default), RoIAlign 7x7 pooling,
a two-layer MLP head of 256 units.
"""

from __future__ import annotations

from torch import nn

from ...files import load_checkpoint_state_dict
from ...ops import MultiScaleRoIAlign
from .anchor_utils import AnchorGenerator
from .faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead, load_state_strict
from .rpn import RPNHead

TINY_STRIDE = 8  # three stride-2 stages
TINY_CHANNELS = 128


class TinyBackbone(nn.Sequential):
    """Three stages of (3x3 conv stride 2, 3x3 conv), each with batch norm and ReLU: 32, 64 and 128 channels."""

    def __init__(self, channels=(32, 64, TINY_CHANNELS)):
        layers: list[nn.Module] = []
        in_channels = 3
        for c in channels:
            for stride in (2, 1):
                layers += [nn.Conv2d(in_channels, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c),
                           nn.ReLU(inplace=True)]
                in_channels = c
        super().__init__(*layers)
        self.out_channels = in_channels


def fasterrcnn_tiny(*, weights=None, num_classes: int = 5, min_size: int = 192, max_size: int = 320,
                    anchor_sizes=(16, 32, 64), **kwargs) -> FasterRCNN:
    """A small Faster R-CNN for CPU training from scratch.

    Args:
        weights: a local checkpoint path of this model, or None (random initialisation).
        num_classes (int): including the background (5: the four SyntheticShapes classes).
        min_size, max_size (int): the transform's resize bounds (the synthetic images are 192 pixels).
        anchor_sizes (tuple of int): anchor sizes in pixels, each with ratios 0.5, 1 and 2.
        **kwargs: FasterRCNN arguments (rpn_* and box_* settings).
    """
    backbone = TinyBackbone()
    anchor_generator = AnchorGenerator((tuple(anchor_sizes),), ((0.5, 1.0, 2.0),))
    # Fewer sampled proposals and RoIs than the ImageNet-scale defaults: small images hold few objects, and the box
    # head's cost is proportional to the RoIs sampled.
    defaults = dict(rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500,
                    rpn_post_nms_top_n_test=300, rpn_batch_size_per_image=128, box_batch_size_per_image=128,
                    box_detections_per_img=100)
    defaults.update(kwargs)
    model = FasterRCNN(
        backbone, num_classes=None, min_size=min_size, max_size=max_size, rpn_anchor_generator=anchor_generator,
        rpn_head=RPNHead(TINY_CHANNELS, anchor_generator.num_anchors_per_location()[0]),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=TwoMLPHead(TINY_CHANNELS * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes),
        **defaults)
    if weights is not None:
        load_state_strict(model, load_checkpoint_state_dict(weights), weights, "fasterrcnn_tiny")
    return model
