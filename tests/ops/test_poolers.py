from collections import OrderedDict

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import fasterrcnn_ext.ops as ops


def fpn_features(batch=2, channels=8, image_hw=(128, 160), levels=4, dtype=torch.float32, device="cpu"):
    h, w = image_hw
    return OrderedDict((f"p{i}", torch.randn(batch, channels, h // 2 ** (i + 2), w // 2 ** (i + 2), dtype=dtype,
                                             device=device)) for i in range(levels))


def boxes_of_all_sizes(n, image_hw=(128, 160), dtype=torch.float32, device="cpu"):
    h, w = image_hw
    size = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(1.0, 6.0))  # 3 to 400 pixels: every level
    xy = torch.rand(n, 2, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64)
    return torch.cat([xy, xy + size[:, None]], 1).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torchvision(device, dtype):
    feats = fpn_features(dtype=dtype, device=device)
    boxes = [boxes_of_all_sizes(60, dtype=dtype, device=device), boxes_of_all_sizes(45, dtype=dtype, device=device)]
    # Exact level boundaries: sqrt(area) = 112, 224 and 448 pixels.
    boxes[0][:3] = torch.tensor([[0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 448, 448]], dtype=dtype, device=device)
    names = list(feats)
    ours_m = ops.MultiScaleRoIAlign(names, 7, 2)
    theirs_m = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    image_shapes = [(128, 160), (120, 150)]
    fa = OrderedDict((k, v.detach().clone().requires_grad_()) for k, v in feats.items())
    ft = OrderedDict((k, v.detach().clone().requires_grad_()) for k, v in feats.items())
    ours = ours_m(fa, boxes, image_shapes)
    theirs = theirs_m(ft, boxes, image_shapes)
    tol = dict(rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-10)
    torch.testing.assert_close(ours, theirs, **tol)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    for k in feats:
        torch.testing.assert_close(fa[k].grad, ft[k].grad, **tol)


def test_single_level_and_featmap_selection():
    feats = fpn_features(levels=3)
    feats["pool"] = torch.randn(2, 8, 2, 3)
    boxes = [boxes_of_all_sizes(10), boxes_of_all_sizes(7)]
    for names in (["p1"], ["p0", "p1", "p2"]):
        ours = ops.MultiScaleRoIAlign(names, (3, 4), -1)(feats, boxes, [(128, 160)] * 2)
        theirs = torchvision.ops.MultiScaleRoIAlign(names, (3, 4), -1)(feats, boxes, [(128, 160)] * 2)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_empty_boxes():
    feats = fpn_features()
    out = ops.MultiScaleRoIAlign(list(feats), 7, 2)(feats, [torch.empty(0, 4), torch.empty(0, 4)], [(128, 160)] * 2)
    assert out.shape == (0, 8, 7, 7)


def test_image_shapes_and_boxes_must_match_the_batch():
    """One image shape per image and no more per-image boxes than images: torchvision accepts either mismatch
    without a word (extra shapes are ignored; extra boxes read out of the batch)."""
    feats = fpn_features()
    pooler = ops.MultiScaleRoIAlign(list(feats), 7, 2)
    boxes = [boxes_of_all_sizes(5), boxes_of_all_sizes(4)]
    with pytest.raises(ValueError, match="image_shapes has 3 entries but boxes has 2 per-image tensors"):
        pooler(feats, boxes, [(128, 160)] * 3)
    with pytest.raises(ValueError, match="image_shapes has 1 entries but boxes has 2"):
        pooler(feats, boxes, [(128, 160)])
    with pytest.raises(ValueError, match="MultiScaleRoIAlign: boxes has 3 per-image tensors but the input holds 2"):
        pooler(feats, boxes + [boxes_of_all_sizes(3)], [(128, 160)] * 3)
    with pytest.raises(ValueError, match="multi_scale_roi_align: boxes has 3 per-image tensors but the input holds 2"):
        ops.multi_scale_roi_align(list(feats.values()), boxes + boxes[:1], 7,
                                  [1 / 4, 1 / 8, 1 / 16, 1 / 32])
    with pytest.raises(ValueError, match="roi_align: boxes has 3 per-image tensors but the input holds 2"):
        ops.roi_align(feats["p0"], boxes + boxes[:1], 7)
    with pytest.raises(ValueError, match="roi_pool: boxes has 3 per-image tensors but the input holds 2"):
        ops.roi_pool(feats["p0"], boxes + boxes[:1], 7)
    assert pooler(feats, boxes[:1], [(128, 160)]).shape == (5, 8, 7, 7)  # fewer images' boxes than images is fine


def test_bad_scales():
    feats = list(fpn_features().values())
    rois = torch.tensor([[0, 0, 0, 10, 10.0]])
    with pytest.raises(RuntimeError, match="one feature map per level"):
        ops.multi_scale_roi_align(feats, rois, 7, [1 / 4, 1 / 16, 1 / 32, 1 / 64])
    with pytest.raises(RuntimeError, match="powers of 2"):
        ops.multi_scale_roi_align(feats, rois, 7, [1 / 4, 1 / 8, 1 / 12, 1 / 32])
    with pytest.raises(RuntimeError, match="got 4 feature maps but 3 scales"):
        ops.multi_scale_roi_align(feats, rois, 7, [1 / 4, 1 / 8, 1 / 16])


def test_opcheck(device):
    feats = list(fpn_features(device=device).values())
    rois = torch.cat([torch.randint(0, 2, (20, 1), device=device).float(), boxes_of_all_sizes(20, device=device)], 1)
    torch.library.opcheck(torch.ops.fasterrcnn_ext.multi_scale_roi_align.default,
                          (feats, rois, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 7, 7, 2, False, 224.0, 4.0))


def test_non_adjacent_levels_give_torchvisions_result_and_warn_once(monkeypatch):
    """Maps at strides 8 and 32 only (torchvision's own ONNX test does this): torchvision pools a RoI of level 4 from
    the second map given and gives zeros to a RoI of level 5; ours gives the same, with one warning."""
    import warnings

    g = torch.Generator().manual_seed(0)
    feats = OrderedDict([("p3", torch.randn(1, 4, 16, 20, generator=g)), ("p5", torch.randn(1, 4, 4, 5, generator=g))])
    boxes = [torch.tensor([[0.0, 0, 20, 20], [0, 0, 300, 300], [0, 0, 500, 500]])]  # levels 3 (clamped), 4, 5
    from fasterrcnn_ext.ops import poolers

    monkeypatch.setattr(poolers, "_warned_non_adjacent", [False])  # once per process: another test may have warned
    ours_m = ops.MultiScaleRoIAlign(["p3", "p5"], 2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours_m(feats, boxes, [(128, 160)])
        again = ours_m(feats, boxes, [(128, 160)])
    expected = torchvision.ops.MultiScaleRoIAlign(["p3", "p5"], 2, 2)(feats, boxes, [(128, 160)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-6)
    assert torch.equal(got[2], torch.zeros_like(got[2])) and got[1].abs().sum() > 0
    assert sum("skip a pyramid level" in str(w.message) for w in caught) == 1


def test_maps_sharing_a_scale_take_the_fused_op_without_a_warning():
    """MobileNetV3-FPN gives two stride-32 maps: every RoI pools from the first, as in torchvision, in one op."""
    import warnings

    g = torch.Generator().manual_seed(1)
    feats = OrderedDict([("0", torch.randn(1, 4, 4, 5, generator=g)), ("1", torch.randn(1, 4, 4, 5, generator=g))])
    boxes = [torch.tensor([[0.0, 0, 20, 20], [0, 0, 300, 300], [10, 20, 127, 159]])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ops.MultiScaleRoIAlign(["0", "1"], 2, 2)(feats, boxes, [(128, 160)])
    expected = torchvision.ops.MultiScaleRoIAlign(["0", "1"], 2, 2)(feats, boxes, [(128, 160)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("names", [["p0"], ["p0", "p1", "p2", "p3"], ["p1", "p3"]], ids=["one", "fused", "skipping"])
def test_half_maps_with_float32_boxes_are_pooled_as_they_are(device, dtype, names):
    """A detector converted with .half() or .bfloat16() keeps float32 boxes (box decoding in float32): its maps go to
    the kernels as they are (read in their dtype, pooled in float32), not its RoIs rounded (bfloat16 coordinates step
    by 4 pixels at 1000), and the result takes the maps' dtype: the float32 maps' result, rounded once. torchvision's
    module stops at the dtype mismatch. No float32 copy of a map is made."""
    import warnings

    feats = OrderedDict((k, v.to(dtype)) for k, v in fpn_features(device=device).items() if k in names)
    boxes = [boxes_of_all_sizes(30, device=device), boxes_of_all_sizes(20, device=device)]
    boxes[0][0] = torch.tensor([100.25, 50.75, 126.5, 127.25])  # coordinates a bfloat16 cannot hold
    pooler = ops.MultiScaleRoIAlign(names, 3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipping maps' warning, tested above
        with _MapCopies() as copies:
            got = pooler(feats, boxes, [(128, 160)] * 2)
        expected = pooler(OrderedDict((k, v.float()) for k, v in feats.items()), boxes, [(128, 160)] * 2)
        rounded = pooler(feats, [b.to(dtype) for b in boxes], [(128, 160)] * 2)
    assert got.dtype == dtype
    assert copies.shapes == [], f"float32 copies of the maps: {copies.shapes}"
    torch.testing.assert_close(got, expected.to(dtype), rtol=0, atol=0)
    if dtype == torch.bfloat16:  # the rounded RoIs would have pooled elsewhere
        assert not torch.equal(rounded[0], got[0])
    # The functional op takes the pair too; float64 boxes with a half map are still refused.
    one = feats[names[0]]
    torch.testing.assert_close(ops.roi_align(one, boxes, 3, 0.25), ops.roi_align(one.float(), boxes, 3, 0.25).to(dtype),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="rois must be float32 or have the dtype of input"):
        ops.roi_align(one, [b.double() for b in boxes], 3, 0.25)


class _MapCopies(TorchDispatchMode):
    """Records the shapes of the 4-D tensors (feature maps) that are copied to another dtype or device by the ops
    called inside it (not by the kernels themselves)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].dim() == 4:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pooler_under_autocast_reads_the_half_maps_as_they_are(device, dtype):
    """Under autocast the pooler's maps are half and its boxes float32: the autocast kernels pass them on without a
    float32 copy of the maps, and the result is the one without autocast."""
    feats = OrderedDict((k, v.to(dtype)) for k, v in fpn_features(device=device).items())
    boxes = [boxes_of_all_sizes(30, device=device), boxes_of_all_sizes(20, device=device)]
    pooler = ops.MultiScaleRoIAlign(list(feats), 7, 2)
    plain = pooler(feats, boxes, [(128, 160)] * 2)
    with torch.autocast(device_type=device, dtype=dtype), _MapCopies() as copies:
        got = pooler(feats, boxes, [(128, 160)] * 2)
    assert copies.shapes == [], f"float32 copies of the maps: {copies.shapes}"
    assert got.dtype == dtype
    assert torch.equal(got, plain)

