"""The precision of detect, eval and bench (their ``--precision``): the detector as trained (fp32), its bfloat16
inference mode (bf16), or the int8 model fasterrcnn_ext.quantization.quantize makes from it, calibrated on a few
images (int8).

Which precision pays on which CPU is fasterrcnn_ext.capabilities' decision (README: "Precision"); where one runs
slower than float32, the model or the quantizer warns, not this module.
"""

from __future__ import annotations

import torch

from .._arguments import argument_error
from ..models.detection import _routing

# The model's precisions (models/detection/_routing.PRECISIONS) but float16, which runs convolutions fast on GPUs
# only; this tool's runs are mostly on CPUs, where bfloat16 is the 16-bit choice.
PRECISIONS = tuple(name for name in _routing.PRECISIONS if name != "fp16")
# The images int8 calibrates on unless told: the first of the run. A few images of the kind being detected set the
# activations' ranges; each more costs a float32 forward before the run starts.
CALIBRATION_IMAGES = 8


def check_precision(precision: str, device: str = "cpu") -> None:
    """ValueError unless ``precision`` is one of PRECISIONS and runs on ``device``."""
    if precision not in PRECISIONS:
        raise argument_error(ValueError, "{precision}: choose from {names:value}", precision=precision,
                             names=", ".join(PRECISIONS))
    if precision == "int8" and torch.device(device).type != "cpu":
        raise argument_error(ValueError, "{precision} runs on the CPU (oneDNN's int8 kernels), not {device}",
                             precision=precision, device=device)


def with_precision(model: torch.nn.Module, precision: str, calibration_images: list[torch.Tensor] | None = None,
                   device: str = "cpu") -> torch.nn.Module:
    """The eval detector ``model`` at ``precision``: fp32, the model itself; bf16, the model itself with
    ``inference_dtype = torch.bfloat16``; int8, a new model, ``quantization.quantize(model, calibration_images)``
    (``model`` untouched). calibration_images: [3, H, W] float images in [0, 1], required for int8 only."""
    check_precision(precision, device)
    if precision == "fp32":
        return model
    if _routing.PRECISIONS[precision].inference_copy:  # an autocast precision of the model's own
        model.inference_dtype = _routing.PRECISIONS[precision].autocast_dtype
        return model
    if not calibration_images:
        raise argument_error(ValueError, "{precision} needs calibration images: none could be read",
                             precision=precision)
    from .. import quantization

    return quantization.quantize(model.eval(), list(calibration_images))


def load_calibration_images(paths: list[str], count: int = CALIBRATION_IMAGES) -> list[torch.Tensor]:
    """The first ``count`` images of ``paths`` that can be read, loaded as detect loads them (data.load_image); an
    unreadable one is passed over (detect reports it in its run). ValueError where none can be read."""
    from ..data import load_image

    if count < 1:
        raise argument_error(ValueError, "{count}: at least 1", count=count)
    images, errors = [], []
    for path in paths:
        if len(images) == count:
            break
        try:
            images.append(load_image(path))
        except (ValueError, OSError) as e:
            errors.append(str(e))
    if not images:
        raise ValueError(f"no calibration image could be read ({'; '.join(errors) or 'no images given'})")
    return images


def calibration_paths(calibration: str) -> list[str]:
    """The image files of ``--calibration``: a folder (searched recursively), a glob or a list file, as detect's
    inputs are."""
    from .detect import expand_image_paths

    return expand_image_paths([calibration])
