import pytest
import torch
import torchvision

import fasterrcnn_ext.ops as ops
from tests.ops.roi_inputs import as_box_list, random_rois

TOL = {torch.float32: dict(rtol=0, atol=2e-5), torch.float64: dict(rtol=0, atol=1e-10)}


def _forward_backward(fn, x, rois, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, rois, **kw)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    out.backward(grad_out)
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
def test_matches_torchvision(device, dtype, aligned, sampling_ratio, layout):
    x = torch.randn(2, 8, 24, 30, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = torch.randn(2, 16, 24, 60, dtype=dtype, device=device)[:, ::2, :, ::2]
        assert not x.is_contiguous()
    rois = random_rois(40, 2, image_hw=(96, 120), dtype=dtype, device=device)
    kw = dict(output_size=(5, 4), spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned)
    ours = _forward_backward(ops.roi_align, x, rois, **kw)
    theirs = _forward_backward(torchvision.ops.roi_align, x, rois, **kw)
    torch.testing.assert_close(ours[0], theirs[0], **TOL[dtype])
    torch.testing.assert_close(ours[1], theirs[1], **TOL[dtype])


def test_large_outputs_match_torchvision_forward_and_backward():
    """Outputs and gradients of several MB come from huge-page-advised memory (csrc/ops/cpu/large_output.h)."""
    x = torch.randn(2, 64, 48, 64, requires_grad=True)
    rois = random_rois(700, 2, image_hw=(96, 128), max_size=60.0)  # 700 x 64 x 7 x 7 floats: 8.8 MB
    ours = ops.roi_align(x, rois, 7, 0.5, 2, True)
    theirs = torchvision.ops.roi_align(x, rois, 7, 0.5, 2, True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    grad = torch.randn_like(ours)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_theirs,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=2e-5)
    big = torch.randn(1, 16, 400, 400, requires_grad=True)  # a 10 MB gradient
    r = random_rois(50, 1, image_hw=(400, 400), max_size=200.0)
    (g_big,) = torch.autograd.grad(ops.roi_align(big, r, 7, 1.0, 2, True).sum(), big)
    (g_ref,) = torch.autograd.grad(torchvision.ops.roi_align(big, r, 7, 1.0, 2, True).sum(), big)
    torch.testing.assert_close(g_big, g_ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels, height, width", [(40, 19, 37), (32, 16, 16), (16, 9, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_blocks_match_torchvision_at_their_edges(dtype, channels, height, width, channels_last):
    """The CPU kernels' vector paths: whole channel blocks (16 float32 or 8 float64 channels) and a partial one,
    rows of 8 pixels and a ragged remainder, odd plane sizes (the output and gradient stores then fall back from
    aligned streaming), RoIs in any order (they are pooled in top-edge order), a NaN RoI among them (it sorts last
    and contributes nothing; torchvision is given the others)."""
    x = torch.randn(2, channels, height, width, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = random_rois(60, 2, image_hw=(4 * height, 4 * width), max_size=60.0, dtype=dtype)
    rois[7, 1:] = float("nan")
    keep = torch.arange(60) != 7
    for output_size in [(7, 7), (3, 5)]:
        kw = dict(output_size=output_size, spatial_scale=0.25, sampling_ratio=2, aligned=True)
        xa = x.detach().clone().requires_grad_()
        xt = x.detach().clone().requires_grad_()
        ours = ops.roi_align(xa, rois, **kw)
        theirs = torchvision.ops.roi_align(xt, rois[keep], **kw)
        torch.testing.assert_close(ours[keep], theirs, **TOL[dtype])
        assert torch.isfinite(ours[7]).all()
        grad = torch.randn_like(ours)
        ours.backward(grad)
        theirs.backward(grad[keep])
        torch.testing.assert_close(xa.grad, xt.grad, **TOL[dtype])
        pooled, argmax = torch.ops.fasterrcnn_ext.roi_pool(x, rois, 0.25, *output_size)
        ref = torchvision.ops.roi_pool(x, rois[keep], output_size, 0.25)
        assert torch.equal(pooled[keep], ref)
        assert (argmax[7] == -1).all()
        picked = x.reshape(2, channels, -1)[rois[:, 0].long()].gather(2, argmax.clamp(min=0).flatten(2))
        valid = argmax.flatten(2) >= 0
        assert torch.equal(picked[valid], pooled.flatten(2)[valid])  # the argmax points at the maximum


def test_list_of_boxes_equals_rois(device):
    x = torch.randn(3, 4, 20, 20, device=device)
    rois = random_rois(30, 3, image_hw=(20, 20), device=device)
    boxes = as_box_list(rois, 3)
    stacked = torch.cat([torch.cat([torch.full((len(b), 1), float(i), device=device), b], 1)
                         for i, b in enumerate(boxes)])
    torch.testing.assert_close(ops.roi_align(x, boxes, 3), ops.roi_align(x, stacked, 3))
    torch.testing.assert_close(ops.roi_align(x, boxes, 3), torchvision.ops.roi_align(x, boxes, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_float32(device, dtype):
    x = torch.randn(1, 8, 16, 16, device=device)
    rois = random_rois(20, 1, image_hw=(16, 16), device=device)
    ours = ops.roi_align(x.to(dtype), rois.to(dtype), 4, 1.0, 2, True)
    reference = torchvision.ops.roi_align(x.to(dtype).float(), rois.to(dtype).float(), 4, 1.0, 2, True)
    assert ours.dtype == dtype
    # Only the final rounding to the half type differs from a float32 computation.
    torch.testing.assert_close(ours.float(), reference, rtol=0, atol=float(torch.finfo(dtype).eps) * 4)


def test_gradcheck(device):
    x = torch.randn(1, 2, 8, 9, dtype=torch.float64, device=device, requires_grad=True)
    rois = random_rois(5, 1, image_hw=(8, 9), max_size=6, dtype=torch.float64, device=device)
    for aligned in (False, True):
        assert torch.autograd.gradcheck(lambda t, aligned=aligned: ops.roi_align(t, rois, 3, 1.0, 2, aligned), (x,))


def test_empty_boxes(device):
    x = torch.randn(2, 3, 10, 10, device=device, requires_grad=True)
    out = ops.roi_align(x, torch.empty(0, 5, device=device), (4, 5))
    assert out.shape == (0, 3, 4, 5)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert ops.roi_align(x, [torch.empty(0, 4, device=device)] * 2, 2).shape == (0, 3, 2, 2)


def test_nan_and_enormous_rois_finish_with_defined_output(device):
    x = torch.randn(1, 4, 32, 32, device=device, requires_grad=True)
    rois = torch.tensor([[0, float("nan"), 0, 5, 5],
                         [0, -1e30, -1e30, 1e30, 1e30],
                         [0, 0, 0, 1e30, 1e30],
                         [0, float("inf"), 1, float("inf"), 3],
                         [0, 1, 1, 8, 8]], device=device)
    out = ops.roi_align(x, rois, 7, 1.0, -1, False)
    assert torch.isfinite(out).all()
    # The sane RoI is unaffected by its neighbours.
    torch.testing.assert_close(out[4:], torchvision.ops.roi_align(x, rois[4:], 7, 1.0, -1, False))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_backward_is_deterministic_and_thread_count_independent():
    x = torch.randn(2, 64, 40, 40, requires_grad=True)
    rois = random_rois(300, 2, image_hw=(40, 40))
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            x.grad = None
            ops.roi_align(x, rois, 7, 1.0, 2, True).pow(2).sum().backward()
            grads.append(x.grad.clone())
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


@pytest.mark.parametrize(
    "input, rois, kw, message",
    [
        (torch.rand(2, 3, 8, 8), torch.tensor([[2.0, 0, 0, 4, 4]]), {}, r"rois\[0, 0\] = 2 is not a valid batch index"),
        (torch.rand(2, 3, 8, 8), torch.tensor([[-1.0, 0, 0, 4, 4]]), {},
         r"rois\[0, 0\] = -1 is not a valid batch index"),
        (torch.rand(2, 3, 8, 8), torch.rand(4, 4), {}, r"boxes must be a Tensor\[K, 5\]"),
        (torch.rand(2, 3, 8, 8), torch.rand(4, 6), {}, r"boxes must be a Tensor\[K, 5\]"),
        (torch.rand(2, 3, 8, 8), torch.zeros(1, 5), {"output_size": 0}, r"output_size must be positive"),
        (torch.rand(2, 3, 8, 8), torch.zeros(1, 5), {"spatial_scale": 0.0}, r"spatial_scale must be positive"),
        (torch.rand(2, 3, 8, 8), torch.zeros(1, 5), {"spatial_scale": -1.0}, r"spatial_scale must be positive"),
        (torch.rand(2, 3, 8, 8), torch.zeros(1, 5, dtype=torch.float64), {}, r"same dtype, got Float and Double"),
        (torch.randint(0, 5, (2, 3, 8, 8)), torch.zeros(1, 5), {}, r"input must be a floating-point tensor"),
        (torch.rand(3, 8, 8), torch.zeros(1, 5), {}, r"input must be a \[N, C, H, W\] tensor"),
    ],
)
def test_bad_input(input, rois, kw, message):
    args = dict(output_size=2, spatial_scale=1.0)
    args.update(kw)
    with pytest.raises((RuntimeError, ValueError), match=message):
        ops.roi_align(input, rois, **args)


def test_bad_box_list():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"boxes\[1\] must be a Tensor\[L, 4\]"):
        ops.roi_align(x, [torch.rand(2, 4), torch.rand(2, 5)], 2)


def test_module():
    m = ops.RoIAlign((3, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    t = torchvision.ops.RoIAlign((3, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    x = torch.randn(1, 4, 16, 16)
    rois = random_rois(10, 1, image_hw=(32, 32))
    torch.testing.assert_close(m(x, rois), t(x, rois))
    assert "spatial_scale=0.5" in repr(m)


def test_opcheck(device):
    x = torch.randn(2, 3, 10, 12, device=device)
    rois = random_rois(6, 2, image_hw=(20, 24), device=device)
    for aligned in (False, True):
        torch.library.opcheck(torch.ops.fasterrcnn_ext.roi_align.default, (x, rois, 0.5, 3, 2, 2, aligned))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_deterministic_backward_equals_atomic_backward():
    x = torch.randn(2, 16, 30, 30, device="cuda", dtype=torch.float64, requires_grad=True)
    rois = random_rois(100, 2, image_hw=(30, 30), dtype=torch.float64, device="cuda")
    ops.roi_align(x, rois, 7, 1.0, 2, True).sum().backward()
    atomic = x.grad.clone()
    x.grad = None
    torch.use_deterministic_algorithms(True)
    try:
        ops.roi_align(x, rois, 7, 1.0, 2, True).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(x.grad, atomic)


def test_opcheck_backward_ops(device):
    """The backward ops are ops of their own: opcheck them directly too."""
    rois = random_rois(6, 2, image_hw=(20, 24), device=device)
    grad = torch.randn(6, 3, 2, 2, device=device)
    torch.library.opcheck(torch.ops.fasterrcnn_ext._roi_align_backward.default,
                          (grad, rois, 0.5, 2, 2, 2, 3, 10, 12, 2, True))
    torch.library.opcheck(torch.ops.fasterrcnn_ext._multi_scale_roi_align_backward.default,
                          (grad, rois, [0.5, 0.25], 2, 2, 2, False, 224.0, 4.0, 2, 3, [10, 5], [12, 6]))
    x = torch.randn(2, 3, 10, 12, device=device)
    _, argmax = torch.ops.fasterrcnn_ext.roi_pool(x, rois, 0.5, 2, 2)
    torch.library.opcheck(torch.ops.fasterrcnn_ext._roi_pool_backward.default,
                          (grad, rois, argmax, 0.5, 2, 2, 2, 3, 10, 12))


def _half_map(dtype, layout, device):
    """A [2, 8, 24, 30] map of the half type in the given layout."""
    if layout == "non_contiguous":
        x = torch.randn(2, 16, 24, 60, device=device).to(dtype)[:, ::2, :, ::2]
        assert not x.is_contiguous()
        return x
    x = torch.randn(2, 8, 24, 30, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("aligned", [False, True])
def test_half_map_with_float32_rois_reads_the_map_as_it_is(device, dtype, layout, aligned):
    """A float16/bfloat16 map with float32 RoIs (a .bfloat16() detector; autocast): the map is read in its dtype and
    pooled in float32, so the result is the float32 path's on the same map upcast, rounded once to the map's dtype;
    the gradient likewise. The RoIs keep float32 coordinates (bfloat16 ones would step by 0.25 pixels here)."""
    x = _half_map(dtype, layout, device)
    rois = random_rois(40, 2, image_hw=(96, 120), device=device)
    rois[0, 1:] = torch.tensor([10.3, 20.7, 70.1, 80.9])  # not representable in bfloat16
    kw = dict(output_size=(5, 4), spatial_scale=0.25, sampling_ratio=-1, aligned=aligned)
    grad = torch.randn(40, 8, 5, 4, device=device).to(dtype)
    out, g = _forward_backward_with(ops.roi_align, x, rois, grad, **kw)
    ref, g_ref = _forward_backward_with(ops.roi_align, x.float(), rois, grad.float(), **kw)
    assert out.dtype == g.dtype == dtype
    exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=float(torch.finfo(dtype).eps), atol=1e-5)
    torch.testing.assert_close(out, ref.to(dtype), **exact)
    torch.testing.assert_close(g, g_ref.to(dtype), **exact)
    theirs = torchvision.ops.roi_align(x.float(), rois, **kw)
    torch.testing.assert_close(out.float(), theirs, rtol=float(torch.finfo(dtype).eps), atol=2e-5)
    torch.library.opcheck(torch.ops.fasterrcnn_ext.roi_align.default, (x, rois, 0.25, 5, 4, -1, aligned))


def _forward_backward_with(fn, x, rois, grad, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, rois, **kw)
    out.backward(grad)
    return out.detach(), x.grad


@pytest.mark.parametrize(
    "map_dtype, rois_dtype",
    [(torch.bfloat16, torch.float64), (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16),
     (torch.float64, torch.float32)],
)
def test_mixed_dtypes_still_refused(map_dtype, rois_dtype):
    """Only float32 RoIs join a map of another dtype (float16/bfloat16); every other mix is an error naming both."""
    x = torch.rand(1, 3, 8, 8).to(map_dtype)
    rois = torch.tensor([[0.0, 0, 0, 4, 4]]).to(rois_dtype)
    names = {torch.bfloat16: "BFloat16", torch.float16: "Half", torch.float32: "Float", torch.float64: "Double"}
    message = f"{names[map_dtype]}.*{names[rois_dtype]}"
    for op in (lambda: ops.roi_align(x, rois, 2), lambda: ops.roi_pool(x, rois, 2),
               lambda: ops.multi_scale_roi_align([x], rois, 2, [1.0])):
        with pytest.raises(RuntimeError, match=message):
            op()


def test_multi_scale_half_pyramid_with_float32_rois(device):
    """The fused multi-level op and its per-element twin (the CUDA forward's steps) on a bfloat16 pyramid with
    float32 RoIs: the float32 path's result on the upcast pyramid, rounded once; a pyramid of mixed dtypes is
    refused."""
    feats = [torch.randn(2, 6, 32 // 2 ** i, 40 // 2 ** i, device=device).to(torch.bfloat16) for i in range(3)]
    feats[1] = feats[1].contiguous(memory_format=torch.channels_last)
    rois = random_rois(50, 2, image_hw=(128, 160), max_size=120.0, device=device)
    scales = [0.25, 0.125, 0.0625]
    x = [f.detach().requires_grad_() for f in feats]
    out = ops.multi_scale_roi_align(x, rois, 3, scales, 2, True)
    xf = [f.detach().float().requires_grad_() for f in feats]
    ref = ops.multi_scale_roi_align(xf, rois, 3, scales, 2, True)
    exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=2 ** -7, atol=1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), **exact)
    grad = torch.randn_like(ref).to(torch.bfloat16)
    out.backward(grad)
    ref.backward(grad.float())
    for a, b in zip(x, xf):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad, b.grad.to(torch.bfloat16), **exact)
    twin = torch.ops.fasterrcnn_ext._roi_align_per_element(feats, rois, scales, 3, 3, 2, True, 224.0, 4.0, 1 << 20)
    torch.testing.assert_close(twin.float(), out.float(), rtol=2 ** -7, atol=1e-5)
    torch.library.opcheck(torch.ops.fasterrcnn_ext.multi_scale_roi_align.default,
                          (feats, rois, scales, 3, 3, 2, True, 224.0, 4.0))
    torch.library.opcheck(torch.ops.fasterrcnn_ext._roi_align_per_element.default,
                          (feats, rois, scales, 3, 3, 2, True, 224.0, 4.0, 0))
    with pytest.raises(RuntimeError, match=r"features\[1\] is Float"):
        ops.multi_scale_roi_align([feats[0], feats[1].float(), feats[2]], rois, 3, scales, 2, True)
