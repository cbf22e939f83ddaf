"""Faster R-CNN (Ren et al., 2015) on fasterrcnn_ext's kernels: a drop-in for torchvision's FasterRCNN and builders
(same arguments, same state_dict keys, same detections), plus the classic VGG16 model (docs/design.md).

Shapes: N images, each [3, H_i, W_i] in [0, 1]; K_i detections of image i.

Everything downstream of the backbone features runs on our ops: anchors, proposal selection, RoI pooling, box
coding, matching IoU, post-processing. The backbones, the FPN, the heads, the transform, the matcher, the sampler and
the losses are torchvision's own modules, so weights and training behave as in torchvision.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections import OrderedDict

import torch
import torchvision
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.jit.annotations import BroadcastingList2
from torchvision.models.detection import faster_rcnn as tv_faster_rcnn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from ... import _torchvision, memory, ops
from ...capabilities import cpu_capabilities
from ...files import (
    describe_checkpoint,
    is_checkpoint_path,
    load_checkpoint_state_dict,
    named_weights_downloads,
    read_checkpoint_file,
)
from ...ops.poolers import power_of_2_scale
from ...ops.utils import ArgumentError, pair, tracing_by_value
from . import transform
from ._inference import InferenceCopy
from ._routing import PRECISIONS, ForwardState, InferenceOptions, Route, choose_route, precision_of_dtype
from ._utils import rebind
from .anchor_utils import AnchorGenerator
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork, RPNHead

__all__ = [
    "FasterRCNN", "FastRCNNPredictor", "TwoMLPHead", "RPNHead", "VGG16BoxHead", "RoIPoolLevel",
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_vgg16",
]


def _check_inputs(images, targets, training: bool, image_transform=None) -> None:
    """ValueErrors that name the image and the problem, before any work is done; ArgumentErrors (also
    AssertionErrors) where torchvision's GeneralizedRCNN asserts. ``image_transform``: the model's transform; when it
    resizes by torchvision's min/max-size rule, images that rule would shrink to nothing are refused."""
    if not isinstance(images, (list, tuple)):
        what = f"a tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a list of [C, H, W] tensors or one [N, C, H, W] tensor, got {what}")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ArgumentError(f"images[{i}] must be a [C, H, W] tensor, got {shape}")
        if image.shape[-2] == 0 or image.shape[-1] == 0:
            raise ValueError(f"images[{i}] is empty: its shape is {tuple(image.shape)}")
    if transform.resizes_symbolically(image_transform) and not torch.compiler.is_compiling():
        _check_resizable(images, image_transform)
    if training and targets is None:
        raise ArgumentError("targets are required in training mode: one dict with 'boxes' and 'labels' per image")
    if targets is None:
        return
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    for i, target in enumerate(targets):
        boxes = target.get("boxes") if isinstance(target, dict) else None
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ArgumentError(f"targets[{i}]['boxes'] must be a [K, 4] tensor, got {shape}")
        if "labels" not in target:
            raise ValueError(f"targets[{i}] has no 'labels'")
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            k = int(degenerate.nonzero()[0, 0])
            raise ArgumentError(f"targets[{i}]['boxes'][{k}] = {boxes[k].tolist()} of image {i} has x2 <= x1 or "
                                "y2 <= y1: boxes need positive width and height")


def _images_as_list(images, model: nn.Module):
    """A batch given as one Tensor[N, C, H, W] as the list of its N images: torchvision's eager model iterates over
    what it is given, so such a batch works there too. Floating images of another dtype than the model's learned
    layers (float32 images into ``model.half()``) are cast to it, where torchvision's convolutions would refuse them;
    autocast leaves the layers in float32, so images then stay as they are."""
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images.unbind(0))
    weight = next(model.backbone.parameters(), None)
    if not isinstance(images, (list, tuple)) or weight is None or not weight.is_floating_point():
        return images
    return [image.to(weight.dtype) if isinstance(image, Tensor) and image.is_floating_point()
            and image.dtype != weight.dtype else image for image in images]


def _check_resizable(images, resize) -> None:
    """torchvision's resize scales an image by min(min_size / short side, max_size / long side) and rounds down, so
    an image more than max_size times as long as it is thick would become 0 pixels thick (torch's interpolate then
    fails without saying which image). Not under torch.compile or torch.export: there the sizes are symbolic, and the
    comparison would constrain them."""
    min_size, max_size = float(min(resize.min_size)), float(resize.max_size)
    for i, image in enumerate(images):
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if min(height, width) * max_size < max(height, width):
            scale = min(min_size / min(height, width), max_size / max(height, width))
            raise ValueError(f"images[{i}] of {height}x{width} pixels is too thin: the model's resize (min_size "
                             f"{resize.min_size}, max_size {resize.max_size}) would make it "
                             f"{int(height * scale)}x{int(width * scale)}")


def _option_view(field: str, doc: str) -> property:
    """A model property that reads and replaces one field of its frozen ``inference_options``."""

    def get(self):
        return getattr(self.inference_options, field)

    def set(self, value) -> None:
        self.inference_options = dataclasses.replace(self.inference_options, **{field: value})

    return property(get, set, doc=doc)


class FasterRCNN(tv_faster_rcnn.FasterRCNN):
    """torchvision's FasterRCNN on fasterrcnn_ext's kernels: the same constructor arguments (see torchvision's
    documentation), the same submodules and state_dict keys.

    Defaults differ only in type: the anchor generator is our AnchorGenerator (FPN sizes 32 to 512, ratios 0.5, 1, 2)
    and the box pooler our MultiScaleRoIAlign. A ``box_roi_pool`` that is not a MultiScaleRoIAlign (RoIPoolLevel for
    the VGG16 model) is accepted too.

    forward(images, targets=None): in training, the dict of losses (loss_classifier, loss_box_reg, loss_objectness,
    loss_rpn_box_reg); in eval, one dict per image with boxes [K_i, 4], labels [K_i] and scores [K_i].

    Inference (eval mode under torch.no_grad or torch.inference_mode) runs the backbone and the RPN head from private
    copies (models/detection/_inference.py: batch norms folded, channels_last, and in float32 on CPU Winograd 3x3
    convolutions; rebuilt when the weights change; about 1.3 times the backbone's size in extra memory); their
    outputs equal the plain modules' up to float rounding (~1e-5 relative with Winograd). On CPU the forward reuses
    its large activation blocks (``reuse_cpu_memory``, fasterrcnn_ext.memory); on CUDA it is ``detect_padded`` split
    per image, whose only host read is the per-image counts (``static_cuda_forward``). Set ``fast_inference = False``
    to run the modules as they are. ``inference_dtype = torch.bfloat16`` opts into bfloat16 autocast for the learned
    layers (for CPUs with AMX or AVX512-BF16: elsewhere bfloat16 is emulated, slower than float32, and the forward
    warns); boxes, anchors and post-processing stay in float32.
    """

    # Eager-only settings: TorchScript compiles neither the options object nor the properties over it.
    __jit_ignored_attributes__ = ["inference_options", "_normalize_constants"]  # detect_padded's cache
    __jit_unused_properties__ = ["inference_dtype", "fast_inference", "reuse_cpu_memory", "static_cuda_forward"]
    inference_options: InferenceOptions = InferenceOptions()

    @property
    def inference_dtype(self) -> torch.dtype | None:
        """The learned layers' autocast dtype in inference (torch.bfloat16: opt-in), None for float32."""
        return PRECISIONS[self.inference_options.precision].autocast_dtype

    @inference_dtype.setter
    def inference_dtype(self, dtype: torch.dtype | None) -> None:
        self.inference_options = dataclasses.replace(self.inference_options, precision=precision_of_dtype(dtype))

    fast_inference = _option_view(
        "fast", "False: inference runs the modules as trained (no folding, no channels_last), bit for bit as "
        "torchvision.")
    reuse_cpu_memory = _option_view(
        "reuse_cpu_memory", "True: CPU inference reuses its large activation blocks from one call to the next "
        "(fasterrcnn_ext.memory).")
    static_cuda_forward = _option_view(
        "static_cuda_forward", "True: CUDA inference is detect_padded split per image (one host read per call); "
        "False: the dynamic path.")

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, **kwargs):
        if kwargs.get("rpn_anchor_generator") is None:
            kwargs["rpn_anchor_generator"] = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)),
                                                             ((0.5, 1.0, 2.0),) * 5)
        pool = kwargs.get("box_roi_pool")
        custom_pool = pool is not None and not isinstance(pool, _torchvision.MultiScaleRoIAlign)
        if pool is None or custom_pool:
            kwargs["box_roi_pool"] = ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
        super().__init__(backbone, num_classes, **kwargs)
        self._backbone_for_inference = InferenceCopy()
        self._rpn_head_for_inference = InferenceCopy()
        self.rpn = RegionProposalNetwork.adopt(self.rpn)
        self.roi_heads = RoIHeads.adopt(self.roi_heads)
        if custom_pool:
            self.roi_heads.box_roi_pool = pool

    @classmethod
    def adopt(cls, model: tv_faster_rcnn.FasterRCNN) -> FasterRCNN:
        """Our FasterRCNN with a copy of a torchvision FasterRCNN's modules and weights (``copy.deepcopy``): the given
        model is left exactly as it was, and training one does not change the other."""
        return cls._over(copy.deepcopy(model))

    @classmethod
    def _over(cls, model: tv_faster_rcnn.FasterRCNN) -> FasterRCNN:
        """Our FasterRCNN over ``model``'s modules and weights, shared, not copied (for the builders, whose torchvision
        model nobody else holds); ``model`` itself keeps its types and modules."""
        ours = rebind(cls, model)
        ours._backbone_for_inference = InferenceCopy()
        ours._rpn_head_for_inference = InferenceCopy()
        ours.rpn = RegionProposalNetwork.adopt(model.rpn)
        gen = model.rpn.anchor_generator
        if not isinstance(gen, AnchorGenerator):
            ours.rpn.anchor_generator = AnchorGenerator(gen.sizes, gen.aspect_ratios)
        ours.roi_heads = RoIHeads.adopt(model.roi_heads)
        pool = model.roi_heads.box_roi_pool
        if isinstance(pool, _torchvision.MultiScaleRoIAlign) and not isinstance(pool, ops.MultiScaleRoIAlign):
            ours.roi_heads.box_roi_pool = ops.MultiScaleRoIAlign(
                pool.featmap_names, pool.output_size, pool.sampling_ratio, canonical_scale=pool.canonical_scale,
                canonical_level=pool.canonical_level)
        return ours

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if not torch.jit.is_scripting():
            return self._eager_forward(images, targets)
        return self._scripted_forward(images, targets)

    @torch.jit.unused
    def _eager_forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None):
        images = _images_as_list(images, self)
        _check_inputs(images, targets, self.training, self.transform)
        state = ForwardState(
            training=self.training, grad_enabled=torch.is_grad_enabled(), compiling=torch.compiler.is_compiling(),
            tracing=tracing_by_value(), cuda_images=bool(images) and all(i.device.type == "cuda" for i in images))
        route = choose_route(state, self.inference_options)
        if route is Route.COMPILED_EVAL:
            return self._compiled_eval_forward(images)
        if route is Route.TORCHVISION:
            return super().forward(images, targets)
        if route is Route.PADDED_CUDA:
            # One host read, the counts that split the outputs, where the dynamic path reads every selection's size
            # and copies the normalisation constants from the host at every call.
            return padded_detections_to_list(*self.detect_padded(images))
        pool_cpu = (self.reuse_cpu_memory and all(image.device.type == "cpu" for image in images)
                    and cpu_capabilities().memory_pool)
        with memory.cpu_pool() if pool_cpu else contextlib.nullcontext():
            return self._inference_forward(images)

    def _learned_layers(self) -> tuple[nn.Module, nn.Module]:
        """The backbone and RPN head every eval path runs: the inference copies (models/detection/_inference.py) for
        the precisions that use them, else the modules themselves (``fast_inference = False``; an int8 model, whose
        modules quantize() already folded and converted)."""
        precision = PRECISIONS[self.inference_options.precision]
        if not (self.inference_options.fast and precision.inference_copy):
            return self.backbone, self.rpn.head
        return (self._backbone_for_inference.get(self.backbone, precision.autocast_dtype),
                self._rpn_head_for_inference.get(self.rpn.head, precision.autocast_dtype))

    @torch.jit.unused
    def _compiled_eval_forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """The eval forward under torch.compile and torch.export: torchvision's steps, with what a graph with
        data-dependent sizes needs.

        - torch.export with a dynamic image size: the transform's sizes stay symbolic (models/detection/transform.py),
          so one exported program takes any image size (a fixed size exports torchvision's transform as it is);
          MultiScaleRoIAlign's scales, unless an eager call already set them, come from the
          padded batch size (torchvision's rule on the resized size gives the same scales for resized sides of 75
          pixels and more).
        - the box head runs on the RoIs plus one zero row, dropped after: a box head with batch norms
          (resnet50_fpn_v2) otherwise branches on whether the data-dependent number of RoIs is zero.
        """
        original_image_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        symbolic = (torch.compiler.is_exporting() and transform.resizes_symbolically(self.transform)
                    and any(isinstance(size, torch.SymInt) for image in images for size in image.shape[-2:]))
        if symbolic:
            image_list = transform.transform_images(self.transform, images)
        else:
            image_list, _ = self.transform(images)
        features = _feature_dict(self.backbone(image_list.tensors))
        proposals, _ = self.rpn(image_list, features)
        heads = self.roi_heads
        if torch.compiler.is_exporting():
            _settle_pool_scales(heads.box_roi_pool, features, image_list.tensors.shape[-2:])
        box_features = heads.box_roi_pool(features, proposals, image_list.image_sizes)
        padded = torch.cat([box_features, box_features.new_zeros((1,) + box_features.shape[1:])])
        box_features = heads.box_head(padded)[:-1]
        class_logits, box_regression = heads.box_predictor(box_features)
        boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals,
                                                             image_list.image_sizes)
        detections = [{"boxes": b, "labels": lab, "scores": sc} for b, sc, lab in zip(boxes, scores, labels)]
        if not symbolic:
            return self.transform.postprocess(detections, image_list.image_sizes, original_image_sizes)
        for detection, size, original_size in zip(detections, image_list.image_sizes, original_image_sizes):
            detection["boxes"] = transform.rescale_boxes(detection["boxes"], size, original_size)
        return detections

    @torch.jit.unused
    def detect_padded(self, images: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The eval forward's detections with every size fixed in advance by the number and sizes of the images.

        Args:
            images (list of Tensor[3, H_i, W_i], or Tensor[N, 3, H, W]): as for forward.

        Returns:
            (boxes, scores, labels, counts): Tensor[N, D, 4] (original image coordinates), Tensor[N, D], Tensor[N, D]
            (int64) and Tensor[N] (int64), D = roi_heads.detections_per_img. Image i's detections are its first
            counts[i] rows, the values forward gives it; the other rows are zeros.
            ``padded_detections_to_list`` turns them into forward's list of dicts (one read of counts).

        After a first call on a device (which moves the normalisation constants and anchors there and builds the
        inference copies), a call neither waits for the device nor copies from the host, and what it allocates
        depends on the image sizes only, so a CUDA graph can capture it (CUDAGraphDetector). The RPN keeps
        post_nms_top_n proposals per image whatever the image holds and the box head runs on all of them (padding
        rows included): more head work than forward for images with fewer proposals. Eval mode only.
        """
        if self.training:
            raise ValueError("detect_padded runs in eval mode: call model.eval() first")
        images = _images_as_list(images, self)
        _check_inputs(images, None, False, self.transform)
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        constants = self.__dict__.setdefault("_normalize_constants", {})
        with torch.no_grad():
            image_list = transform.transform_images_static(self.transform, images, constants)
            device_type = image_list.tensors.device.type
            backbone, rpn_head = self._learned_layers()
            batch = image_list.tensors
            if self.fast_inference:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with self._inference_autocast(device_type):
                features = _feature_dict(backbone(batch))
                proposals, proposal_counts = self.rpn.padded_proposals(rpn_head, image_list, features)
                boxes, scores, labels, counts = self.roi_heads.padded_detections(
                    features, proposals, proposal_counts, image_list.image_sizes)
            boxes = transform.rescale_padded_boxes(boxes, image_list.image_sizes, original_sizes)
        return boxes, scores, labels, counts

    def _scripted_forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
                          ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """torchvision's GeneralizedRCNN.forward as TorchScript compiles it (TorchScript cannot call the base class's
        method): it returns the (losses, detections) tuple that torchvision's scripted detector returns."""
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode: one dict with 'boxes' and 'labels' per "
                                 "image")
        original_image_sizes: list[tuple[int, int]] = []
        for img in images:
            original_image_sizes.append((img.shape[-2], img.shape[-1]))
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_image_sizes)
        losses: dict[str, Tensor] = {}
        losses.update(detector_losses)
        losses.update(proposal_losses)
        if not self._has_warned:
            warnings.warn("RCNN always returns a (Losses, Detections) tuple in scripting", stacklevel=2)
            self._has_warned = True
        return losses, detections

    def _inference_autocast(self, device_type: str):
        """The learned layers' autocast in inference: to the precision's dtype, or off, so that an outer autocast does
        not reach them either; nothing on a device without autocast (meta tensors)."""
        if not torch.amp.is_autocast_available(device_type):
            return contextlib.nullcontext()
        dtype = PRECISIONS[self.inference_options.precision].autocast_dtype
        return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def _inference_forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        original_image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, _ = self.transform(images)
        backbone, rpn_head = self._learned_layers()
        device_type = image_list.tensors.device.type
        if self.inference_dtype == torch.bfloat16 and device_type == "cpu" and not cpu_has_native_bfloat16():
            warnings.warn("inference_dtype = torch.bfloat16 on a CPU without AVX512-BF16 or AMX: bfloat16 is "
                          "emulated there and the detector runs slower than in float32 (inference_dtype = None)",
                          RuntimeWarning, stacklevel=3)
        with self._inference_autocast(device_type):
            features = _feature_dict(backbone(image_list.tensors.contiguous(memory_format=torch.channels_last)))
            proposals, _ = self.rpn.forward_with_head(rpn_head, image_list, features)
            detections, _ = self.roi_heads(features, proposals, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_image_sizes)


def _feature_dict(features: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """A backbone's output as the dict the RPN and the RoI heads take: a single map is level "0" (torchvision)."""
    return OrderedDict([("0", features)]) if isinstance(features, Tensor) else features


def padded_detections_to_list(boxes: Tensor, scores: Tensor, labels: Tensor, counts: Tensor
                              ) -> list[dict[str, Tensor]]:
    """FasterRCNN.detect_padded's outputs as forward returns them: one dict per image with its first counts[i] boxes,
    labels and scores. Reads counts on the host, once."""
    return [{"boxes": b[:c], "labels": lab[:c], "scores": s[:c]}
            for b, s, lab, c in zip(boxes, scores, labels, counts.tolist())]


def _settle_pool_scales(pool: nn.Module, features: dict[str, Tensor], padded_size) -> None:
    """Sets an unset MultiScaleRoIAlign's scales from the padded batch size, a multiple of every feature stride
    under torch.export (where the resized image size is only known at run time)."""
    if not isinstance(pool, _torchvision.MultiScaleRoIAlign) or pool.scales is not None:
        return
    scales = []
    for name in pool.featmap_names:
        if name in features:
            try:
                stride = int(padded_size[0] // features[name].shape[-2])
            except GuardOnDataDependentSymNode as e:
                raise ValueError(
                    f"torch.export: the stride of feature map {name!r} is not a constant of the padded image size "
                    f"({padded_size[0]} // {features[name].shape[-2]}): run the model once eagerly before export, "
                    "which sets MultiScaleRoIAlign's scales") from e
            scales.append(power_of_2_scale(1.0 / stride))
    pool.scales = scales


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where the bfloat16 inference mode pays
    (fasterrcnn_ext.capabilities decides)."""
    return cpu_capabilities().native_bfloat16


# ---------------------------------------------------------------------------------------------------------------
# Builders: torchvision's builders (same arguments and weights), then our kernels over the same modules.


def load_state_strict(model: nn.Module, state: dict, path, builder: str) -> None:
    """Strict load_state_dict, with an error that says what the checkpoint holds and how it differs from the model,
    in one sentence instead of the key lists."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        reshaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        parts = [f"{len(keys)} {what} (first {keys[0]!r})" for keys, what in (
            (missing, "of the model's tensors missing"), (unexpected, "tensors the model does not have"),
            (reshaped, "of another shape")) if keys]
        raise ValueError(f"checkpoint {path!s} holds {describe_checkpoint(read_checkpoint_file(path))}, which does "
                         f"not fit {builder}: {'; '.join(parts) or str(e).splitlines()[0]}") from e


def _build(tv_builder, weights, num_classes, kwargs) -> FasterRCNN:
    local = weights if is_checkpoint_path(weights) else None
    state = None
    if local is not None:
        state = load_checkpoint_state_dict(local)
        predictor = state.get("roi_heads.box_predictor.cls_score.weight")
        if predictor is not None:
            if num_classes is not None and num_classes != predictor.shape[0]:
                raise ValueError(f"checkpoint {local!s} has {predictor.shape[0]} classes, "
                                 f"not num_classes={num_classes}")
            num_classes = predictor.shape[0]
        weights = None
        kwargs.setdefault("weights_backbone", None)  # the checkpoint holds the backbone too: nothing to download
    what = f"{tv_builder.__name__}(weights={weights!s}, weights_backbone={kwargs.get('weights_backbone')!s})"
    with named_weights_downloads(what):
        model = FasterRCNN._over(tv_builder(weights=weights, num_classes=num_classes, **kwargs))
    if state is not None:
        load_state_strict(model, state, local, tv_builder.__name__)
    return model


def fasterrcnn_resnet50_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                            **kwargs) -> FasterRCNN:
    """torchvision.models.detection.fasterrcnn_resnet50_fpn on our kernels. ``weights``: torchvision's weights enum or
    its name (downloaded by torchvision), or a local checkpoint path. Other arguments as torchvision's."""
    return _build(_torchvision.fasterrcnn_resnet50_fpn, weights, num_classes, dict(progress=progress, **kwargs))


def fasterrcnn_resnet50_fpn_v2(*, weights=None, progress: bool = True, num_classes: int | None = None,
                               **kwargs) -> FasterRCNN:
    """torchvision.models.detection.fasterrcnn_resnet50_fpn_v2 on our kernels (see fasterrcnn_resnet50_fpn)."""
    return _build(_torchvision.fasterrcnn_resnet50_fpn_v2, weights, num_classes, dict(progress=progress, **kwargs))


def fasterrcnn_mobilenet_v3_large_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                                      **kwargs) -> FasterRCNN:
    """torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn on our kernels."""
    return _build(_torchvision.fasterrcnn_mobilenet_v3_large_fpn, weights, num_classes,
                  dict(progress=progress, **kwargs))


def fasterrcnn_mobilenet_v3_large_320_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                                          **kwargs) -> FasterRCNN:
    """torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn on our kernels."""
    return _build(_torchvision.fasterrcnn_mobilenet_v3_large_320_fpn, weights, num_classes,
                  dict(progress=progress, **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# The classic VGG16 Faster R-CNN (Ren et al., 2015; docs/design.md).

VGG16_STRIDE = 16  # conv5_3 after four 2x2 max-pools


class RoIPoolLevel(nn.Module):
    """RoIPool of one feature map, with the pooler interface RoIHeads calls: forward(features, proposals, image_shapes).

    Args:
        output_size (int or (int, int)): pooled size (7 for VGG16's fc6).
        spatial_scale (float): feature size / image size (1/16 for VGG16 conv5_3).
        featmap_name (str): the key of the feature map in the backbone's output ("0" for a single tensor).
    """

    def __init__(self, output_size: BroadcastingList2[int] = 7, spatial_scale: float = 1.0 / VGG16_STRIDE,
                 featmap_name: str = "0"):
        super().__init__()
        self.output_size = list(pair(output_size))
        self.spatial_scale = spatial_scale
        self.featmap_name = featmap_name

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        return ops.roi_pool(features[self.featmap_name], proposals, self.output_size, self.spatial_scale)


class VGG16BoxHead(nn.Module):
    """fc6 and fc7 of VGG16 (4096 units each, ReLU and dropout as in the classifier) on 512x7x7 pooled features."""

    def __init__(self, in_features: int = 512 * 7 * 7, hidden: int = 4096, dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(torch.relu(self.fc6(x.flatten(start_dim=1))))
        return self.dropout(torch.relu(self.fc7(x)))


def fasterrcnn_vgg16(*, weights=None, num_classes: int = 21, weights_backbone=None, progress: bool = True,
                     trainable_layers: int = 10, **kwargs) -> FasterRCNN:
    """The classic Faster R-CNN of the paper (docs/design.md): VGG16 conv layers up to conv5_3 (stride 16, 512
    channels), an RPN with a 3x3 conv and 9 anchors per location (sizes 128, 256, 512 x ratios 0.5, 1, 2), RoIPool
    7x7, fc6 and fc7 with 4096 units, images resized to a 600-pixel short side (1000 at most).

    Args:
        weights: a local checkpoint path of this model, or None.
        num_classes (int): including the background (21: PASCAL VOC).
        weights_backbone: torchvision's VGG16 weights (enum or name) for conv1_1 to conv5_3, fc6 and fc7, or None.
        trainable_layers (int): conv layers trained, counted from conv5_3 (10 of 13: conv1 and conv2 frozen, as
            the classic setup).
        **kwargs: FasterRCNN arguments (min_size, rpn_* and box_* thresholds, ...).
    """
    with named_weights_downloads(f"fasterrcnn_vgg16(weights_backbone={weights_backbone!s})"):
        vgg = torchvision.models.vgg16(weights=weights_backbone, progress=progress)
    backbone = vgg.features[:-1]  # conv1_1 .. relu5_3, without pool5
    backbone.out_channels = 512
    convs = [m for m in backbone if isinstance(m, nn.Conv2d)]
    if not 0 <= trainable_layers <= len(convs):
        raise ValueError(f"trainable_layers must be in [0, {len(convs)}], got {trainable_layers}")
    for conv in convs[: len(convs) - trainable_layers]:
        conv.requires_grad_(False)
    box_head = VGG16BoxHead()
    if weights_backbone is not None:  # fc6 and fc7 start from VGG16's classifier
        box_head.fc6.load_state_dict(vgg.classifier[0].state_dict())
        box_head.fc7.load_state_dict(vgg.classifier[3].state_dict())
    defaults = dict(min_size=600, max_size=1000, rpn_pre_nms_top_n_train=12000, rpn_pre_nms_top_n_test=6000,
                    rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=300, box_batch_size_per_image=128)
    defaults.update(kwargs)
    anchor_generator = AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
    model = FasterRCNN(backbone, num_classes=None, rpn_anchor_generator=anchor_generator,
                       rpn_head=RPNHead(512, anchor_generator.num_anchors_per_location()[0]),
                       box_roi_pool=RoIPoolLevel(7, 1.0 / VGG16_STRIDE), box_head=box_head,
                       box_predictor=FastRCNNPredictor(4096, num_classes), **defaults)
    if weights is not None:
        load_state_strict(model, load_checkpoint_state_dict(weights), weights, "fasterrcnn_vgg16")
    return model
