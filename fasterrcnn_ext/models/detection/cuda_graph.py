"""CUDAGraphDetector: a detector's eval forward captured once in a CUDA graph and replayed, for fixed-size batches.

Shapes: N images of one size 3 x H x W; D = detections_per_img.

At batch 1 the detector is launch-bound outside its learned layers (hundreds of small kernels for anchors,
proposal selection, pooling and post-processing): a graph replays all of them with one launch. What it captures is
FasterRCNN.detect_padded, whose sizes depend on N, H and W only and which neither waits for the device nor copies
from the host; a replay then reads the per-image counts once to hand out forward's list of dicts (or not at all,
with ``padded=True``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .faster_rcnn import FasterRCNN, padded_detections_to_list

__all__ = ["CUDAGraphDetector"]

# Calls before the capture: the first builds the inference copies and moves the constants and anchors to the
# device; later ones let cuDNN and the caching allocator settle (torch's own rule for capture is warm-up first).
WARMUP_CALLS = 3


class CUDAGraphDetector:
    """Replays ``model.detect_padded`` for batches of ``batch_size`` images of ``image_size`` from one CUDA graph.

    Args:
        model (FasterRCNN): in eval mode, on a CUDA device. Its weights are read at capture: build a new
            CUDAGraphDetector after changing them (the graph keeps the inference copies it captured).
        image_size ((int, int)): (H, W) of every image.
        batch_size (int): images per call.

    ``detector(images)`` takes a list of ``batch_size`` Tensor[3, H, W] (or one Tensor[N, 3, H, W]) on the model's
    device and returns forward's list of dicts; ``detector(images, padded=True)`` returns detect_padded's
    (boxes, scores, labels, counts) without reading anything on the host. The returned tensors are the graph's
    output buffers, overwritten by the next call: clone what must outlive it.
    """

    def __init__(self, model: FasterRCNN, image_size: tuple[int, int], batch_size: int = 1):
        if not isinstance(model, FasterRCNN):
            raise ValueError("CUDAGraphDetector: model must be a fasterrcnn_ext FasterRCNN, got "
                             f"{type(model).__name__}")
        if model.training:
            raise ValueError("CUDAGraphDetector: the model must be in eval mode (model.eval())")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDAGraphDetector: the model must be on a CUDA device, got {device}")
        height, width = (int(s) for s in image_size)
        if height < 1 or width < 1 or batch_size < 1:
            raise ValueError(f"CUDAGraphDetector: image_size {tuple(image_size)} and batch_size {batch_size} must be "
                             "positive")
        self.model = model
        self.image_size = (height, width)
        self.batch_size = int(batch_size)
        self._images = torch.zeros(self.batch_size, 3, height, width, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs documents
            for _ in range(WARMUP_CALLS):
                model.detect_padded(list(self._images.unbind(0)))
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._outputs = model.detect_padded(list(self._images.unbind(0)))

    def __call__(self, images: list[Tensor] | Tensor, padded: bool = False):
        batch = images if isinstance(images, Tensor) else torch.stack(list(images))
        if tuple(batch.shape) != tuple(self._images.shape):
            raise ValueError(f"CUDAGraphDetector: captured for {self.batch_size} images of 3 x {self.image_size[0]} x "
                             f"{self.image_size[1]}, got a batch of shape {tuple(batch.shape)}")
        self._images.copy_(batch)
        self.graph.replay()
        return self._outputs if padded else padded_detections_to_list(*self._outputs)
