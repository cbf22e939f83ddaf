"""Property-based tests of every op against torchvision and float64 references (hypothesis).

Hypothesis draws the parameters of each case (sizes, dtype, memory format, strides, which values are NaN, Inf, huge,
negative or degenerate, every argument's edge values) and a seed for the bulk of the values, so that a failure
shrinks to a small case and replays exactly. The profile (tests/conftest.py) is fixed-seed and bounded in CI;
HYPOTHESIS_PROFILE=long runs many more examples locally. Sizes of 2^16 and more are in the explicit cases at the end.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

pytest.importorskip("hypothesis", reason="hypothesis is not installed (requirements-dev.txt)")
from hypothesis import assume, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.image_list import ImageList

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext.benchmark.inputs import random_boxes
from fasterrcnn_ext.models.detection import AnchorGenerator
from tests import reference
from tests.ops.roi_inputs import CPU_POOL_KERNELS, cpu_pool_kernel

FLOATS = [torch.float32, torch.float64]
# The cases run on CUDA too when a GPU is visible (the results compared on the CPU).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
devices = st.sampled_from(DEVICES)
SPECIALS = ["none", "nan", "inf", "huge", "negative", "degenerate"]


def make_boxes(n: int, seed: int, dtype, special: str = "none", extent: float = 200.0, fraction: float = 0.2):
    """n boxes (x1, y1, x2, y2) inside [0, extent]^2 with widths up to extent / 2, and a fraction of them special:
    NaN or Inf coordinates, 1e30-sized, negative coordinates, or zero/negative width and height."""
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, extent, max_size=extent / 2 + 0.5, min_size=0.5, dtype=torch.float64, generator=g)
    pick = torch.rand(n, generator=g) < fraction
    if special == "nan":
        boxes[pick, 1] = math.nan
    elif special == "inf":
        boxes[pick, 2] = math.inf
    elif special == "huge":
        boxes[pick] = boxes[pick] * 1e30
    elif special == "negative":
        boxes[pick] -= extent * 2
    elif special == "degenerate":
        boxes[pick, 2:] = boxes[pick, :2] - torch.rand(int(pick.sum()), 2, generator=g, dtype=torch.float64).round()
    return boxes.to(dtype)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values, as a contiguous tensor, a non-contiguous view, or (4-D) channels_last."""
    if kind == "strided":  # every other column of a wider tensor
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


seeds = st.integers(0, 2**31 - 1)


@given(n=st.integers(0, 300), seed=seeds, dtype=st.sampled_from(FLOATS + [torch.float16]),
       special=st.sampled_from(SPECIALS), threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
       tied=st.booleans(), max_keep=st.integers(-1, 20), strided=st.booleans(), device=devices)
def test_nms_matches_the_reference(n, seed, dtype, special, threshold, tied, max_keep, strided, device):
    boxes = make_boxes(n, seed, dtype, special)
    g = torch.Generator().manual_seed(seed + 1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    if tied:
        scores = scores.mul(4).round() / 4  # many ties: kept in index order
    if special == "nan" and n:
        scores[::7] = math.nan
    scores = scores.to(dtype)
    if strided:
        boxes, scores = layout(boxes, "strided"), layout(scores[:, None], "strided")[:, 0]
    keep = ops.nms(boxes.to(device), scores.to(device), threshold, max_keep=max_keep).cpu()
    expected = reference.nms(boxes, scores, threshold, max_keep=max_keep)
    assert torch.equal(keep, expected)
    finite = torch.isfinite(boxes).all() and torch.isfinite(scores).all()
    if finite and not tied and max_keep < 0 and dtype != torch.float16:  # torchvision's order is ours here
        assert torch.equal(keep, torchvision.ops.nms(boxes, scores, threshold))


@given(n=st.integers(0, 300), seed=seeds, dtype=st.sampled_from(FLOATS), special=st.sampled_from(SPECIALS),
       classes=st.sampled_from([1, 3, 80]), sparse=st.booleans(), threshold=st.sampled_from([0.0, 0.5, 0.9]),
       device=devices)
def test_batched_nms_matches_the_reference(n, seed, dtype, special, classes, sparse, threshold, device):
    boxes = make_boxes(n, seed, dtype, special)
    g = torch.Generator().manual_seed(seed + 2)
    scores = torch.rand(n, generator=g, dtype=dtype)
    idxs = torch.randint(0, classes, (n,), generator=g)
    if sparse:  # class ids spread over int64's range
        idxs = idxs * (2**60 // classes) - 2**59
    keep = ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), threshold).cpu()
    assert torch.equal(keep, reference.nms(boxes, scores, threshold, idxs=idxs))
    # torchvision's offset trick (boxes + idxs * (max coordinate + 1)) needs coordinates in [0, max] (its
    # documented domain: negative ones let classes overlap) and loses the boxes at ids ~2^59 or 1e30 pixels.
    if torch.isfinite(boxes).all() and bool(((boxes >= 0) & (boxes < 1e6)).all()) and not sparse:
        assert torch.equal(keep, torchvision.ops.batched_nms(boxes, scores, idxs, threshold))


@given(n=st.integers(0, 200), m=st.integers(0, 50), seed=seeds, dtype=st.sampled_from(FLOATS + [torch.int64]),
       special=st.sampled_from(SPECIALS), strided=st.booleans())
def test_box_iou_matches_torchvision(n, m, seed, dtype, special, strided):
    if dtype == torch.int64:
        special = "negative" if special in ("nan", "inf", "huge") else special
    a = make_boxes(n, seed, torch.float64, special).round().to(dtype)
    b = make_boxes(m, seed + 1, torch.float64, special).round().to(dtype)
    if strided:
        a = layout(a, "strided")
    if dtype == torch.int64:  # integer boxes: torchvision computes the IoU in floating point
        got = ops.box_iou(a, b)
        torch.testing.assert_close(got, torchvision.ops.box_iou(a, b), equal_nan=True)
        return
    got = ops.box_iou(a, b)
    torch.testing.assert_close(got, torchvision.ops.box_iou(a, b), rtol=1e-5, atol=1e-6, equal_nan=True)
    if special != "huge":  # 1e30-pixel areas overflow float32 (inf / inf = NaN) where float64 has a ratio
        expected = reference.box_iou(a.double(), b.double())
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6, equal_nan=True)


@given(n=st.integers(0, 200), seed=seeds, dtype=st.sampled_from(FLOATS + [torch.float16, torch.int64]),
       special=st.sampled_from(SPECIALS), size=st.tuples(st.integers(0, 300), st.integers(0, 300)),
       min_size=st.sampled_from([0.0, 1e-3, 1.0, 10.0]))
def test_clip_and_remove_small_boxes_match_torchvision(n, seed, dtype, special, size, min_size):
    if dtype == torch.int64 and special in ("nan", "inf", "huge"):
        special = "none"
    boxes = make_boxes(n, seed, torch.float64, special, extent=400).to(dtype)
    torch.testing.assert_close(ops.clip_boxes_to_image(boxes, size), torchvision.ops.clip_boxes_to_image(boxes, size),
                               equal_nan=True, rtol=0, atol=0)
    assert torch.equal(ops.remove_small_boxes(boxes, min_size), torchvision.ops.remove_small_boxes(boxes, min_size))


@given(n=st.integers(0, 300), seed=seeds, dtype=st.sampled_from(FLOATS),
       weights=st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (0.5, 2.0, 3.0, 0.25)]),
       scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_encode_and_decode_match_torchvision(n, seed, dtype, weights, scale):
    """Decoding clamps dw and dh at log(1000 / 16) before exp(), as torchvision; huge deltas stay finite."""
    proposals = make_boxes(n, seed, dtype)
    gt = make_boxes(n, seed + 1, dtype)
    coder = tv_det_utils.BoxCoder(weights)
    torch.testing.assert_close(ops.encode_boxes(gt, proposals, weights), coder.encode_single(gt, proposals),
                               rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(seed + 3)
    codes = (torch.randn(n, 4, generator=g, dtype=torch.float64) * scale).to(dtype)
    got = ops.decode_boxes(codes, proposals, weights)
    torch.testing.assert_close(got, coder.decode_single(codes, proposals), rtol=1e-5, atol=1e-3)
    assert torch.isfinite(got).all()


def feature_map(batch, channels, height, width, seed, dtype, kind):
    g = torch.Generator().manual_seed(seed)
    return layout(torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64).to(dtype), kind)


def rois_for(batch, k, seed, dtype, special, extent):
    boxes = make_boxes(k, seed, torch.float64, special, extent=extent)
    g = torch.Generator().manual_seed(seed + 5)
    ids = torch.randint(0, batch, (k, 1), generator=g).double()
    return torch.cat([ids, boxes], 1).to(dtype)


roi_shapes = dict(batch=st.integers(1, 3), channels=st.integers(1, 20), height=st.integers(1, 24),
                  width=st.integers(1, 24), k=st.integers(0, 40), seed=seeds, dtype=st.sampled_from(FLOATS),
                  kind=st.sampled_from(["contiguous", "channels_last", "strided"]),
                  out=st.tuples(st.integers(1, 7), st.integers(1, 7)),
                  scale=st.sampled_from([1.0, 0.5, 0.25, 1 / 16]))


@given(**roi_shapes, sampling=st.integers(-1, 3), aligned=st.booleans(),
       special=st.sampled_from(["none", "negative", "degenerate", "huge", "nan"]), device=devices)
def test_roi_align_matches_torchvision(batch, channels, height, width, k, seed, dtype, kind, out, scale, sampling,
                                       aligned, special, device):
    x = feature_map(batch, channels, height, width, seed, dtype, kind)
    rois = rois_for(batch, k, seed, dtype, special, extent=max(height, width) / scale)
    got = ops.roi_align(x.to(device), rois.to(device), out, scale, sampling, aligned).cpu()
    assert got.shape == (k, channels, *out)
    if special in ("huge", "nan"):
        # Adaptive sampling of a 1e30-pixel RoI would take torchvision forever; ours caps the samples (documented)
        # and NaN RoIs give NaN or 0. What matters: it finishes, in bounds, with the boxes that are numbers right.
        ok = torch.isfinite(rois).all(1) & (rois[:, 1:].abs() < 1e6).all(1)
        assume(bool(ok.any()))
        got, rois = got[ok], rois[ok]
    expected = torchvision.ops.roi_align(x, rois, out, scale, sampling, aligned)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@given(**roi_shapes, special=st.sampled_from(["none", "negative", "degenerate", "huge", "nan"]),
       requires_grad=st.booleans(), device=devices, cpu_kernel=st.sampled_from(CPU_POOL_KERNELS))
def test_roi_pool_matches_torchvision(batch, channels, height, width, k, seed, dtype, kind, out, scale, special,
                                      requires_grad, device, cpu_kernel):
    x = feature_map(batch, channels, height, width, seed, dtype, kind).round(decimals=1)  # ties
    rois = rois_for(batch, k, seed, dtype, special, extent=max(height, width) / scale)
    finite = torch.isfinite(rois).all(1) & (rois[:, 1:].abs() < 1e6).all(1)
    inp = x.detach().clone().to(device).requires_grad_(requires_grad)
    with torch.set_grad_enabled(requires_grad), cpu_pool_kernel(cpu_kernel):
        got = ops.roi_pool(inp, rois.to(device), out, scale)
    assert got.shape == (k, channels, *out)
    expected = torchvision.ops.roi_pool(x, rois[finite], out, scale)
    torch.testing.assert_close(got[finite.to(device)].detach().cpu(), expected, rtol=0, atol=0)
    if requires_grad and k:
        grad = torch.autograd.grad(got.sum(), inp)[0].cpu()
        xt = x.detach().clone().requires_grad_()
        torchvision.ops.roi_pool(xt, rois[finite], out, scale).sum().backward()
        if bool(finite.all()):
            torch.testing.assert_close(grad, xt.grad, rtol=0, atol=0)


@given(batch=st.integers(1, 2), channels=st.integers(1, 8), k=st.integers(0, 60), seed=seeds,
       dtype=st.sampled_from(FLOATS), sampling=st.integers(-1, 2), out=st.integers(1, 7),
       levels=st.sampled_from([["p2", "p3", "p4", "p5"], ["p3", "p5"], ["p2"], ["p4", "p5"]]),
       special=st.sampled_from(["none", "negative", "degenerate"]))
def test_multi_scale_roi_align_matches_torchvision(batch, channels, k, seed, dtype, sampling, out, levels, special):
    image = (96, 128)
    g = torch.Generator().manual_seed(seed)
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    feats = {name: torch.randn(batch, channels, image[0] // s, image[1] // s, generator=g, dtype=torch.float64)
             .to(dtype) for name, s in strides.items()}
    boxes = [make_boxes(k, seed + i, dtype, special, extent=128) for i in range(batch)]
    shapes = [image] * batch
    got = ops.MultiScaleRoIAlign(levels, out, sampling)(feats, boxes, shapes)
    expected = torchvision.ops.MultiScaleRoIAlign(levels, out, sampling)(feats, boxes, shapes)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@given(levels=st.integers(1, 5), anchors_per_level=st.integers(1, 3), seed=seeds, batch=st.integers(1, 2),
       image=st.tuples(st.integers(32, 200), st.integers(32, 200)), dtype=st.sampled_from(FLOATS))
def test_anchor_grid_matches_torchvision(levels, anchors_per_level, seed, batch, image, dtype):
    g = torch.Generator().manual_seed(seed)
    sizes = tuple(tuple(int(s) for s in torch.randint(8, 512, (anchors_per_level,), generator=g))
                  for _ in range(levels))
    ratios = tuple((0.5, 1.0, 2.0)[:anchors_per_level] for _ in range(levels))
    images = ImageList(torch.zeros(batch, 3, *image, dtype=dtype), [image] * batch)
    feats = [torch.zeros(batch, 1, max(1, image[0] // 2 ** (i + 2)), max(1, image[1] // 2 ** (i + 2)), dtype=dtype)
             for i in range(levels)]
    got = AnchorGenerator(sizes, ratios)(images, feats)
    expected = TvAnchorGenerator(sizes, ratios)(images, feats)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@given(n=st.integers(1, 2), c=st.integers(1, 40), k=st.integers(1, 40), h=st.integers(1, 19), w=st.integers(1, 19),
       seed=seeds, bias=st.booleans(), relu=st.booleans(), kind=st.sampled_from(["contiguous", "channels_last"]))
@example(n=2, c=15, k=1, h=1, w=10, seed=10, bias=True, relu=True, kind="contiguous")  # ReLU leaves a max of 3e-4
def test_conv3x3_winograd_matches_a_float64_convolution(n, c, k, h, w, seed, bias, relu, kind):
    g = torch.Generator().manual_seed(seed)
    x = layout(torch.randn(n, c, h, w, generator=g), kind)
    weight = torch.randn(k, c, 3, 3, generator=g) / math.sqrt(9 * c)
    b = torch.randn(k, generator=g) if bias else None
    got = ops.conv3x3_winograd(x, ops.winograd_weight(weight), b, relu)
    expected = torch.nn.functional.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    # The error scales with the convolution's magnitude before the ReLU, which may leave only tiny outputs.
    scale = expected.abs().max().item() + 1e-6
    if relu:
        expected = expected.relu()
    assert (got.double() - expected).abs().max().item() <= 1e-4 * scale


# --- 2^16 and more: beyond what the drawn cases reach ---------------------------------------------------------------

def test_large_box_counts_match_torchvision():
    n = 2**16 + 123
    boxes = make_boxes(n, 7, torch.float32, "none", extent=2000)
    scores = torch.randperm(n, generator=torch.Generator().manual_seed(8)).float() / n  # distinct: no tie order
    torch.testing.assert_close(ops.box_iou(boxes, boxes[:7]), torchvision.ops.box_iou(boxes, boxes[:7]))
    assert torch.equal(ops.remove_small_boxes(boxes, 30.0), torchvision.ops.remove_small_boxes(boxes, 30.0))
    labels = torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(9))
    assert torch.equal(ops.batched_nms(boxes, scores, labels, 0.5),
                       torchvision.ops.batched_nms(boxes, scores, labels, 0.5))
    # 2^16+ RoIs from one small map (many RoIs share a batch index and the output is large).
    x = torch.randn(1, 4, 9, 11)
    rois = torch.cat([torch.zeros(n, 1), make_boxes(n, 10, torch.float32, extent=20)], 1)
    torch.testing.assert_close(ops.roi_align(x, rois, 2, 0.5, 2, True),
                               torchvision.ops.roi_align(x, rois, 2, 0.5, 2, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_inputs_of_every_box_op(n):
    boxes = make_boxes(n, 0, torch.float32)
    scores = torch.rand(n)
    assert torch.equal(ops.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
    assert torch.equal(ops.batched_nms(boxes, scores, torch.zeros(n, dtype=torch.long), 0.5),
                       torchvision.ops.batched_nms(boxes, scores, torch.zeros(n, dtype=torch.long), 0.5))
    assert ops.box_iou(boxes, boxes).shape == (n, n)
    assert ops.clip_boxes_to_image(boxes, (10, 10)).shape == (n, 4)
    assert ops.remove_small_boxes(boxes, 1.0).shape == (n,)
    assert ops.decode_boxes(torch.zeros(n, 4), boxes, (1.0, 1.0, 1.0, 1.0)).shape == (n, 4)
    x = torch.randn(1, 3, 5, 5)
    rois = torch.cat([torch.zeros(n, 1), boxes / 40], 1)
    assert ops.roi_align(x, rois, 2).shape == (n, 3, 2, 2)
    assert ops.roi_pool(x, rois, 2).shape == (n, 3, 2, 2)
