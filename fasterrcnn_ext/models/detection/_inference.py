"""Inference-only speed-ups of the learned layers, applied to a private copy so the model's modules, state_dict and
training are untouched:

- batch norm folded into the preceding convolution (an inference-time identity that saves a pass over every
  activation map);
- channels_last memory format, which oneDNN's CPU convolutions run faster.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    """conv := norm(conv(x)) for an eval-mode batch norm; the norm then becomes an identity."""
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        new_bias = (bias - norm.running_mean) * scale + norm.bias
        conv.bias = nn.Parameter(new_bias)


def fold_batch_norms(module: nn.Module) -> int:
    """Folds every batch norm that directly follows a convolution (consecutive children of a Sequential, or the
    convN/bnN attribute pairs of torchvision's ResNet blocks and stem) and replaces it with an identity.
    Returns how many were folded."""
    folded = 0
    for parent in module.modules():
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (_, a), (name_b, b) in zip(children, children[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, _NORMS):
                    _fold(a, b)
                    parent._modules[name_b] = nn.Identity()
                    folded += 1
        for i in ("1", "2", "3"):
            conv, norm = getattr(parent, f"conv{i}", None), getattr(parent, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, _NORMS):
                _fold(conv, norm)
                setattr(parent, f"bn{i}", nn.Identity())
                folded += 1
    return folded


class InferenceCopy:
    """A folded, channels_last copy of a module, rebuilt whenever the original's parameters or buffers change."""

    def __init__(self):
        self._key = None
        self._copy: nn.Module | None = None

    @staticmethod
    def _state_key(module: nn.Module):
        tensors = list(module.parameters()) + list(module.buffers())
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def get(self, module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """The copy of ``module``; with ``dtype`` (the autocast dtype it will run under), its floating-point weights
        are stored in that dtype, so autocast does not cast them again on every call (the same rounding)."""
        if any(p.is_inference() for p in module.parameters()):
            # Built under torch.inference_mode: such tensors keep no version counter, so an in-place weight update
            # could not be noticed. Run the module itself (correct, without the speed-ups).
            return module
        key = (self._state_key(module), dtype)
        if self._copy is None or key != self._key:
            self._copy = None  # the previous copy's memory is free before the new one is made
            clone = copy.deepcopy(module).eval()
            fold_batch_norms(clone)
            clone = clone.to(memory_format=torch.channels_last)
            self._copy = clone.to(dtype) if dtype is not None else clone
            self._key = key
        return self._copy
