"""The deterministic CUDA backward of RoIAlign and RoIPool: fixed-point integer atomics (csrc/ops/common/fixed_point.h).

Its CPU twins, _roi_align_backward_fixed_point and _roi_pool_backward_fixed_point, run the same steps serially: they
must match the float64 backward, give the same bits whatever order the RoIs come in (what integer atomics
guarantee on the GPU), and propagate NaN and infinities as float addition does in any order.
"""

import pytest
import torch

import fasterrcnn_ext  # noqa: F401 (registers the ops)

from .roi_inputs import random_rois

E = torch.ops.fasterrcnn_ext
LEVELS = dict(scales=[0.5, 0.25], heights=[20, 10], widths=[24, 12])


def align_fixed(grad, rois, scales, heights, widths, pooled=(3, 2), sampling_ratio=2, aligned=True, batch=2):
    return E._roi_align_backward_fixed_point(grad, rois, scales, pooled[0], pooled[1], sampling_ratio, aligned, 224.0,
                                             4.0, batch, grad.size(1), heights, widths)


def align_reference(grad, rois, scales, heights, widths, pooled=(3, 2), sampling_ratio=2, aligned=True, batch=2):
    """The float64 backward (the CPU's own kernel)."""
    return E._multi_scale_roi_align_backward(grad.double(), rois.double(), scales, pooled[0], pooled[1],
                                             sampling_ratio, aligned, 224.0, 4.0, batch, grad.size(1), heights,
                                             widths)


def fpn_rois(k, device="cpu", dtype=torch.float32):
    """RoIs whose sizes spread them over both levels (canonical 224 at level 4: level 2 and 3 here)."""
    rois = random_rois(k, 2, image_hw=(40, 48), min_size=2.0, max_size=40.0, dtype=torch.float64)
    rois[: k // 2, 3:] = rois[: k // 2, 1:3] + 150.0  # big RoIs: the coarser level
    return rois.to(dtype=dtype, device=device)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_twin_matches_float64_backward(sampling_ratio, aligned):
    rois = fpn_rois(40, dtype=torch.float64)
    grad = torch.randn(40, 3, 3, 2, dtype=torch.float64)
    ours = align_fixed(grad, rois, **LEVELS, sampling_ratio=sampling_ratio, aligned=aligned)
    ref = align_reference(grad, rois, **LEVELS, sampling_ratio=sampling_ratio, aligned=aligned)
    assert ours[0].abs().sum() > 0 and ours[1].abs().sum() > 0  # both levels took gradient
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_roi_align_twin_in_low_precision(dtype, atol):
    rois = fpn_rois(30, dtype=dtype)
    grad = torch.randn(30, 4, 3, 2).to(dtype)
    ours = align_fixed(grad, rois, **LEVELS)
    ref = align_reference(grad, rois, **LEVELS)
    for o, r in zip(ours, ref):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double(), r, rtol=1e-2, atol=atol)


def test_roi_align_twin_does_not_depend_on_the_order_of_the_rois():
    rois = fpn_rois(60)
    grad = torch.randn(60, 3, 3, 2) * torch.logspace(-6, 6, 60).view(60, 1, 1, 1)  # wide range: float sums would vary
    base = align_fixed(grad, rois, **LEVELS)
    for _ in range(3):
        perm = torch.randperm(60)
        for a, b in zip(base, align_fixed(grad[perm], rois[perm], **LEVELS)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_roi_align_twin_scales_to_the_gradient(magnitude):
    """The fixed-point scale follows max|grad|: tiny gradients keep their precision, huge ones do not overflow."""
    rois = fpn_rois(20)
    grad = torch.randn(20, 2, 3, 2)
    ours = align_fixed(grad * magnitude, rois, **LEVELS)
    ref = align_reference(grad, rois, **LEVELS)
    for o, r in zip(ours, ref):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double() / magnitude, r, rtol=1e-5, atol=1e-5)


def test_roi_align_twin_many_rois_on_one_element_do_not_overflow():
    """2,000 copies of one RoI with the largest gradient everywhere: the sum's bound is what the scale is sized for."""
    rois = torch.tensor([[0.0, 4.0, 4.0, 12.0, 12.0]], dtype=torch.float64).repeat(2000, 1)
    grad = torch.full((2000, 1, 3, 2), 3.0e38, dtype=torch.float64)
    ours = align_fixed(grad, rois, [1.0], [16], [16], batch=1)[0]
    ref = align_reference(grad, rois, [1.0], [16], [16], batch=1)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)


def test_roi_align_twin_propagates_nan_and_infinities_as_float_sums_do():
    rois = fpn_rois(30, dtype=torch.float64)
    grad = torch.randn(30, 2, 3, 2, dtype=torch.float64)
    grad[20, :, 0, 0] = float("inf")  # rows of small RoIs (fpn_rois: the second half), whose samples land inside
    grad[21, 1, 1, 1] = float("nan")
    grad[22, :, 2, 1] = float("-inf")
    ours = align_fixed(grad, rois, **LEVELS)
    ref = align_reference(grad, rois, **LEVELS)
    for o, r in zip(ours, ref):
        assert torch.equal(o.isnan(), r.isnan()) and torch.equal(o.isinf(), r.isinf())
        assert torch.equal(o[o.isinf()], r[r.isinf()])  # the sign too
        finite = r.isfinite()
        torch.testing.assert_close(o[finite], r[finite], rtol=0, atol=1e-12)
    assert any(o.isnan().any() for o in ours) and any(o.isinf().any() for o in ours)


def test_opposite_infinities_on_one_element_give_nan():
    rois = torch.tensor([[0.0, 2.0, 2.0, 6.0, 6.0]] * 2, dtype=torch.float32)
    grad = torch.zeros(2, 1, 1, 1)
    grad[0] = float("inf")
    grad[1] = float("-inf")
    (out,) = align_fixed(grad, rois, [1.0], [8], [8], pooled=(1, 1), batch=1)
    assert out.isnan().any() and not out.isinf().any()
    (plus,) = align_fixed(grad[:1], rois[:1], [1.0], [8], [8], pooled=(1, 1), batch=1)
    assert plus.isposinf().any() and not plus.isnan().any()


def test_empty_and_zero_gradients():
    (out,) = align_fixed(torch.empty(0, 3, 3, 2), torch.empty(0, 5), [0.5], [10], [12])
    assert out.shape == (2, 3, 10, 12) and not out.any()
    (out,) = align_fixed(torch.zeros(4, 3, 3, 2), random_rois(4, 2, image_hw=(20, 24)), [0.5], [10], [12])
    assert not out.any()
    out = E._roi_pool_backward_fixed_point(torch.empty(0, 3, 2, 2), torch.empty(0, 5),
                                           torch.empty(0, 3, 2, 2, dtype=torch.long), 0.5, 2, 2, 2, 3, 10, 12)
    assert out.shape == (2, 3, 10, 12) and not out.any()


def test_bad_batch_index_is_an_error_naming_the_op():
    rois = random_rois(4, 2, image_hw=(20, 24))
    rois[2, 0] = 5
    with pytest.raises(RuntimeError, match="_roi_align_backward_fixed_point"):
        align_fixed(torch.randn(4, 3, 3, 2), rois, [0.5], [10], [12])
    with pytest.raises(RuntimeError, match="_roi_pool_backward_fixed_point"):
        E._roi_pool_backward_fixed_point(torch.randn(4, 3, 2, 2), rois, torch.zeros(4, 3, 2, 2, dtype=torch.long),
                                         0.5, 2, 2, 2, 3, 10, 12)


def pool_inputs(k=50, dtype=torch.float64):
    x = torch.randn(2, 3, 20, 24, dtype=dtype)
    rois = random_rois(k, 2, image_hw=(40, 48), dtype=dtype)
    _, argmax = E.roi_pool(x, rois, 0.5, 3, 2)
    return rois, argmax


def test_roi_pool_twin_matches_backward_and_ignores_order():
    rois, argmax = pool_inputs()
    grad = torch.randn(50, 3, 3, 2, dtype=torch.float64)
    ours = E._roi_pool_backward_fixed_point(grad, rois, argmax, 0.5, 3, 2, 2, 3, 20, 24)
    ref = E._roi_pool_backward(grad, rois, argmax, 0.5, 3, 2, 2, 3, 20, 24)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    perm = torch.randperm(50)
    g32 = (grad * torch.logspace(-5, 5, 50, dtype=torch.float64).view(50, 1, 1, 1)).float()
    base = E._roi_pool_backward_fixed_point(g32, rois.float(), argmax, 0.5, 3, 2, 2, 3, 20, 24)
    shuffled = E._roi_pool_backward_fixed_point(g32[perm], rois.float()[perm], argmax[perm], 0.5, 3, 2, 2, 3, 20, 24)
    assert torch.equal(base, shuffled)


def test_roi_pool_twin_nonfinite_and_out_of_plane_argmax():
    rois, argmax = pool_inputs(10)
    grad = torch.randn(10, 3, 3, 2, dtype=torch.float64)
    grad[0, 0, 0, 0] = float("nan")
    grad[3, 2, 1, 1] = float("-inf")
    argmax = argmax.clone()
    argmax[5, 1, 0, 0] = 20 * 24  # outside the plane: skipped, as by the backward
    ours = E._roi_pool_backward_fixed_point(grad, rois, argmax, 0.5, 3, 2, 2, 3, 20, 24)
    ref = E._roi_pool_backward(grad, rois, argmax, 0.5, 3, 2, 2, 3, 20, 24)
    assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isneginf(), ref.isneginf())
    finite = ref.isfinite()
    torch.testing.assert_close(ours[finite], ref[finite], rtol=0, atol=1e-12)


def test_opcheck(device):
    rois = random_rois(6, 2, image_hw=(20, 24), device=device)
    grad = torch.randn(6, 3, 2, 2, device=device)
    torch.library.opcheck(torch.ops.fasterrcnn_ext._roi_align_backward_fixed_point.default,
                          (grad, rois, [0.5, 0.25], 2, 2, 2, False, 224.0, 4.0, 2, 3, [10, 5], [12, 6]))
    x = torch.randn(2, 3, 10, 12, device=device)
    _, argmax = E.roi_pool(x, rois, 0.5, 2, 2)
    torch.library.opcheck(torch.ops.fasterrcnn_ext._roi_pool_backward_fixed_point.default,
                          (grad, rois, argmax, 0.5, 2, 2, 2, 3, 10, 12))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_deterministic_backward_is_the_cpu_twin_bit_for_bit():
    """Integer sums do not depend on the order the GPU threads add in: the CUDA result is the CPU twin's."""
    rois = fpn_rois(200)
    grad = torch.randn(200, 64, 3, 2) * torch.logspace(-4, 4, 200).view(200, 1, 1, 1)
    cpu = align_fixed(grad, rois, **LEVELS)
    features = [torch.randn(2, 64, h, w, device="cuda", requires_grad=True)
                for h, w in zip(LEVELS["heights"], LEVELS["widths"])]
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            out = E.multi_scale_roi_align(features, rois.cuda(), LEVELS["scales"], 3, 2, 2, True)
            grads = torch.autograd.grad(out, features, grad.cuda())
            for g, c in zip(grads, cpu):
                assert torch.equal(g.cpu(), c)
        x = torch.randn(2, 64, 20, 24, device="cuda", requires_grad=True)
        pooled, argmax = E.roi_pool(x, rois.cuda(), 0.5, 3, 2)
        (gx,) = torch.autograd.grad(pooled, x, grad.cuda())
        twin = E._roi_pool_backward_fixed_point(grad, rois, argmax.cpu(), 0.5, 3, 2, 2, 64, 20, 24)
        assert torch.equal(gx.cpu(), twin)
    finally:
        torch.use_deterministic_algorithms(False)
