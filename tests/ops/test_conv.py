"""conv3x3_winograd (Winograd F(4x4, 3x3), CPU inference) against F.conv2d: float64 to rounding, float32 within
the documented 1e-5 of the output's magnitude, on awkward shapes; bad input; opcheck."""

import pytest
import torch
import torch.nn.functional as F

import fasterrcnn_ext.ops as ops


def reference(x, w, b, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    return y.relu() if relu else y


@pytest.mark.parametrize("shape", [
    (1, 3, 5, 1, 1),      # one pixel: the tile is all padding but its centre
    (2, 17, 9, 7, 13),    # sizes not multiples of the 4x4 tile; channels not multiples of the SIMD width
    (1, 64, 40, 20, 36),  # SIMD lanes plus a tail of channels
    (3, 8, 8, 4, 4),      # exactly one tile per image
])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float64_equals_direct_convolution(shape, relu, with_bias):
    n, c, k, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(k, c, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(k, generator=g, dtype=torch.float64) if with_bias else None
    got = ops.conv3x3_winograd(x, ops.winograd_weight(weight), bias, relu)
    assert got.shape == (n, k, h, w) and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, reference(x, weight, bias, relu), rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_within_documented_error(channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 128, 30, 45, generator=g).relu()  # post-ReLU activations, as in the networks
    weight = torch.randn(96, 128, 3, 3, generator=g) * 0.03
    bias = torch.randn(96, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = ops.conv3x3_winograd(x, ops.winograd_weight(weight), bias)
    expected = reference(x, weight, bias, False)
    error = (got.double() - expected).abs().max() / expected.abs().max()
    direct_error = (F.conv2d(x, weight, bias, padding=1).double() - expected).abs().max() / expected.abs().max()
    assert error < 2e-5
    assert direct_error < error  # the price of Winograd: it is measurably less exact than the direct convolution


def test_non_contiguous_input_and_empty_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 12, 20, generator=g, dtype=torch.float64)[:, :, :, ::2]  # strided width
    weight = torch.randn(8, 16, 3, 3, generator=g, dtype=torch.float64)
    u = ops.winograd_weight(weight)
    torch.testing.assert_close(ops.conv3x3_winograd(x, u), reference(x, weight, None, False), rtol=1e-12, atol=1e-11)
    empty = ops.conv3x3_winograd(torch.zeros(0, 16, 5, 5, dtype=torch.float64), u)
    assert empty.shape == (0, 8, 5, 5)


def test_nan_and_inf_propagate_like_the_direct_convolution():
    x = torch.ones(1, 4, 12, 12)
    x[0, 1, 5, 6] = float("nan")
    x[0, 2, 1, 1] = float("inf")
    weight = torch.rand(3, 4, 3, 3) + 0.1  # positive: inf stays inf, nothing cancels it
    got = ops.conv3x3_winograd(x, ops.winograd_weight(weight), None, True)
    expected = reference(x, weight, None, True).float()
    # Winograd mixes a whole 6x6 input tile into each 4x4 output tile, so a NaN or inf reaches at least the outputs
    # the direct convolution gives it, and stays inside its tiles.
    assert (got.isnan() | got.isinf())[expected.isnan() | expected.isinf()].all()
    finite = torch.isfinite(got)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5)
    assert finite[:, :, 8:, :].all() and finite[:, :, :, 8:].all()  # other tiles unaffected


@pytest.mark.parametrize("make, message", [
    (lambda: (torch.randn(2, 3, 4), torch.randn(36, 3, 5), None), "input must be"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(16, 3, 5), None), "transformed_weight must be"),
    (lambda: (torch.randn(1, 4, 4, 4), torch.randn(36, 3, 5), None), "transformed_weight must be"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(36, 3, 5), torch.randn(4)), "bias must be"),
    (lambda: (torch.randn(1, 3, 4, 4), torch.randn(36, 3, 5, dtype=torch.float64), None), "same dtype"),
    (lambda: (torch.randint(0, 3, (1, 3, 4, 4)), torch.randn(36, 3, 5), None), "float32 or float64"),
])
def test_bad_input(make, message):
    x, u, b = make()
    with pytest.raises(RuntimeError, match=message):
        ops.conv3x3_winograd(x, u, b)


def test_winograd_weight_rejects_other_kernels():
    with pytest.raises(ValueError, match=r"\[K, C, 3, 3\]"):
        ops.winograd_weight(torch.randn(4, 3, 5, 5))


def test_opcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, 9, generator=g)
    u = ops.winograd_weight(torch.randn(5, 6, 3, 3, generator=g))
    for args in ((x, u, torch.randn(5, generator=g), True), (x, u, None, False)):
        torch.library.opcheck(torch.ops.fasterrcnn_ext.conv3x3_winograd.default, args)
