"""int8 inference for the detector: static post-training quantization on oneDNN's int8 kernels.

    from fasterrcnn_ext.quantization import quantize
    int8_model = quantize(model, calibration_images)   # a new eval model; ``model`` is left as it was
    detections = int8_model(images)                    # the same forward API and outputs

What runs in int8 (weights per output channel, symmetric; activations per tensor, asymmetric, calibrated on the
images given): every convolution of the backbone, the FPN and the RPN head, and the box head's convolutions and
linear layers, each as one oneDNN call with its ReLU or Hardswish (and, in ResNet bottlenecks, the residual add)
fused. Between the layers of a ResNet bottleneck, from one bottleneck to the next, from a stem to its max pool and
from a Sequential's convolution to the next one, activations stay uint8: the producer writes them directly in the
consumer's scale, so nothing is converted in between.

What stays float32: the anchors, proposal selection, RoI pooling, post-processing, the box predictor (two small
linear layers whose outputs are the scores and box deltas: int8 there costs accuracy and saves little time), and
the squeeze-excitation layers of MobileNetV3 (1x1 maps: nothing to gain).

Batch norms are folded into the convolutions before calibration (models/detection/_inference.py). Where the CPU
has no int8 dot-product instructions (VNNI or AMX), activations use 7 bits, as torch's x86 quantizer does: the
AVX2 int8 kernels add pairs of products in 16 bits, which saturate with 8-bit activations.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import SqueezeExcitation

from .capabilities import cpu_capabilities
from .models.detection import faster_rcnn as frcnn
from .models.detection._inference import fold_batch_norms

__all__ = ["QuantizedConv2d", "QuantizedLinear", "int8_available", "quantize"]

# Packed weights kept per convolution: one per input shape (image size) in use.
_PACKED_SHAPES = 4
# Per-channel symmetric int8 weights use [-127, 127]: -128 has no positive twin, and oneDNN's s8 weights assume
# symmetric ranges.
_WEIGHT_MAX = 127
_ACTIVATIONS = {nn.ReLU: "relu", nn.Hardswish: "hardswish"}


def int8_available() -> tuple[bool, str]:
    """Whether int8 inference runs fast on this machine, and why not: (True, "") with oneDNN's int8 kernels and int8
    dot products in hardware (AVX512-VNNI, AVX-VNNI or AMX); otherwise (False, the reason). Where oneDNN's int8
    kernels exist but the instructions do not, ``quantize`` still works (7-bit activations) and warns."""
    if not _onednn_int8_ops():
        return False, "this torch build has no oneDNN int8 kernels (torch.ops.onednn.qconv2d_pointwise)"
    if not cpu_capabilities().native_int8:
        return False, "this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX)"
    return True, ""


def _onednn_int8_ops() -> bool:
    onednn = getattr(torch.ops, "onednn", None)
    return (torch.backends.mkldnn.is_available() and onednn is not None
            and all(hasattr(onednn, name) for name in ("qconv2d_pointwise", "qconv_prepack", "qlinear_pointwise",
                                                        "qlinear_prepack")))


@dataclasses.dataclass(frozen=True)
class QParams:
    """An activation's per-tensor affine quantization: real = (q - zero_point) * scale, q in [0, quant_max]."""

    scale: float
    zero_point: int

    @staticmethod
    def from_range(low: float, high: float, quant_max: int) -> QParams:
        low, high = min(low, 0.0), max(high, 0.0)  # zero must be exact: padding and ReLU produce it
        if not high > low:  # an all-zero activation: any scale represents it
            return QParams(1.0, 0)
        scale = (high - low) / quant_max
        return QParams(scale, int(min(max(round(-low / scale), 0), quant_max)))


def _as_uint8(x: Tensor, qparams: QParams) -> Tensor:
    """x in uint8 at qparams; uint8 input is taken as already there (its producer wrote it in this scale)."""
    if x.dtype == torch.uint8:
        return x
    with warnings.catch_warnings():  # quantize_per_tensor is the fastest quantize torch has, deprecated or not
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(x.float(), qparams.scale, qparams.zero_point, torch.quint8).int_repr()


def _weight_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per output channel symmetric int8 weights and their float32 scales."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp(min=1e-12) / _WEIGHT_MAX
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.round(w / scale.reshape(shape)).clamp(-_WEIGHT_MAX, _WEIGHT_MAX).to(torch.int8), scale


class _PackedWeight(nn.Module):
    """int8 weight buffers plus oneDNN's packed form of them, built on first use and after any change of the
    buffers (the packed tensor is opaque: no state_dict, no deepcopy, so it is never saved or copied)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear):
        super().__init__()
        weight, scale = _weight_int8(layer.weight)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros(weight.shape[0], dtype=torch.int32))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())

    def _packed_weight(self, x_shape: list[int] | None = None) -> Tensor:
        """oneDNN's packed weight for inputs of ``x_shape``: packed without the shape, oneDNN picks a layout that
        some shapes then reorder on every call (a 1x1 convolution of 2048 channels at 25x34: 27 ms instead of
        2 ms). One packing per input shape, the last _PACKED_SHAPES kept."""
        version = (self.weight_int8.data_ptr(), self.weight_int8._version, self.weight_scale._version)
        cache = self.__dict__.get("_packed")
        if cache is None or cache[0] != version:
            cache = (version, {})
            self.__dict__["_packed"] = cache
        key = None if x_shape is None else tuple(x_shape)
        packed = cache[1].pop(key, None)
        if packed is None:
            packed = self._pack(x_shape)
            while len(cache[1]) >= _PACKED_SHAPES:
                cache[1].pop(next(iter(cache[1])))
        cache[1][key] = packed  # most recently used last
        return packed

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state


class QuantizedConv2d(_PackedWeight):
    """A float convolution (batch norm folded), then optionally ReLU or Hardswish, as one oneDNN int8 call.

    forward(x, accumulate=None): x float (quantized here at ``input_qparams``) or uint8 (already at them);
    ``accumulate``: a uint8 residual at ``accumulate_qparams`` added before the ReLU, overwritten by the call (the
    residual add of a ResNet bottleneck). Output: uint8 at ``output_qparams`` when set (the consumer's input scale),
    else float32.
    """

    def __init__(self, conv: nn.Conv2d, *, input_qparams: QParams, activation: str = "none",
                 output_qparams: QParams | None = None):
        super().__init__(conv)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.input_qparams, self.output_qparams = input_qparams, output_qparams
        self.activation = activation
        self.accumulate_qparams: QParams | None = None

    def _pack(self, x_shape: list[int] | None) -> Tensor:
        return torch.ops.onednn.qconv_prepack(self.weight_int8, self.weight_scale, self.input_qparams.scale,
                                              self.input_qparams.zero_point, self.stride, self.padding,
                                              self.dilation, self.groups, x_shape)

    def forward(self, x: Tensor, accumulate: Tensor | None = None) -> Tensor:
        x = _as_uint8(x, self.input_qparams).contiguous(memory_format=torch.channels_last)
        out = self.output_qparams or QParams(1.0, 0)
        out_dtype = torch.uint8 if self.output_qparams is not None else torch.float32
        common = (x, self.input_qparams.scale, self.input_qparams.zero_point, self._packed_weight(list(x.shape)),
                  self.weight_scale, self.weight_zero_point)
        if accumulate is None:
            return torch.ops.onednn.qconv2d_pointwise(
                *common, self.bias, self.stride, self.padding, self.dilation, self.groups, out.scale,
                out.zero_point, out_dtype, self.activation, [], "")
        acc = self.accumulate_qparams
        if out_dtype == torch.float32 and accumulate.dtype == torch.uint8:
            # oneDNN adds a float residual only to a float output: the residual is dequantized first.
            accumulate = (accumulate.float() - acc.zero_point) * acc.scale
            acc = QParams(1.0, 0)
        accumulate = accumulate.contiguous(memory_format=torch.channels_last)  # oneDNN adds in the output's layout
        return torch.ops.onednn.qconv2d_pointwise.binary(
            *common, accumulate, self.bias, self.stride, self.padding, self.dilation, self.groups, out.scale,
            out.zero_point, out_dtype, acc.scale, acc.zero_point, "sum", 1.0,
            None if self.activation == "none" else self.activation, [], "")

    def extra_repr(self) -> str:
        return (f"{self.weight_int8.shape[1] * self.groups}, {self.weight_int8.shape[0]}, "
                f"kernel_size={tuple(self.weight_int8.shape[2:])}, stride={tuple(self.stride)}, "
                f"activation={self.activation}, output={'uint8' if self.output_qparams else 'float32'}")


class QuantizedLinear(_PackedWeight):
    """A float linear layer, then optionally ReLU, as one oneDNN int8 call; input float (quantized at
    ``input_qparams``) or uint8, any leading dimensions; output uint8 at ``output_qparams`` or float32."""

    def __init__(self, linear: nn.Linear, *, input_qparams: QParams, activation: str = "none",
                 output_qparams: QParams | None = None):
        super().__init__(linear)
        self.input_qparams, self.output_qparams = input_qparams, output_qparams
        self.activation = activation

    def _pack(self, x_shape: list[int] | None) -> Tensor:
        return torch.ops.onednn.qlinear_prepack(self.weight_int8, x_shape)

    def forward(self, x: Tensor) -> Tensor:
        leading = x.shape[:-1]
        x = _as_uint8(x, self.input_qparams).reshape(-1, x.shape[-1])
        out = self.output_qparams or QParams(1.0, 0)
        y = torch.ops.onednn.qlinear_pointwise(
            x, self.input_qparams.scale, self.input_qparams.zero_point, self._packed_weight(), self.weight_scale,
            self.weight_zero_point, self.bias, out.scale, out.zero_point,
            torch.uint8 if self.output_qparams is not None else torch.float32, self.activation, [], "")
        return y.reshape(*leading, y.shape[-1])


class QuantizedMaxPool2d(nn.Module):
    """nn.MaxPool2d for uint8 input (max commutes with the monotonic quantization, whatever its scale) as well as
    float input."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            return self.pool(x)
        # torch's max pool has no channels_last uint8 kernel; its quantized one is the same loop on quint8.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self.pool(torch._make_per_tensor_quantized_tensor(x, 1.0, 0)).int_repr()


class QuantizedBottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (batch norms folded) in int8: conv1 + ReLU and conv2 + ReLU write uint8 in
    the next convolution's scale, conv3 adds the residual (uint8) and applies ReLU in the same call. Input float or
    uint8 (at conv1's input scale); output uint8 at ``conv3.output_qparams`` or float32."""

    def __init__(self, conv1: QuantizedConv2d, conv2: QuantizedConv2d, conv3: QuantizedConv2d,
                 downsample: QuantizedConv2d | None, *, input_reused: bool):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.downsample = conv1, conv2, conv3, downsample
        # conv3 overwrites its residual: without a downsample that is the block's input, which a caller may still
        # hold (an IntermediateLayerGetter returns it) unless the block is known to be its only reader.
        self.input_reused = input_reused

    def forward(self, x: Tensor) -> Tensor:
        x = _as_uint8(x, self.conv1.input_qparams)
        if self.downsample is not None:
            identity = self.downsample(x)
        else:
            identity = x.clone() if self.input_reused else x
        return self.conv3(self.conv2(self.conv1(x)), accumulate=identity)


class QuantizedTwoMLPHead(nn.Module):
    """torchvision's TwoMLPHead (and the VGG16 box head's fc6/fc7, dropout being an identity in eval) in int8:
    fc6 + ReLU writes uint8 in fc7's scale."""

    def __init__(self, fc6: QuantizedLinear, fc7: QuantizedLinear):
        super().__init__()
        self.fc6, self.fc7 = fc6, fc7

    def forward(self, x: Tensor) -> Tensor:
        return self.fc7(self.fc6(x.flatten(start_dim=1)))


# ---------------------------------------------------------------------------------------------------------------
# Calibration: the range of every quantized layer's input (and of a few outputs), over the calibration images.


class _Ranges:
    """min and max of each observed tensor, by name, over all calls."""

    def __init__(self):
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}

    def observe(self, name: str, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        low, high = torch.aminmax(x.detach())
        self.low[name] = min(self.low.get(name, float("inf")), float(low))
        self.high[name] = max(self.high.get(name, float("-inf")), float(high))

    def qparams(self, name: str, quant_max: int) -> QParams:
        if name not in self.low:
            raise ValueError(f"quantize: layer {name} never ran on the calibration images (a branch they do not "
                             "reach cannot be calibrated)")
        return QParams.from_range(self.low[name], self.high[name], quant_max)


def _quantizable(module: nn.Module) -> bool:
    return type(module) in (nn.Conv2d, nn.Linear)


def _observe(root: nn.Module, prefix: str, ranges: _Ranges) -> list:
    """Hooks that record each quantizable layer's input ("<name>:in") and output ("<name>:out"), and each
    Bottleneck's and max pool's output."""
    handles = []
    for name, module in root.named_modules(prefix=prefix):
        if _quantizable(module) or isinstance(module, (Bottleneck, nn.MaxPool2d)):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: ranges.observe(f"{name}:in", args[0])))
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: ranges.observe(f"{name}:out", out)))
    return handles


# ---------------------------------------------------------------------------------------------------------------
# Conversion.


def _next_sibling(parent: nn.Module, names: list[str], i: int, skip: tuple) -> tuple[str | None, nn.Module | None]:
    j = i + 1
    while j < len(names) and isinstance(parent._modules[names[j]], skip):
        j += 1
    return (names[j], parent._modules[names[j]]) if j < len(names) else (None, None)


class _Converter:
    def __init__(self, ranges: _Ranges, quant_max: int):
        self.ranges, self.quant_max = ranges, quant_max

    def qparams(self, name: str) -> QParams:
        return self.ranges.qparams(name, self.quant_max)

    def conv(self, conv: nn.Conv2d, name: str, activation: str = "none") -> QuantizedConv2d:
        return QuantizedConv2d(conv, input_qparams=self.qparams(f"{name}:in"), activation=activation)

    def linear(self, linear: nn.Linear, name: str, activation: str = "none") -> QuantizedLinear:
        return QuantizedLinear(linear, input_qparams=self.qparams(f"{name}:in"), activation=activation)

    def bottleneck(self, block: Bottleneck, name: str, *, input_reused: bool,
                   input_qparams: QParams | None = None) -> QuantizedBottleneck:
        """``input_qparams``: the scale the block's input arrives in (its producer's output), else the observed
        range of that input."""
        conv1 = self.conv(block.conv1, f"{name}.conv1", "relu")
        conv2 = self.conv(block.conv2, f"{name}.conv2", "relu")
        conv3 = self.conv(block.conv3, f"{name}.conv3", "relu")
        if input_qparams is not None:
            conv1.input_qparams = input_qparams
        conv1.output_qparams = conv2.input_qparams
        conv2.output_qparams = conv3.input_qparams
        downsample = None
        if block.downsample is not None:
            downsample = self.conv(block.downsample[0], f"{name}.downsample.0")
            downsample.input_qparams = conv1.input_qparams  # both read the block's input
            downsample.output_qparams = self.qparams(f"{name}.downsample.0:out")
        conv3.accumulate_qparams = downsample.output_qparams if downsample is not None else conv1.input_qparams
        return QuantizedBottleneck(conv1, conv2, conv3, downsample, input_reused=input_reused)

    def resnet_body(self, body: nn.Module, name: str) -> None:
        """A ResNet trunk (torchvision's IntermediateLayerGetter or ResNet: conv1, bn1, relu, maxpool, layer1..4) in
        place: everything from the stem to the last bottleneck passes uint8; each returned layer's output is
        uint8 in the scale of its last bottleneck's output, which its readers (the FPN's inner convolutions) must
        take as their input scale."""
        stem = self.conv(body.conv1, f"{name}.conv1", "relu")
        stem.output_qparams = self.qparams(f"{name}.maxpool:out")
        body.conv1, body.relu, body.maxpool = stem, nn.Identity(), QuantizedMaxPool2d(body.maxpool)
        previous_out = stem.output_qparams
        for layer_name in _RESNET_LAYERS:
            layer = getattr(body, layer_name, None)
            if layer is None:
                continue
            for i, block_name in enumerate(list(layer._modules)):
                full = f"{name}.{layer_name}.{block_name}"
                block = self.bottleneck(layer._modules[block_name], full, input_reused=i == 0,
                                        input_qparams=previous_out)  # the previous block wrote it in this scale
                block.conv3.output_qparams = self.qparams(f"{full}:out")
                previous_out = block.conv3.output_qparams
                layer._modules[block_name] = block

    def generic(self, root: nn.Module, prefix: str) -> None:
        """Every remaining convolution and linear layer under ``root``, fusing an activation that directly follows
        it in a Sequential (past folded batch norms); in a Sequential, a layer whose next quantized layer follows
        it (past activations, identities and max pools) writes uint8 in that layer's scale."""
        for parent_name, parent in list(root.named_modules(prefix=prefix)):
            if isinstance(parent, (SqueezeExcitation, QuantizedConv2d, QuantizedLinear, QuantizedBottleneck)):
                continue
            names = list(parent._modules)
            for i, child_name in enumerate(names):
                child = parent._modules[child_name]
                if not _quantizable(child):
                    continue
                activation = "none"
                if isinstance(parent, nn.Sequential):
                    next_name, follower = _next_sibling(parent, names, i, (nn.Identity,))
                    if type(follower) in _ACTIVATIONS:
                        activation = _ACTIVATIONS[type(follower)]
                        parent._modules[next_name] = nn.Identity()
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                make = self.conv if isinstance(child, nn.Conv2d) else self.linear
                parent._modules[child_name] = make(child, full, activation)
        # Chained after every layer is converted: a Sequential's neighbours may be Sequentials converted after it.
        for _, parent in list(root.named_modules()):
            if isinstance(parent, nn.Sequential):
                self._chain(parent, list(parent._modules))

    @staticmethod
    def _chain(parent: nn.Sequential, names: list[str]) -> None:
        for child_name in names:
            if isinstance(parent._modules[child_name], nn.MaxPool2d):
                parent._modules[child_name] = QuantizedMaxPool2d(parent._modules[child_name])
        for i, child_name in enumerate(names):
            producer = _edge_layer(parent._modules[child_name], last=True)
            if producer is None:
                continue
            _, follower = _next_sibling(parent, names, i, _PASS_UINT8)
            consumer = _edge_layer(follower, last=False) if follower is not None else None
            if consumer is not None:
                producer.output_qparams = consumer.input_qparams


# Modules that pass uint8 through unchanged in meaning (max commutes with the monotonic quantization; the others
# move no value).
_PASS_UINT8 = (nn.Identity, QuantizedMaxPool2d, nn.Flatten)


def _edge_layer(module: nn.Module, last: bool) -> QuantizedConv2d | QuantizedLinear | None:
    """The quantized layer that writes a module's output (``last``) or reads its input: the module itself, or for a
    Sequential (a Conv2dNormActivation, a conv stack) its last or first layer past uint8 pass-throughs, recursively;
    None where that is anything else (an activation a layer could not fuse, a squeeze-excitation, a block)."""
    if isinstance(module, (QuantizedConv2d, QuantizedLinear)):
        return module
    if type(module) is not nn.Sequential and not isinstance(module, torchvision.ops.misc.Conv2dNormActivation):
        return None
    children = list(module.children())
    for child in reversed(children) if last else children:
        if not isinstance(child, _PASS_UINT8):
            return _edge_layer(child, last)
    return None


_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _is_resnet_body(body: nn.Module) -> bool:
    layers = [getattr(body, name, None) for name in _RESNET_LAYERS]
    return (isinstance(getattr(body, "conv1", None), nn.Conv2d) and isinstance(getattr(body, "maxpool", None),
                                                                                nn.MaxPool2d)
            and all(isinstance(layer, nn.Sequential) and all(isinstance(b, Bottleneck) for b in layer)
                    for layer in layers if layer is not None)
            and isinstance(getattr(body, "bn1", None), nn.Identity))


def _chain_rpn_head(head: nn.Module) -> None:
    """torchvision's RPNHead reads its shared convolutions' output twice (objectness and box deltas): the last shared
    convolution writes it once in uint8, in the scale both 1x1 convolutions take (they observed the same tensor)."""
    shared = [m for m in getattr(head, "conv", nn.Sequential()).modules() if isinstance(m, QuantizedConv2d)]
    cls_logits, bbox_pred = getattr(head, "cls_logits", None), getattr(head, "bbox_pred", None)
    if not shared or not isinstance(cls_logits, QuantizedConv2d) or not isinstance(bbox_pred, QuantizedConv2d):
        return
    bbox_pred.input_qparams = cls_logits.input_qparams
    shared[-1].output_qparams = cls_logits.input_qparams


def _check_calibration_images(images) -> list[Tensor]:
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images.unbind(0))
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("quantize: calibration_images must be a non-empty list of [3, H, W] float tensors in [0, 1] "
                         f"(or one [N, 3, H, W] tensor), got {type(images).__name__}"
                         + (" of length 0" if isinstance(images, (list, tuple)) else ""))
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or not image.is_floating_point():
            what = f"{image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, Tensor) else (
                type(image).__name__)
            raise ValueError(f"quantize: calibration_images[{i}] must be a [3, H, W] float tensor, got {what}")
        if image.device.type != "cpu":
            raise ValueError(f"quantize: calibration_images[{i}] is on {image.device}: int8 inference runs on the "
                             "CPU (oneDNN); pass CPU images and a CPU model")
    return list(images)


def quantize(model: nn.Module, calibration_images, *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (our FasterRCNN, or torchvision's, which is adopted) whose learned layers run in int8,
    calibrated on ``calibration_images``; eval mode, CPU.

    Args:
        model: a float32 detector on the CPU (fasterrcnn_ext or torchvision FasterRCNN).
        calibration_images (list of Tensor[3, H, W] in [0, 1], or Tensor[N, 3, H, W]): images like those the model
            will see (a few to a few dozen): each layer's activation range is their min and max.
        inplace (bool): convert ``model`` itself instead of a copy.

    Returns:
        The int8 detector: forward(images) as the model's, in eval mode only (it cannot train: train the float
        model and quantize again). Its state_dict holds the int8 weights and their scales.

    Raises ValueError for a model that is not a float32 CPU Faster R-CNN or bad calibration images, RuntimeError
    where torch has no oneDNN int8 kernels. Warns where the CPU lacks int8 dot products (int8 is then slower).
    """
    if not isinstance(model, TorchvisionFasterRCNN):
        raise ValueError(f"quantize: model must be a Faster R-CNN (fasterrcnn_ext's or torchvision's), got "
                         f"{type(model).__name__}")
    if getattr(model, "inference_options", None) is not None and model.inference_options.precision == "int8":
        raise ValueError("quantize: model is already int8")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type != "cpu":
            raise ValueError(f"quantize: model's {name} is on {p.device}: int8 inference runs on the CPU (oneDNN); "
                             "call model.cpu() first")
        if p.is_floating_point() and p.dtype != torch.float32:
            raise ValueError(f"quantize: model's {name} is {p.dtype}: quantize a float32 model")
    images = _check_calibration_images(calibration_images)
    if not _onednn_int8_ops():
        raise RuntimeError(int8_available()[1])
    fast, reason = int8_available()
    if not fast:
        warnings.warn(f"quantize: {reason}: int8 inference runs there with 7-bit activations and may be slower "
                      "than float32", RuntimeWarning, stacklevel=2)
    quant_max = 255 if fast else 127

    if not isinstance(model, frcnn.FasterRCNN):
        model = frcnn.FasterRCNN.adopt(model) if not inplace else frcnn.FasterRCNN._over(model)
    elif not inplace:
        model = copy.deepcopy(model)
    model.eval()
    box_head = model.roi_heads.box_head
    for module in (model.backbone, model.rpn.head, box_head):
        fold_batch_norms(module)

    ranges = _Ranges()
    handles = (_observe(model.backbone, "backbone", ranges) + _observe(model.rpn.head, "rpn.head", ranges)
               + _observe(box_head, "roi_heads.box_head", ranges))
    try:
        with torch.no_grad():
            options = model.inference_options
            model.inference_options = dataclasses.replace(options, fast=False)  # the folded modules as they are
            try:
                for image in images:
                    model([image])
            finally:
                model.inference_options = options
    finally:
        for handle in handles:
            handle.remove()

    converter = _Converter(ranges, quant_max)
    body = getattr(model.backbone, "body", None)
    fpn = getattr(model.backbone, "fpn", None)
    # The uint8 trunk needs readers that take uint8: the FPN's inner convolutions. Any other ResNet backbone is
    # converted layer by layer (float between layers).
    chained_trunk = (body is not None and _is_resnet_body(body) and fpn is not None
                     and hasattr(fpn, "inner_blocks") and hasattr(body, "return_layers"))
    if chained_trunk:
        converter.resnet_body(body, "backbone.body")
    converter.generic(model.backbone, "backbone")  # what resnet_body left: the FPN, any other backbone
    if chained_trunk:
        # The FPN's inner convolutions read the trunk's returned layers: uint8 in the scale the last bottleneck of
        # each wrote (the same tensor they observed).
        for layer_name, inner in zip(body.return_layers, fpn.inner_blocks):
            conv = inner[0] if isinstance(inner, nn.Sequential) else inner
            if isinstance(conv, QuantizedConv2d) and layer_name in _RESNET_LAYERS:
                conv.input_qparams = getattr(body, layer_name)[-1].conv3.output_qparams
    converter.generic(model.rpn.head, "rpn.head")
    _chain_rpn_head(model.rpn.head)
    if isinstance(box_head, TwoMLPHead) or isinstance(box_head, frcnn.VGG16BoxHead):
        fc6 = converter.linear(box_head.fc6, "roi_heads.box_head.fc6", "relu")
        fc7 = converter.linear(box_head.fc7, "roi_heads.box_head.fc7", "relu")
        fc6.output_qparams = fc7.input_qparams
        model.roi_heads.box_head = QuantizedTwoMLPHead(fc6, fc7)
    else:
        converter.generic(box_head, "roi_heads.box_head")
    model.inference_options = dataclasses.replace(model.inference_options, precision="int8")
    for p in model.parameters():
        p.requires_grad_(False)
    return model
