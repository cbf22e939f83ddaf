"""Checkpoints: written atomically (a finished run's file is replaced only by a complete new one), read with clear
errors, and the model they hold rebuilt by name.

A checkpoint is a dict: ``model`` (state_dict), ``model_name`` (a builder of MODEL_BUILDERS), ``num_classes`` (with
the background), ``class_names`` and ``category_ids`` (label l is class_names[l - 1], COCO category_ids[l - 1]),
and for training ``optimizer``, ``scheduler``, ``scaler``, ``iteration`` (int: optimizer steps done) and ``args``.
"""

from __future__ import annotations

import torch

from .._arguments import argument_error
from ..files import atomic_write, read_checkpoint_file
from ..models import detection

# The builders `--model NAME` accepts. Each takes num_classes and weights_backbone-free keyword arguments.
MODEL_BUILDERS = {
    name: getattr(detection, name)
    for name in ("fasterrcnn_tiny", "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
                 "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_vgg16")
}


def build_model(name: str, num_classes: int, weights_backbone=None) -> detection.FasterRCNN:
    """A randomly initialised detector by builder name; ``weights_backbone`` (torchvision's, downloaded by
    torchvision) for the ImageNet-backbone builders."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"name={name!r}: unknown model; choose from {', '.join(MODEL_BUILDERS)}")
    kwargs = {"num_classes": num_classes}
    if name != "fasterrcnn_tiny":
        kwargs["weights_backbone"] = weights_backbone
    elif weights_backbone is not None:
        raise argument_error(ValueError, "fasterrcnn_tiny has no pretrained backbone; leave {weights_backbone:name} "
                             "out", weights_backbone=weights_backbone)
    return MODEL_BUILDERS[name](**kwargs)


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Writes to a temporary file in the same folder, then renames it over ``path``: an interrupted save leaves the
    previous checkpoint intact."""
    with atomic_write(path, binary=True) as f:
        torch.save(checkpoint, f)


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by save_checkpoint (training or model-only); ValueError naming the file otherwise."""
    return checked_checkpoint(read_checkpoint_file(path), path)


def checked_checkpoint(checkpoint, path: str) -> dict:
    """``checkpoint``, read from ``path``, if it is one that save_checkpoint writes; ValueError naming the file
    otherwise."""
    missing = [k for k in ("model", "model_name", "num_classes")
               if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} is not a fasterrcnn_ext training checkpoint (no {', '.join(missing)}); "
                         "for a bare state_dict use the builder's weights= argument")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str = "checkpoint") -> detection.FasterRCNN:
    model = build_model(checkpoint["model_name"], int(checkpoint["num_classes"]))
    load_model_state(model, checkpoint, path)
    return model


def load_model_state(model: torch.nn.Module, checkpoint: dict, path: str) -> None:
    """Strict loading, with an error that says which model and class count the checkpoint is of."""
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} holds a {checkpoint.get('model_name')} with "
                         f"{checkpoint.get('num_classes')} classes that does not fit this model: "
                         f"{str(e).splitlines()[0]}") from e
