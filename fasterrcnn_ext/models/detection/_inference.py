"""Inference-only speed-ups of the learned layers, applied to a private copy so the model's modules, state_dict and
training are untouched:

- batch norm folded into the preceding convolution (an inference-time identity that saves a pass over every
  activation map);
- channels_last memory format, which oneDNN's CPU convolutions run faster;
- in float32 on CPU, the 3x3 stride-1 convolutions of 64 to 256 channels (ResNet blocks up to the stride-16 stage,
  FPN outputs, RPN head) by Winograd's F(4x4, 3x3) (ops.conv3x3_winograd): 4 times fewer multiply-adds, outputs
  within about 1e-5 of their magnitude of the direct convolution's;
- in bfloat16 on CPU, each convolution fused with the ReLU and the residual add that follow it (oneDNN post-ops):
  with AMX the convolutions are fast enough that the separate passes over the activations took ~40% of the
  backbone's time.

The copy costs memory beside the module's own weights, so it holds only what differs from them: its tensors alias
the module's until a step replaces them (folding, a memory format or dtype change, a Winograd transform), it is built
outside the CPU memory pool (its blocks are not activations to reuse) with the build's temporaries handed back to the
system, and a stale copy is dropped before its successor is built. ``copy_extra_bytes`` measures what it adds.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from ... import memory
from ...capabilities import cpu_capabilities
from ...ops import conv3x3_winograd, winograd_weight

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _norm_scale(norm: nn.Module) -> Tensor:
    """An eval-mode batch norm's factor per channel: weight / sqrt(running_var + eps)."""
    return norm.weight / torch.sqrt(norm.running_var + norm.eps)


def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    """conv := norm(conv(x)) for an eval-mode batch norm; the norm then becomes an identity. New tensors replace the
    convolution's (never written in place: they may alias the original module's)."""
    with torch.no_grad():
        scale = _norm_scale(norm)
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        new_bias = (bias - norm.running_mean) * scale + norm.bias
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)


def fold_batch_norms(module: nn.Module, should_fold: Callable[[nn.Conv2d], bool] | None = None) -> int:
    """Folds every batch norm that directly follows a convolution (consecutive children of a Sequential, or the
    convN/bnN attribute pairs of torchvision's ResNet blocks and stem) and replaces it with an identity; with
    ``should_fold``, only after the convolutions it accepts. Returns how many were folded."""
    folded = 0
    for parent in module.modules():
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (_, a), (name_b, b) in zip(children, children[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, _NORMS) and (should_fold is None or should_fold(a)):
                    _fold(a, b)
                    parent._modules[name_b] = nn.Identity()
                    folded += 1
        for i in ("1", "2", "3"):
            conv, norm = getattr(parent, f"conv{i}", None), getattr(parent, f"bn{i}", None)
            if (isinstance(conv, nn.Conv2d) and isinstance(norm, _NORMS)
                    and (should_fold is None or should_fold(conv))):
                _fold(conv, norm)
                setattr(parent, f"bn{i}", nn.Identity())
                folded += 1
    return folded


# Narrower convolutions gain less from Winograd than its transforms cost.
_WINOGRAD_MIN_CHANNELS = 64
# Wider ones cost more memory than their speed-up is worth. The transformed weight is 4 times the weight: a 512-channel
# layer's is 38 MB (ResNet-50's two stride-1 ones at stride 32 hold 45% of R50-FPN's transformed weights). Such a
# layer does the multiply-adds of a 256-channel one on a map twice as large each way, for 4 times the transformed
# bytes, and Winograd gains less on it (its small map makes few tiles, each reading the whole transformed weight):
# measured side by side, the least time saved per byte held of every layer class of R50-FPN, several times less.
_WINOGRAD_MAX_CHANNELS = 256


# A fold replaces a convolution's weight by a scaled copy, to save one pass over its output per call. A weight with a
# kernel larger than 1x1 is copied into channels_last order anyway (oneDNN's channels_last convolution runs a
# 512-channel 3x3 layer at stride 32 in 19 ms, against 26 ms from the module's contiguous weight), so folding it
# costs nothing more. A 1x1 weight is already in that order and stays the module's unless folded: past this size
# its copy costs more than the pass saves. The 1x1 convolutions of ResNet's stride-32 stage (0.5M to 2M elements,
# 30 MB of R50-FPN's weights) run on maps of ~850 pixels at 800x1067, where their norms, one pass each, take under
# 1 ms of a 1.3 s forward; every 1x1 convolution up to the stride-16 stage has at most 2**18 elements.
_FOLD_MAX_1X1_WEIGHT_ELEMENTS = 2**18


def _fold_pays(conv: nn.Conv2d) -> bool:
    return conv.kernel_size != (1, 1) or conv.weight.numel() <= _FOLD_MAX_1X1_WEIGHT_ELEMENTS


class ChannelAffine(nn.Module):
    """An eval-mode batch norm as one pass, x * scale + shift per channel (FrozenBatchNorm2d takes two), for the
    norms left unfolded; scale and shift are a few floats per channel."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        with torch.no_grad():
            scale = _norm_scale(norm)
            self.register_buffer("scale", scale.reshape(1, -1, 1, 1))
            self.register_buffer("shift", (norm.bias - norm.running_mean * scale).reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x, self.scale)


def _norms_as_affine(module: nn.Module) -> None:
    """Replaces every batch norm of an eval-mode module by its ChannelAffine."""
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, _NORMS):
                parent._modules[name] = ChannelAffine(child)


class WinogradConv2d(nn.Module):
    """A 3x3, stride-1, padding-1 convolution (then optionally ReLU) by ops.conv3x3_winograd, for float32 CPU
    inference. It keeps only the transformed weight (4 times the original's size) and the bias (shared with the
    convolution, not copied); input of another dtype (under a caller's autocast) is computed in float32."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False):
        super().__init__()
        self.register_buffer("transformed_weight", winograd_weight(conv.weight))
        self.register_buffer("bias", conv.bias.detach() if conv.bias is not None else None)
        self.relu = relu

    @staticmethod
    def accepts(conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros"
                and _WINOGRAD_MIN_CHANNELS <= conv.in_channels <= _WINOGRAD_MAX_CHANNELS
                and _WINOGRAD_MIN_CHANNELS <= conv.out_channels <= _WINOGRAD_MAX_CHANNELS)

    def forward(self, x: Tensor) -> Tensor:
        return conv3x3_winograd(x.to(self.transformed_weight.dtype), self.transformed_weight, self.bias, self.relu)


def _relu_after(parent: nn.Module, names: list[str], i: int) -> str | None:
    """The name of the nn.ReLU that directly follows child names[i] of a module that runs its children in order
    (past folded-away identities), or None."""
    j = i + 1
    while j < len(names) and isinstance(parent._modules[names[j]], nn.Identity):
        j += 1
    return names[j] if j < len(names) and type(parent._modules[names[j]]) is nn.ReLU else None


def use_winograd_convolutions(module: nn.Module) -> int:
    """Replaces every convolution WinogradConv2d accepts, fusing a ReLU that directly follows it in a Sequential
    (past folded-away identities). Returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            conv = parent._modules[name]
            if not WinogradConv2d.accepts(conv):
                continue
            relu_name = _relu_after(parent, names, i) if isinstance(parent, nn.Sequential) else None
            parent._modules[name] = WinogradConv2d(conv, relu=relu_name is not None)
            if relu_name is not None:
                parent._modules[relu_name] = nn.Identity()
            replaced += 1
    return replaced


class FusedConv2d(nn.Module):
    """A convolution, then optionally a residual add, then optionally ReLU, as one oneDNN call (post-ops): the
    activation map is written once, where a separate add and ReLU read and write it twice more. Input is cast to the
    weight's dtype (what autocast would do); the add happens before the one rounding to that dtype."""

    def __init__(self, conv: nn.Conv2d, relu: bool):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = relu

    @staticmethod
    def accepts(conv: nn.Module) -> bool:
        return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        args = (self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
        x = x.to(self.weight.dtype)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if self.relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual.to(self.weight.dtype), *args, "add", 1.0, "relu" if self.relu else None, [], "")


class FusedBottleneck(nn.Module):
    """torchvision's ResNet Bottleneck with its batch norms folded, as fused convolutions: conv1 + ReLU, conv2 +
    ReLU, and conv3 + the residual add + ReLU; the downsample's convolution on its own."""

    def __init__(self, block: Bottleneck):
        super().__init__()
        self.conv1 = FusedConv2d(block.conv1, relu=True)
        self.conv2 = FusedConv2d(block.conv2, relu=True)
        self.conv3 = FusedConv2d(block.conv3, relu=True)
        self.downsample = None if block.downsample is None else FusedConv2d(block.downsample[0], relu=False)

    @staticmethod
    def accepts(block: nn.Module) -> bool:
        folded = all(isinstance(getattr(block, f"bn{i}"), nn.Identity) for i in (1, 2, 3))
        convs = all(FusedConv2d.accepts(getattr(block, f"conv{i}")) for i in (1, 2, 3))
        down = block.downsample
        down_ok = down is None or (isinstance(down, nn.Sequential) and len(down) == 2
                                   and FusedConv2d.accepts(down[0]) and isinstance(down[1], nn.Identity))
        return type(block) is Bottleneck and folded and convs and down_ok and type(block.relu) is nn.ReLU

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=identity)


def fuse_convolutions(module: nn.Module) -> int:
    """For a batch-norm-folded CPU copy: replaces torchvision's Bottleneck blocks by FusedBottleneck, and each
    convolution that a ReLU directly follows (past folded-away identities) in a Sequential or an
    IntermediateLayerGetter (the ResNet stem), by FusedConv2d with that ReLU. Returns how many modules were
    replaced. The caller decides whether the fused op can run here (capabilities.fused_bfloat16_convolutions for
    bfloat16: oneDNN refuses bfloat16 on CPUs without AVX512BW/VL/DQ or AVX-NE-CONVERT)."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, Bottleneck) and FusedBottleneck.accepts(child):
                parent._modules[name] = FusedBottleneck(child)
                replaced += 1
    for parent in list(module.modules()):
        if not isinstance(parent, (nn.Sequential, IntermediateLayerGetter)):
            continue
        names = list(parent._modules)
        for i, name in enumerate(names):
            relu_name = _relu_after(parent, names, i) if FusedConv2d.accepts(parent._modules[name]) else None
            if relu_name is not None:
                parent._modules[name] = FusedConv2d(parent._modules[name], relu=True)
                parent._modules[relu_name] = nn.Identity()
                replaced += 1
    return replaced


def _aliasing_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``'s structure whose parameters and buffers are new tensor objects over the module's
    own storage: replacing one in the copy (``copy.conv.weight = ...``, ``Module.to``, which sets ``.data``) leaves
    the module as it was, and no byte is duplicated until something is replaced. Nothing may write these tensors in
    place."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b.detach() for b in module.buffers()})
    return copy.deepcopy(module, memo)


def _to_channels_last(module: nn.Module) -> None:
    """Module.to(memory_format=torch.channels_last) without copying the 4-d tensors whose bytes already are in that
    order (1x1 convolutions' weights, whatever their strides say), so that those stay shared with the original."""
    for sub in module.modules():
        for tensors in (sub._parameters, sub._buffers):
            for name, t in tensors.items():
                if t is not None and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                    converted = t.detach().contiguous(memory_format=torch.channels_last)
                    tensors[name] = nn.Parameter(converted, requires_grad=False) if isinstance(t, nn.Parameter) \
                        else converted


def _storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def copy_extra_bytes(module: nn.Module, inference_copy: nn.Module) -> int:
    """The bytes of ``inference_copy``'s parameters and buffers that do not alias ``module``'s: the memory the copy
    adds beside the module (each storage counted once)."""
    shared, seen, extra = _storages(module), set(), 0
    for t in list(inference_copy.parameters()) + list(inference_copy.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in shared and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            extra += storage.nbytes()
    return extra


class InferenceCopy:
    """The module's inference copy (folded, channels_last, Winograd in float32 on CPU, or in the autocast dtype
    asked for, with fused convolutions in bfloat16 on CPU), one per dtype, rebuilt whenever the original's
    parameters or buffers change or the CPU capabilities in effect do (fasterrcnn_ext.capabilities). The copy shares
    the module's tensors that none of these steps changes, and a copy whose module has changed is dropped (for every
    dtype) before a new one is built."""

    def __init__(self):
        self._copies: dict[torch.dtype | None, tuple[tuple, nn.Module]] = {}

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
        caps = cpu_capabilities()
        key = (self._state_key(module), caps)
        cached = self._copies.get(dtype)
        if cached is not None and cached[0] == key:
            return cached[1]
        # Stale copies (of any dtype: their module changed) are freed before the new one is made.
        self._copies = {d: c for d, c in self._copies.items() if c[0] == key}
        # The copy's tensors live as long as it does: pooled blocks are for activations that the next forward reuses.
        with memory.cpu_pool(enabled=False) if caps.memory_pool else contextlib.nullcontext():
            clone = self._build(module, dtype, caps)
        # Folding, format changes and transforms leave freed temporaries (up to the size of the copy) in malloc's
        # heap, where they would stay resident.
        memory.release_free_heap()
        self._copies[dtype] = (key, clone)
        return clone

    @staticmethod
    def _build(module: nn.Module, dtype: torch.dtype | None, caps) -> nn.Module:
        clone = _aliasing_copy(module).eval()
        if dtype is None:
            # The weights stay the module's unless a step replaces them: fold where the copy it makes pays.
            fold_batch_norms(clone, _fold_pays)
            _norms_as_affine(clone)
        else:
            fold_batch_norms(clone)  # the dtype change copies every weight anyway
        _to_channels_last(clone)
        if dtype is not None:
            clone = clone.to(dtype)
            if (dtype == torch.bfloat16 and caps.fused_bfloat16_convolutions
                    and all(p.device.type == "cpu" for p in clone.parameters())):
                fuse_convolutions(clone)
        elif caps.winograd and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in clone.parameters()):
            use_winograd_convolutions(clone)
        return clone
