"""The eager forward's router (models/detection/_routing.py): a pure function, tested without a model, and the
model's settings as views of its one options object."""

import dataclasses

import pytest
import torch

from fasterrcnn_ext.models.detection import fasterrcnn_tiny
from fasterrcnn_ext.models.detection._routing import (
    PRECISIONS,
    ForwardState,
    InferenceOptions,
    Route,
    choose_route,
    precision_of_dtype,
)

EVAL = ForwardState(training=False, grad_enabled=False, compiling=False, tracing=False, cuda_images=False)


@pytest.mark.parametrize("changes, options, route", [
    ({}, {}, Route.INFERENCE),
    ({}, {"precision": "bf16"}, Route.INFERENCE),
    ({}, {"precision": "int8"}, Route.INFERENCE),
    ({"cuda_images": True}, {}, Route.PADDED_CUDA),
    ({"cuda_images": True}, {"static_cuda_forward": False}, Route.INFERENCE),
    ({}, {"fast": False}, Route.TORCHVISION),
    ({"grad_enabled": True}, {}, Route.TORCHVISION),
    ({"tracing": True}, {}, Route.TORCHVISION),
    ({"training": True, "grad_enabled": True}, {}, Route.TORCHVISION),
    ({"compiling": True}, {}, Route.COMPILED_EVAL),
    ({"compiling": True, "grad_enabled": True, "cuda_images": True}, {}, Route.COMPILED_EVAL),
    ({"compiling": True, "training": True}, {}, Route.TORCHVISION),
    ({"grad_enabled": True}, {"precision": "int8"}, Route.TORCHVISION),
])
def test_routes(changes, options, route):
    assert choose_route(dataclasses.replace(EVAL, **changes), InferenceOptions(**options)) is route


def test_an_int8_model_does_not_train():
    with pytest.raises(ValueError, match="eval mode only"):
        choose_route(dataclasses.replace(EVAL, training=True), InferenceOptions(precision="int8"))


def test_options_are_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        InferenceOptions(precision="int4")
    with pytest.raises(ValueError, match="fast must be True or False"):
        InferenceOptions(fast=1)
    with pytest.raises(ValueError, match="inference_dtype must be None"):
        precision_of_dtype(torch.float64)
    assert precision_of_dtype(None) == "fp32" and precision_of_dtype(torch.bfloat16) == "bf16"
    assert all(PRECISIONS[name].name == name for name in PRECISIONS)


def test_the_models_settings_are_views_of_its_options():
    model = fasterrcnn_tiny(weights=None)
    other = fasterrcnn_tiny(weights=None)
    assert model.inference_options == InferenceOptions()
    model.fast_inference = False
    model.inference_dtype = torch.bfloat16
    model.reuse_cpu_memory = False
    model.static_cuda_forward = False
    assert model.inference_options == InferenceOptions(precision="bf16", fast=False, reuse_cpu_memory=False,
                                                       static_cuda_forward=False)
    assert other.inference_options == InferenceOptions()  # set on the instance, not the class
    model.inference_dtype = None
    assert model.inference_dtype is None and model.inference_options.precision == "fp32"
    with pytest.raises(ValueError, match="inference_dtype must be None"):
        model.inference_dtype = torch.int8


def test_each_route_is_the_one_taken(monkeypatch):
    """The forward runs what choose_route names: every route's method is reached from its state."""
    from fasterrcnn_ext.models.detection.faster_rcnn import FasterRCNN

    model = fasterrcnn_tiny(weights=None).eval()
    taken = []
    monkeypatch.setattr(FasterRCNN, "_inference_forward", lambda self, images: taken.append("inference") or [])
    monkeypatch.setattr(FasterRCNN, "_compiled_eval_forward", lambda self, images: taken.append("compiled") or [])
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        model(images)
    model(images)  # autograd on: torchvision's forward, which is not patched and returns detections
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model(images)
    assert taken == ["inference", "compiled"]
