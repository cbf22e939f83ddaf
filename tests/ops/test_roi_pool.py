import subprocess
import sys

import pytest
import torch
import torchvision

import fasterrcnn_ext.ops as ops
from tests.ops.roi_inputs import CPU_POOL_KERNELS, cpu_pool_kernel, random_rois


# Every test here runs once per CPU kernel of roi_pool this machine can run (roi_inputs.py), the AVX-512 kernel's
# CPU twin included; a CUDA test, which no CPU kernel takes part in, runs once.
@pytest.fixture(autouse=True, params=CPU_POOL_KERNELS)
def cpu_kernel(request):
    if request.param != CPU_POOL_KERNELS[0] and request.node.get_closest_marker("cuda"):
        pytest.skip("a CUDA test: the CPU kernel plays no part, it runs with the first one only")
    with cpu_pool_kernel(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torchvision_exactly(device, dtype, channels_last):
    x = torch.randn(2, 8, 24, 30, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = random_rois(50, 2, image_hw=(96, 120), dtype=dtype, device=device)
    xa = x.detach().clone().requires_grad_()
    xt = x.detach().clone().requires_grad_()
    ours = ops.roi_pool(xa, rois, (5, 4), 0.25)
    theirs = torchvision.ops.roi_pool(xt, rois, (5, 4), 0.25)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    # torchvision's CUDA backward sums with atomicAdd in no fixed order: equal up to float rounding there.
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-6, atol=1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(xa.grad, xt.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_nan_and_signed_zeros_pick_torchvisions_argmax(device, dtype):
    """Equal maxima go to the first pixel in row-major order and NaN never wins, as in torchvision's sequential
    scan: the CPU kernel scans a bin's even and odd columns as two chains and merges them (roi_pool_kernel.cpp)."""
    g = torch.Generator().manual_seed(0)
    # Few distinct values, so that most bins hold their maximum several times, in both column parities.
    values = torch.tensor([-0.0, 0.0, 1.0, -1.0, float("nan"), -float("inf")], dtype=dtype)
    x = values[torch.randint(0, len(values), (2, 37, 21, 26), generator=g)].to(device)
    rois = random_rois(60, 2, image_hw=(42, 52), dtype=dtype, device=device)
    ours, our_argmax = torch.ops.fasterrcnn_ext.roi_pool(x, rois, 0.5, 3, 4)
    theirs, their_argmax = torch.ops.torchvision.roi_pool(x, rois, 0.5, 3, 4)
    assert torch.equal(our_argmax, their_argmax)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    assert torch.equal(ours.signbit(), theirs.signbit())  # -0.0 and 0.0 are equal maxima: the first one's sign


def test_large_outputs_match_torchvision_exactly():
    """Output and argmax of several MB come from huge-page-advised memory (csrc/ops/cpu/large_output.h)."""
    x = torch.randn(2, 64, 48, 64, requires_grad=True)
    rois = random_rois(700, 2, image_hw=(96, 128), max_size=60.0)
    ours = ops.roi_pool(x, rois, 7, 0.5)
    theirs = torchvision.ops.roi_pool(x, rois, 7, 0.5)
    assert torch.equal(ours, theirs)
    grad = torch.randn_like(ours)
    assert torch.equal(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(device, dtype):
    x = torch.randn(1, 4, 16, 16, device=device).to(dtype)
    rois = random_rois(20, 1, image_hw=(16, 16), device=device).to(dtype)
    torch.testing.assert_close(ops.roi_pool(x, rois, 3).float(), torchvision.ops.roi_pool(x.float(), rois.float(), 3),
                               rtol=0, atol=0)


def test_gradcheck(device):
    x = torch.randn(1, 2, 8, 9, dtype=torch.float64, device=device, requires_grad=True)
    rois = random_rois(5, 1, image_hw=(8, 9), max_size=6, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda t: ops.roi_pool(t, rois, 3, 1.0), (x,))


def test_empty_and_degenerate(device):
    x = torch.randn(2, 3, 10, 10, device=device)
    assert ops.roi_pool(x, torch.empty(0, 5, device=device), 2).shape == (0, 3, 2, 2)
    rois = torch.tensor([[0, 50.0, 50, 60, 60],      # entirely outside: empty bins are 0
                         [1, float("nan"), 0, 4, 4],  # NaN: every bin empty
                         [0, -1e30, -1e30, 1e30, 1e30]], device=device)
    out = ops.roi_pool(x, rois, 2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


def test_bad_batch_index():
    with pytest.raises(RuntimeError, match=r"roi_pool: rois\[1, 0\] = 5 is not a valid batch index"):
        ops.roi_pool(torch.rand(2, 3, 8, 8), torch.tensor([[0.0, 0, 0, 2, 2], [5.0, 0, 0, 2, 2]]), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inference_op_gives_the_forwards_values(device, dtype):
    """Without a gradient to compute, ops.roi_pool calls _roi_pool_values, which does not write the argmax."""
    x = torch.randn(2, 40, 19, 23, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    rois = random_rois(30, 2, image_hw=(38, 46), device=device).to(dtype)
    values = torch.ops.fasterrcnn_ext._roi_pool_values(x, rois, 0.5, 3, 2)
    full, _ = torch.ops.fasterrcnn_ext.roi_pool(x, rois, 0.5, 3, 2)
    assert torch.equal(values, full)
    with torch.no_grad():
        assert torch.equal(ops.roi_pool(x.requires_grad_(), rois, (3, 2), 0.5), full)
    torch.library.opcheck(torch.ops.fasterrcnn_ext._roi_pool_values.default, (x.detach(), rois, 0.5, 3, 2))
    if device == "cpu":
        with pytest.raises(RuntimeError, match="not a valid batch index"):
            torch.ops.fasterrcnn_ext._roi_pool_values(x, rois + torch.tensor([5.0, 0, 0, 0, 0]).to(dtype), 0.5, 3, 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("op", ["roi_pool", "_roi_pool_values"])
def test_cuda_bad_batch_index_trips_a_device_assert(op):
    """On CUDA a batch index outside [0, N) is found by the kernel (checking on the host would cost a sync): a
    device-side assert, which poisons the CUDA context, so it is provoked in a child process."""
    code = (f"import torch, fasterrcnn_ext\n"
            f"x = torch.rand(2, 3, 8, 8, device='cuda')\n"
            f"rois = torch.tensor([[5.0, 0, 0, 4, 4]], device='cuda')\n"
            f"torch.ops.fasterrcnn_ext.{op}(x, rois, 1.0, 2, 2)\n"
            f"torch.cuda.synchronize()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "batch index is outside" in result.stderr or "device-side assert" in result.stderr, result.stderr[-2000:]


def test_module_and_opcheck(device):
    m, t = ops.RoIPool(3, 0.5), torchvision.ops.RoIPool(3, 0.5)
    x = torch.randn(2, 3, 10, 12, device=device)
    rois = random_rois(6, 2, image_hw=(20, 24), device=device)
    torch.testing.assert_close(m(x, rois), t(x, rois))
    torch.library.opcheck(torch.ops.fasterrcnn_ext.roi_pool.default, (x, rois, 0.5, 3, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
def test_half_map_with_float32_rois_reads_the_map_as_it_is(device, dtype, layout):
    """A float16/bfloat16 map with float32 RoIs: torchvision's float32 result on the upcast map (a max is exact in
    any dtype), the same argmax, and the gradient the float32 path gives, in the map's dtype."""
    if layout == "non_contiguous":
        x = torch.randn(2, 16, 19, 46, device=device).to(dtype)[:, ::2, :, ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(2, 8, 19, 23, device=device).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    rois = random_rois(30, 2, image_hw=(38, 46), device=device)
    rois[0, 1:] = torch.tensor([10.3, 20.7, 30.1, 35.9])  # not representable in bfloat16
    out, argmax = torch.ops.fasterrcnn_ext.roi_pool(x, rois, 0.5, 3, 2)
    ref, ref_argmax = torch.ops.fasterrcnn_ext.roi_pool(x.float(), rois, 0.5, 3, 2)
    assert out.dtype == dtype
    assert torch.equal(out.float(), ref) and torch.equal(argmax, ref_argmax)
    assert torch.equal(out.float(), torchvision.ops.roi_pool(x.float(), rois, (3, 2), 0.5))
    assert torch.equal(torch.ops.fasterrcnn_ext._roi_pool_values(x, rois, 0.5, 3, 2), out)
    xg = x.detach().requires_grad_()
    xf = x.detach().float().requires_grad_()
    grad = torch.randn(30, 8, 3, 2, device=device).to(dtype)
    ops.roi_pool(xg, rois, (3, 2), 0.5).backward(grad)
    ops.roi_pool(xf, rois, (3, 2), 0.5).backward(grad.float())
    assert xg.grad.dtype == dtype
    torch.testing.assert_close(xg.grad, xf.grad.to(dtype), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fasterrcnn_ext.roi_pool.default, (x, rois, 0.5, 3, 2))
    torch.library.opcheck(torch.ops.fasterrcnn_ext._roi_pool_values.default, (x, rois, 0.5, 3, 2))
