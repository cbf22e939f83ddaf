"""Which path FasterRCNN's eager forward takes: a pure function of the call's state and the model's inference options,
so the choice is tested without running a model (docs/design.md has the table).

========================  ==========================================================================================
route                     taken when
========================  ==========================================================================================
``COMPILED_EVAL``         eval under torch.compile / torch.export: torchvision's steps with what a graph needs
``TORCHVISION``           training, autograd on, torch.jit.trace or the TorchScript ONNX exporter, or
                          ``fast=False``: torchvision's forward over our ops and the modules as they are
``PADDED_CUDA``           inference on CUDA images with ``static_cuda_forward``: detect_padded, one host read
``INFERENCE``             any other inference: the learned layers of the precision (``PRECISIONS``), our ops
========================  ==========================================================================================

TorchScript never reaches this function: the scripted forward is torchvision's steps, compiled.
A precision is one ``PRECISIONS`` entry: its autocast dtype and whether its learned layers come from the inference
copies (models/detection/_inference.py) or are the model's own modules (int8: fasterrcnn_ext.quantization).
"""

from __future__ import annotations

import dataclasses
import enum

import torch

__all__ = ["PRECISIONS", "ForwardState", "InferenceOptions", "Precision", "Route", "choose_route",
           "precision_of_dtype"]


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the learned layers run in inference.

    Args:
        name (str): "fp32", "bf16", "fp16" or "int8".
        autocast_dtype (torch.dtype or None): autocast for the learned layers (None: off, float32 or int8 modules).
        inference_copy (bool): whether they run from the inference copies (folded, channels_last, Winograd or fused
            convolutions) or as the model's own modules.
    """

    name: str
    autocast_dtype: torch.dtype | None
    inference_copy: bool


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", None, True),
    Precision("bf16", torch.bfloat16, True),
    Precision("fp16", torch.float16, True),
    Precision("int8", None, False),  # quantize() folded and converted the modules themselves
)}


def precision_of_dtype(dtype: torch.dtype | None) -> str:
    """The precision whose autocast dtype is ``dtype`` (None: float32); ValueError for any other."""
    for precision in PRECISIONS.values():
        if precision.autocast_dtype == dtype and precision.inference_copy:
            return precision.name
    dtypes = [p.autocast_dtype for p in PRECISIONS.values() if p.autocast_dtype is not None]
    raise ValueError(f"inference_dtype must be None (float32) or one of {dtypes}, got {dtype!r}")


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """The model's inference settings, in one frozen object (``model.inference_options``; the model's properties
    ``inference_dtype``, ``fast_inference``, ``reuse_cpu_memory`` and ``static_cuda_forward`` read and replace it).

    Args:
        precision (str): a key of PRECISIONS. "int8" is set by fasterrcnn_ext.quantization.quantize only.
        fast (bool): False runs the modules as trained (no folding, no channels_last), bit for bit as torchvision.
        reuse_cpu_memory (bool): CPU inference reuses its large activation blocks (fasterrcnn_ext.memory).
        static_cuda_forward (bool): CUDA inference is detect_padded split per image (one host read per call).
    """

    precision: str = "fp32"
    fast: bool = True
    reuse_cpu_memory: bool = True
    static_cuda_forward: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        for field in ("fast", "reuse_cpu_memory", "static_cuda_forward"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be True or False, got {getattr(self, field)!r}")


@dataclasses.dataclass(frozen=True)
class ForwardState:
    """What the eager forward knows of its call: module mode, autograd, graph capture, where the images are."""

    training: bool
    grad_enabled: bool
    compiling: bool  # torch.compile or torch.export
    tracing: bool  # torch.jit.trace or the TorchScript-based ONNX exporter
    cuda_images: bool  # every image is on a CUDA device (and there is at least one)


class Route(enum.Enum):
    COMPILED_EVAL = "compiled_eval"
    TORCHVISION = "torchvision"
    PADDED_CUDA = "padded_cuda"
    INFERENCE = "inference"


def choose_route(state: ForwardState, options: InferenceOptions) -> Route:
    """The route of one eager forward call (the module docstring's table). ValueError for an int8 model in training
    mode: its layers have no float weights to train."""
    if options.precision == "int8" and state.training:
        raise ValueError("an int8 model (fasterrcnn_ext.quantization.quantize) runs in eval mode only: train the "
                         "float32 model and quantize it again")
    if state.compiling and not state.training:
        return Route.COMPILED_EVAL
    if state.training or state.grad_enabled or state.tracing or not options.fast:
        return Route.TORCHVISION
    if options.static_cuda_forward and state.cuda_images:
        return Route.PADDED_CUDA
    return Route.INFERENCE
