"""Export a detector for serving: ``fasterrcnn-ext export --weights W --format F --out FILE``.

Formats:
- ``onnx``: standard ONNX operators only (RoiAlign, MaxRoiPool, NonMaxSuppression, ...), one image of any size in
  ([3, H, W] float in [0, 1]), boxes, labels and scores out; onnxruntime and OpenVINO run it. By default the
  TorchScript-based exporter; ``--dynamo``: the torch.export-based one, with our ops translated
  (ops/_onnxscript.py).
- ``torchscript``: ``torch.jit.script`` of the model, saved for LibTorch; it returns (losses, detections) like
  torchvision's scripted detector. Loading it needs the fasterrcnn_ext library (``import fasterrcnn_ext``, or
  ``torch.ops.load_library`` of its _C library in C++).
- ``pt2``: ``torch.export`` of the eval detector with a dynamic image height and width (32 to ``MAX_SIDE`` pixels),
  saved with ``torch.export.save``; ``torch.export.load(FILE).module()([image])`` gives the eager detections.
- ``aoti``: that program compiled by AOTInductor for one image size (``--image-size``), a package that
  ``load_aoti(FILE)`` loads and runs without Python model code, checking that each image has that size (the
  compiled code reads any tensor as one of that size and layout: ``torch._inductor.aoti_load_package`` alone
  checks nothing unless AOTI_RUNTIME_CHECK_INPUTS=1 is set). One size, because torch 2.14's inductor computes
  wrong convolution outputs from the dynamic program's run-time (unbacked) resized size (tests/models/test_export.py
  keeps that case as a strict xfail). The package is compiled for this machine's CPU (AVX-512 code on an AVX-512
  machine): compile it on the kind of CPU that runs it.
With ``--fixed-shape`` every format holds ``FixedShapeDetector`` (models/detection/fixed_shape.py) instead: one
tensor ``images`` [N, 3, H, W] in (N = ``--batch-size``; float 0-1 as exported, the TorchScript file also takes
uint8), ``boxes`` [N, K, 4], ``scores`` [N, K], ``labels`` [N, K] and ``counts`` [N] out, K = the model's detections
per image; onnx then takes the torch.export-based exporter.
Loading a pt2 or aoti file needs the fasterrcnn_ext library loaded first (``import fasterrcnn_ext``): the program
calls its ops.

Every file is written atomically: a failed export leaves no partial file and an earlier file of that name whole.
"""

from __future__ import annotations

import io
import os
import time
import warnings

import torch

from .._arguments import argument_error
from ..files import atomic_write

FORMATS = ("onnx", "torchscript", "pt2", "aoti")
ONNX_OPSET = 17  # RoiAlign's half_pixel mode (aligned=True) needs 16 or later
MIN_SIDE = 32  # the FPN's coarsest level has stride 32: a smaller image pads to one cell anyway
MAX_SIDE = 8192  # far above any resize target (torchvision's max_size is 1333); bounds the program's size range


def export_onnx(model: torch.nn.Module, image: torch.Tensor, f, opset: int = ONNX_OPSET, dynamo: bool = False) -> None:
    """Writes the eval ``model`` to ``f`` (a path or a binary file) as ONNX, traced on ``image`` ([3, H, W]): one
    image of any size in (``image``), ``boxes``, ``labels``, ``scores`` out.

    ``dynamo=False``: the TorchScript-based exporter (the detector takes torchvision's paths in standard operations,
    ops/_onnx.py). ``dynamo=True``: the torch.export-based exporter, on the program ``export_program`` exports (the
    fused ops translated by ops/_onnxscript.py; opset 18 or later)."""
    names = dict(input_names=["image"], output_names=["boxes", "labels", "scores"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        if dynamo:
            from ..ops.utils import onnx_translations

            with torch.no_grad():  # RoIPool without its argmax, which has no ONNX form
                program = torch.onnx.export(model.eval(), ([image],), dynamo=True, opset_version=max(opset, 18),
                                            custom_translation_table=onnx_translations(),
                                            dynamic_shapes=_dynamic_image_shapes(), verbose=False, **names)
            data = program.model_proto.SerializeToString()
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, ([image],), buffer, dynamo=False, opset_version=opset,
                              dynamic_axes={"image": [1, 2], "boxes": [0], "labels": [0], "scores": [0]}, **names)
            data = buffer.getvalue()
    _write(f, data)


def _write(f, data: bytes) -> None:
    """``data`` to ``f``: a path (written atomically) or a binary file object."""
    if isinstance(f, (str, os.PathLike)):
        with atomic_write(os.fspath(f), binary=True) as out:
            out.write(data)
    else:
        f.write(data)


def _height_width():
    """The image height and width an exported program takes: any from MIN_SIDE to MAX_SIDE."""
    return (torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
            torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE))


def _dynamic_image_shapes():
    height, width = _height_width()
    return ([{1: height, 2: width}],)


FIXED_SHAPE_OUTPUTS = ("boxes", "scores", "labels", "counts")


def _dynamic_batch_shapes():
    height, width = _height_width()
    return ({2: height, 3: width},)


def export_fixed_shape_program(model: torch.nn.Module, images: torch.Tensor, dynamic: bool = True):
    """``torch.export.export`` of ``model`` (a FixedShapeDetector) on ``images`` ([N, 3, H, W]); with ``dynamic``
    any height and width from MIN_SIDE to MAX_SIDE, else only ``images``' size. N is fixed."""
    with torch.no_grad():
        shapes = _dynamic_batch_shapes() if dynamic else None
        return torch.export.export(model.eval(), (images,), dynamic_shapes=shapes, strict=False)


def export_fixed_shape_onnx(model: torch.nn.Module, images: torch.Tensor, f, opset: int = ONNX_OPSET) -> None:
    """``model`` (a FixedShapeDetector) as ONNX through the torch.export-based exporter: ``images`` [N, 3, H, W] of
    any height and width in, ``boxes``, ``scores``, ``labels``, ``counts`` out."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (images,), dynamo=True, opset_version=max(opset, 18),
                                    dynamic_shapes=_dynamic_batch_shapes(), input_names=["images"],
                                    output_names=list(FIXED_SHAPE_OUTPUTS), verbose=False)
    data = program.model_proto.SerializeToString()
    _write(f, data)


def export_program(model: torch.nn.Module, image: torch.Tensor, dynamic: bool = True):
    """``torch.export.export`` of the eval ``model`` on one image ([3, H, W]); with ``dynamic`` the program takes
    any height and width from MIN_SIDE to MAX_SIDE (the transform's resize is computed in the program,
    models/detection/transform.py), else only ``image``'s size."""
    with torch.no_grad():
        shapes = _dynamic_image_shapes() if dynamic else None
        return torch.export.export(model.eval(), ([image],), dynamic_shapes=shapes, strict=False)


# The package metadata key that holds the one image size ("HxW") a package of a fixed-size program takes.
AOTI_IMAGE_SIZE_KEY = "fasterrcnn_ext.image_size"


def compile_aoti(program, f) -> None:
    """AOTInductor: ``program`` (an ExportedProgram) compiled and packaged into ``f`` (a path or a binary file).

    The compiled code takes the example image's sizes and strides as given and does not check them at run time
    (torch checks only with AOTI_RUNTIME_CHECK_INPUTS=1): load the package with ``load_aoti``, which checks each
    image and passes it contiguous. Where the program's image size is fixed, the package records it in its
    metadata (AOTI_IMAGE_SIZE_KEY) for that check; the example must be contiguous, as load_aoti passes images."""
    metadata = {}
    example = _example_image(program)
    if example is not None and all(isinstance(side, int) for side in example.shape):
        if not example.is_contiguous():
            raise ValueError(f"compile_aoti: the program's example image (strides {tuple(example.stride())}) is not "
                             "contiguous; export it with image.contiguous(), the layout load_aoti passes")
        metadata[AOTI_IMAGE_SIZE_KEY] = f"{example.shape[-2]}x{example.shape[-1]}"
    torch._inductor.aoti_compile_and_package(program, package_path=f,
                                             inductor_configs={"aot_inductor.metadata": metadata})


def _example_image(program):
    """The program's one example image ([3, H, W]; a fake tensor with symbolic sizes for a dynamic program), or
    None where the program does not take one image."""
    args = (program.example_inputs or ((), {}))[0]
    if len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return args[0]  # a FixedShapeDetector's batch [N, 3, H, W]
    images = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else None
    if images is None or len(images) != 1 or not isinstance(images[0], torch.Tensor):
        return None
    return images[0]


class AotiDetector:
    """An AOTInductor package of the detector (``fasterrcnn-ext export --format aoti``), loaded with the checks its
    compiled code lacks: each call takes a list of [3, H, W] float images of the one size it was compiled for
    (others raise a ValueError before anything runs), passed contiguous, and returns forward's list of
    detection dicts. ``image_size`` is that (H, W), or None for a package without the record."""

    def __init__(self, path):
        self._run = torch._inductor.aoti_load_package(os.fspath(path))
        size = self._run.get_metadata().get(AOTI_IMAGE_SIZE_KEY)
        self.image_size = tuple(int(side) for side in size.split("x")) if size else None
        self.path = os.fspath(path)

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if isinstance(images, torch.Tensor):
            raise ValueError(f"images: a list of [3, H, W] tensors, as for the eager model; got one tensor of shape "
                             f"{tuple(images.shape)}")
        if len(images) != 1:
            raise ValueError(f"images: this AOTInductor package takes one image per call, got {len(images)}")
        results = []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
                raise ValueError(f"images[{i}]: a float [3, H, W] image, got {image.dtype} of shape "
                                 f"{tuple(image.shape)}")
            if self.image_size is not None and tuple(image.shape[-2:]) != self.image_size:
                h, w = self.image_size
                raise ValueError(f"images[{i}] is {image.shape[-2]}x{image.shape[-1]} pixels; the AOTInductor package "
                                 f"{self.path} was compiled for {h}x{w} images only: resize the image to {h}x{w}, "
                                 "or export a package for its size (export_detector's image_size), or the pt2 "
                                 "format (any size)")
            results += self._run([image.contiguous()])
        return results


def load_aoti(path) -> AotiDetector:
    """An AOTInductor package written by ``export_detector(..., "aoti", ...)`` or ``compile_aoti``, as a callable
    that checks each image against the size it was compiled for (AotiDetector). Needs the fasterrcnn_ext library
    loaded (this module imports it)."""
    return AotiDetector(path)


def export_detector(model: torch.nn.Module, fmt: str, out: str, image_size: tuple[int, int] = (480, 640),
                    opset: int = ONNX_OPSET, log=print, dynamo: bool = False, fixed_shape: bool = False,
                    batch_size: int = 1) -> str:
    """Exports ``model`` (put in eval mode) to ``out`` in format ``fmt``; returns ``out``. ``image_size`` (H, W) is
    the example image traced for onnx and pt2 (their programs take any size) and the one size an aoti package
    takes. ``fixed_shape``: the FixedShapeDetector of ``model`` for batches of ``batch_size`` images."""
    if fmt not in FORMATS:
        raise argument_error(ValueError, "{fmt}: choose from {formats:value}", fmt=fmt, formats=", ".join(FORMATS))
    if len(image_size) != 2 or not all(MIN_SIDE <= side <= MAX_SIDE for side in image_size):
        raise argument_error(ValueError, "{image_size:name} must be two sizes from {low:value} to {high:value} "
                             "pixels, got {image_size:value}", image_size=list(image_size), low=MIN_SIDE,
                             high=MAX_SIDE)
    if os.path.isdir(out):
        raise argument_error(ValueError, "{out} is a folder: give the file to write", out=out)
    if batch_size < 1:
        raise argument_error(ValueError, "{batch_size:name} must be 1 or more, got {batch_size:value}",
                             batch_size=batch_size)
    model = model.eval()
    start = time.perf_counter()
    log(f"exporting {type(model).__name__} to {fmt} ({out})...")
    if fixed_shape:
        _export_fixed_shape(model, fmt, out, image_size, opset, batch_size, log)
    elif fmt == "onnx":
        with atomic_write(out, binary=True) as f:
            export_onnx(model, torch.rand(3, *image_size), f, opset, dynamo=dynamo)
    elif fmt in ("pt2", "aoti"):
        # A random example: an aoti package takes its size and (contiguous) strides, and nothing from its values.
        program = export_program(model, torch.rand(3, *image_size), dynamic=fmt == "pt2")
        with atomic_write(out, binary=True) as f:
            if fmt == "pt2":
                torch.export.save(program, f)
            else:
                log(f"compiling with AOTInductor for {image_size[0]}x{image_size[1]} images (minutes)...")
                compile_aoti(program, f)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
            scripted = torch.jit.script(model)
        with atomic_write(out, binary=True) as f:
            torch.jit.save(scripted, f)
    log(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return out


def _export_fixed_shape(model, fmt, out, image_size, opset, batch_size, log) -> None:
    from ..models.detection.fixed_shape import FixedShapeDetector

    wrapper = FixedShapeDetector(model)
    # A random example: an aoti package takes its size and (contiguous) strides, and nothing from its values.
    images = torch.rand(batch_size, 3, *image_size)
    with atomic_write(out, binary=True) as f:
        if fmt == "onnx":
            export_fixed_shape_onnx(wrapper, images, f, opset)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
                torch.jit.save(torch.jit.script(wrapper), f)
        else:
            program = export_fixed_shape_program(wrapper, images, dynamic=fmt == "pt2")
            if fmt == "pt2":
                torch.export.save(program, f)
            else:
                log(f"compiling with AOTInductor for {image_size[0]}x{image_size[1]} images (minutes)...")
                compile_aoti(program, f)
