"""Winograd F(4x4, 3x3) convolution for CPU inference: 3x3, stride 1, padding 1 convolutions (most of a detector's
FPN, RPN head and ResNet blocks) with 4 times fewer multiply-adds than a direct convolution. In float32 the results
differ from F.conv2d's by about 1e-5 of the output's magnitude (F.conv2d's own error is about 3e-7).

Shapes: N images, C input channels, K output channels, H x W map.

    u = winograd_weight(conv.weight)                 # once per weight: [36, C, K]
    y = conv3x3_winograd(x, u, conv.bias, relu=True)  # = relu(F.conv2d(x, conv.weight, conv.bias, padding=1))

The model's inference copy (models/detection/_inference.py) uses it for such convolutions on CPU. Inference only:
it has no autograd formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._library import assert_loaded
from ._registration import register_fake

# Winograd's F(4x4, 3x3) filter transform G (Lavin and Gray, 2016; interpolation points 0, +-1, +-2 and infinity):
# U = G g G^T for each 3x3 filter g.
_G = ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0))


def winograd_weight(weight: Tensor) -> Tensor:
    """The [36, C, K] transformed filters of a [K, C, 3, 3] convolution weight (computed in float64, returned in
    the weight's dtype)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight: weight must be [K, C, 3, 3], got shape {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.detach().double(), g)  # [6, 6, C, K]
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def conv3x3_winograd(input: Tensor, transformed_weight: Tensor, bias: Tensor | None = None,
                     relu: bool = False) -> Tensor:
    """``F.conv2d(input, weight, bias, padding=1)`` (then ReLU with ``relu``) from ``winograd_weight(weight)``.

    Args:
        input (Tensor[N, C, H, W]): float32 or float64, CPU, any memory format.
        transformed_weight (Tensor[36, C, K]): from :func:`winograd_weight`.
        bias (Tensor[K], optional).
        relu (bool): apply max(0, .) to the result (NaN stays NaN).

    Returns:
        Tensor[N, K, H, W] in channels_last memory format.
    """
    if not torch.jit.is_scripting():
        assert_loaded()
    return torch.ops.fasterrcnn_ext.conv3x3_winograd(input, transformed_weight, bias, relu)


@register_fake("fasterrcnn_ext::conv3x3_winograd")
def _conv3x3_winograd_fake(input, transformed_weight, bias, relu=False):
    torch._check(input.dim() == 4, lambda: f"conv3x3_winograd: input must be [N, C, H, W], got {input.shape}")
    torch._check(transformed_weight.dim() == 3 and transformed_weight.size(0) == 36
                 and transformed_weight.size(1) == input.size(1),
                 lambda: "conv3x3_winograd: transformed_weight must be [36, C, K]")
    n, _, h, w = input.shape
    return input.new_empty((n, transformed_weight.size(2), h, w)).contiguous(memory_format=torch.channels_last)
