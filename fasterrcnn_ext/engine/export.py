"""Export a detector for serving: ``fasterrcnn-ext export --weights W --format F --out FILE``.

Formats:
- ``onnx``: the TorchScript-based ONNX exporter (standard operators only: RoiAlign, MaxRoiPool, NonMaxSuppression,
  ...), one image of any size in ([3, H, W] float in [0, 1]), boxes, labels and scores out; onnxruntime runs it.
- ``torchscript``: ``torch.jit.script`` of the model, saved for LibTorch; it returns (losses, detections) like
  torchvision's scripted detector. Loading it needs the fasterrcnn_ext library (``import fasterrcnn_ext``, or
  ``torch.ops.load_library`` of its _C library in C++).

``pt2`` and ``aoti`` (torch.export, AOTInductor) are refused with the reason: torchvision's transform, which this
detector keeps, fixes the resized image size when exported, so the program would only take images of one size.

Every file is written atomically: a failed export leaves no partial file and an earlier file of that name whole.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

from ..files import atomic_write

FORMATS = ("onnx", "torchscript", "pt2", "aoti")
ONNX_OPSET = 17  # RoiAlign's half_pixel mode (aligned=True) needs 16 or later


def export_onnx(model: torch.nn.Module, image: torch.Tensor, f, opset: int = ONNX_OPSET) -> None:
    """Writes the eval ``model`` to ``f`` (a path or a binary file) as ONNX, traced on ``image`` ([3, H, W]): one
    image of any size in (``image``), ``boxes``, ``labels``, ``scores`` out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(model, ([image],), f, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["boxes", "labels", "scores"],
                          dynamic_axes={"image": [1, 2], "boxes": [0], "labels": [0], "scores": [0]})


def export_detector(model: torch.nn.Module, fmt: str, out: str, image_size: tuple[int, int] = (480, 640),
                    opset: int = ONNX_OPSET, log=print) -> str:
    """Exports ``model`` (put in eval mode) to ``out`` in format ``fmt``; returns ``out``. ``image_size`` (H, W) is
    the example image traced for ONNX (the exported graph takes any size)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    if fmt in ("pt2", "aoti"):
        raise ValueError(f"--format {fmt}: not supported yet: torch.export keeps the image size that torchvision's "
                         "transform resizes to, so the program would take images of one size only; use onnx or "
                         "torchscript")
    if len(image_size) != 2 or min(image_size) < 32:
        raise ValueError(f"--image-size must be two sizes of at least 32 pixels, got {list(image_size)}")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder: give the file to write")
    model = model.eval()
    start = time.perf_counter()
    log(f"exporting {type(model).__name__} to {fmt} ({out})...")
    if fmt == "onnx":
        with atomic_write(out, binary=True) as f:
            export_onnx(model, torch.rand(3, *image_size), f, opset)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
            scripted = torch.jit.script(model)
        with atomic_write(out, binary=True) as f:
            torch.jit.save(scripted, f)
    log(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return out
