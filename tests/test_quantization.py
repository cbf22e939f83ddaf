"""int8 inference (fasterrcnn_ext.quantization): each int8 layer against its float32 twin, the conversion of every
builder, the input model left untouched, the errors, and (slow) the accuracy gate on the demo's trained model."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from fasterrcnn_ext import capabilities, quantization
from fasterrcnn_ext.models.detection import (
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_tiny,
    fasterrcnn_vgg16,
)
from fasterrcnn_ext.models.detection._inference import fold_batch_norms
from fasterrcnn_ext.quantization import QParams, QuantizedConv2d, QuantizedLinear, quantize

pytestmark = pytest.mark.skipif(not quantization._onednn_int8_ops(), reason="this torch build has no oneDNN int8")


def _relative_error(got, expected):
    expected = expected.detach()
    return float((got.float() - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


def _qparams_of(x, quant_max=255):
    return QParams.from_range(float(x.detach().min()), float(x.detach().max()), quant_max)


def test_qparams_keep_zero_exact_and_cover_the_range():
    q = QParams.from_range(-1.0, 3.0, 255)
    assert q.zero_point == round(1.0 / q.scale) and abs(q.scale * 255 - 4.0) < 1e-6
    assert QParams.from_range(0.5, 2.0, 255).zero_point == 0  # the range is widened to hold zero
    assert QParams.from_range(0.0, 0.0, 255) == QParams(1.0, 0)
    assert QParams.from_range(-2.0, -1.0, 127).zero_point == 127


@pytest.mark.parametrize("activation, groups, stride, kernel", [
    ("none", 1, 1, 3), ("relu", 1, 2, 3), ("relu", 1, 1, 1), ("hardswish", 8, 1, 3), ("relu", 32, 2, 5)])
def test_quantized_conv_matches_the_float_conv(activation, groups, stride, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, kernel, stride=stride, padding=kernel // 2, groups=groups).eval()
    x = torch.randn(2, 32, 23, 17)  # odd sizes; signed input: a non-zero zero point
    expected = conv(x)
    expected = {"none": expected, "relu": torch.relu(expected),
                "hardswish": nn.functional.hardswish(expected)}[activation]
    q = QuantizedConv2d(conv, input_qparams=_qparams_of(x), activation=activation)
    with torch.no_grad():
        got = q(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert _relative_error(got, expected) < 0.03
    # uint8 output in a given scale: the same values, rounded to it
    out_q = _qparams_of(expected)
    q.output_qparams = out_q
    with torch.no_grad():
        got8 = q(x)
    assert got8.dtype == torch.uint8
    assert _relative_error((got8.float() - out_q.zero_point) * out_q.scale, expected) < 0.04


def test_quantized_conv_takes_uint8_at_its_input_scale_and_non_contiguous_input():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 8, 3, padding=1).eval()
    x = torch.rand(1, 16, 12, 12)
    qp = _qparams_of(x)
    q = QuantizedConv2d(conv, input_qparams=qp, activation="relu")
    x8 = torch.clamp(torch.round(x / qp.scale) + qp.zero_point, 0, 255).to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(q(x8), q(x))
        strided = torch.rand(1, 16, 24, 12)[:, :, ::2]
        assert _relative_error(q(strided), torch.relu(conv(strided))) < 0.03


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_quantized_linear_matches_the_float_linear(activation):
    torch.manual_seed(2)
    linear = nn.Linear(300, 64).eval()
    x = torch.randn(5, 7, 300)  # leading dimensions are kept
    expected = linear(x) if activation == "none" else torch.relu(linear(x))
    q = QuantizedLinear(linear, input_qparams=_qparams_of(x), activation=activation)
    with torch.no_grad():
        got = q(x)
    assert got.shape == expected.shape and _relative_error(got, expected) < 0.03


def _calibrated(module, x, name):
    """The ranges quantize() records, for one module run on x."""
    ranges = quantization._Ranges()
    handles = quantization._observe(module, name, ranges)
    module(x)
    for handle in handles:
        handle.remove()
    return ranges


def _resnet_model(**kwargs):
    torch.manual_seed(0)
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=160, max_size=224,
                                   **kwargs).eval()


def test_quantized_bottleneck_matches_the_folded_block_and_keeps_its_input():
    """A block without downsample adds its input in place inside oneDNN: the caller's tensor must survive when the
    block may not be its only reader."""
    torch.manual_seed(3)
    block = Bottleneck(64, 16).eval()
    for bn in (block.bn1, block.bn2, block.bn3):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    fold_batch_norms(block)
    x = torch.relu(torch.randn(1, 64, 14, 14))
    with torch.no_grad():
        expected = block(x)
        q = quantization._Converter(_calibrated(block, x, "b"), 255).bottleneck(block, "b", input_reused=True)
        q.conv3.output_qparams = None  # float output, to compare
        before = x.clone()
        got = q(x)
        assert torch.equal(x, before)
        x8 = quantization._as_uint8(x, q.conv1.input_qparams)
        x8_before = x8.clone()
        q(x8)
        assert torch.equal(x8, x8_before)
    assert _relative_error(got, expected) < 0.05


@pytest.mark.parametrize("build, size", [
    (lambda: fasterrcnn_tiny(weights=None), 192),
    (lambda: _resnet_model(), 200),
    (lambda: fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None), 256),
    (lambda: fasterrcnn_vgg16(num_classes=5, min_size=160, max_size=224), 160),
], ids=["tiny", "resnet50_fpn", "mobilenet_v3_320", "vgg16"])
def test_every_builder_quantizes_and_its_features_follow_the_float_model(build, size):
    torch.manual_seed(0)
    model = build().eval()
    images = [torch.rand(3, size, size + 32) for _ in range(3)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    int8 = quantize(model, images[:2])
    # the input model is untouched
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert int8.inference_options.precision == "int8" and not int8.training
    convs = [m for m in int8.backbone.modules() if isinstance(m, nn.Conv2d)]
    quantized = [m for m in int8.backbone.modules() if isinstance(m, QuantizedConv2d)]
    assert quantized and all(_in_squeeze_excitation(int8.backbone, c) for c in convs)
    batch = images[2].unsqueeze(0)
    with torch.no_grad():
        transformed, _ = model.transform(list(batch))
        expected = model.backbone(transformed.tensors)
        got = int8.backbone(transformed.tensors.contiguous(memory_format=torch.channels_last))
        if isinstance(expected, torch.Tensor):
            expected, got = {"0": expected}, {"0": got}
        for name in expected:
            assert got[name].dtype == torch.float32
            assert _relative_error(got[name], expected[name]) < 0.15, name
        detections = int8(images[2:])
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def _in_squeeze_excitation(root, conv):
    from torchvision.ops.misc import SqueezeExcitation

    return any(isinstance(m, SqueezeExcitation) and any(c is conv for c in m.modules()) for m in root.modules())


def test_the_int8_model_copies_and_batches_like_the_float_one():
    torch.manual_seed(0)
    model = fasterrcnn_tiny(weights=None).eval()
    images = [torch.rand(3, 192, 192) for _ in range(2)]
    int8 = quantize(model, images)
    with torch.no_grad():
        one = [int8([image])[0] for image in images]
        both = int8(images)
        copied = copy.deepcopy(int8)(images)  # the packed weights are rebuilt, not copied
    for a, b, c in zip(one, both, copied):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(b["scores"], c["scores"])


def test_int8_model_refuses_training_and_inputs_are_checked():
    model = fasterrcnn_tiny(weights=None).eval()
    int8 = quantize(model, [torch.rand(3, 192, 192)])
    int8.train()
    with pytest.raises(ValueError, match="eval mode only"):
        int8([torch.rand(3, 192, 192)], [{"boxes": torch.tensor([[1.0, 1, 20, 20]]), "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="already int8"):
        quantize(int8, [torch.rand(3, 192, 192)])
    with pytest.raises(ValueError, match="non-empty list"):
        quantize(model, [])
    with pytest.raises(ValueError, match=r"calibration_images\[1\] must be a \[3, H, W\] float tensor"):
        quantize(model, [torch.rand(3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="model must be a Faster R-CNN"):
        quantize(nn.Linear(2, 2), [torch.rand(3, 64, 64)])
    with pytest.raises(ValueError, match="float64"):
        quantize(copy.deepcopy(model).double(), [torch.rand(3, 64, 64)])


def test_torchvisions_model_is_adopted_and_left_as_it_was():
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None,
                                                                            weights_backbone=None).eval()
    int8 = quantize(tv, [torch.rand(3, 256, 256)])
    assert type(tv) is torchvision.models.detection.FasterRCNN
    assert not any(isinstance(m, QuantizedConv2d) for m in tv.modules())
    with torch.no_grad():
        assert set(int8([torch.rand(3, 256, 256)])[0]) == {"boxes", "labels", "scores"}


def test_without_int8_dot_products_activations_use_7_bits_and_it_warns():
    model = fasterrcnn_tiny(weights=None).eval()
    with capabilities.forced(native_int8=False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        int8 = quantize(model, [torch.rand(3, 192, 192)])
    assert any("7-bit activations" in str(w.message) for w in caught)
    zero_points = [m.input_qparams.zero_point for m in int8.modules() if isinstance(m, QuantizedConv2d)]
    scales_ok = all(m.input_qparams.zero_point <= 127 for m in int8.modules() if isinstance(m, QuantizedConv2d))
    assert zero_points and scales_ok
    available, reason = quantization.int8_available()
    if not capabilities.detected().native_int8:
        assert not available and "VNNI" in reason


@pytest.mark.slow
def test_int8_and_bf16_keep_the_demo_models_held_out_map(demo_run):
    """The accuracy gate (BENCHMARKS.md): on the demo's trained model and its 200 held-out images, COCO mAP drops by
    at most 0.01 in int8 (calibrated on 16 training images) and by at most 0.005 in bfloat16."""
    from fasterrcnn_ext.data import build_dataset
    from fasterrcnn_ext.engine.detect import load_detector
    from fasterrcnn_ext.engine.evaluate import evaluate

    model, _, _ = load_detector(str(demo_run / "model.pt"))
    model.eval()
    held_out = build_dataset("synthetic", train=False, split="val", seed=0, synthetic_images=200)
    training = build_dataset("synthetic", train=True, split="train", seed=0, synthetic_images=16)
    fp32 = evaluate(model, held_out, progress=False)["map"]
    int8 = evaluate(quantize(model, [training[i][0] for i in range(16)]), held_out, progress=False)["map"]
    bf16_model = copy.deepcopy(model)
    bf16_model.inference_dtype = torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # emulated bfloat16 warns: the gate is accuracy
        bf16 = evaluate(bf16_model, held_out, progress=False)["map"]
    assert fp32 > 0.5  # a model that detects
    assert fp32 - int8 <= 0.01, (fp32, int8)
    assert fp32 - bf16 <= 0.005, (fp32, bf16)


def test_nested_sequentials_chain_in_uint8_and_match_float():
    """Conv2dNormActivation stacks (the v2 RPN and box heads) pass uint8 from one block's convolution to the next
    and through Flatten into a linear layer; the result still follows the float stack."""
    from torchvision.ops.misc import Conv2dNormActivation

    torch.manual_seed(4)
    stack = nn.Sequential(Conv2dNormActivation(8, 16, 3), Conv2dNormActivation(16, 16, 3), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 32), nn.ReLU()).eval()
    for m in stack.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    fold_batch_norms(stack)
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        expected = stack(x)
        quantization._Converter(_calibrated(stack, x, "s"), 255).generic(stack, "s")
        got = stack(x)
    first, second, linear = stack[0][0], stack[1][0], stack[3]
    assert isinstance(first, QuantizedConv2d) and first.output_qparams == second.input_qparams
    assert second.output_qparams == linear.input_qparams and linear.activation == "relu"
    assert _relative_error(got, expected) < 0.05


def test_weights_are_packed_per_input_shape_and_give_the_same_results():
    """oneDNN's packed layout depends on the input shape (packed without it, some shapes reorder the weight on every
    call): one packing per shape, a bounded number kept, each giving the float convolution's result."""
    torch.manual_seed(6)
    conv = nn.Conv2d(32, 16, 1).eval()
    q = QuantizedConv2d(conv, input_qparams=QParams.from_range(0.0, 1.0, 255), activation="relu")
    shapes = [(1, 32, 9 + i, 7) for i in range(quantization._PACKED_SHAPES + 2)]
    with torch.no_grad():
        for shape in shapes + shapes[-2:]:
            x = torch.rand(shape)
            assert _relative_error(q(x), torch.relu(conv(x))) < 0.03
    cached = q.__dict__["_packed"][1]
    assert len(cached) == quantization._PACKED_SHAPES and tuple(shapes[-1]) in cached
