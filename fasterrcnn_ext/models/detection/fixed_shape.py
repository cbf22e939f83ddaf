"""The detector with fixed-shape inputs and outputs, for servers (Triton, TorchServe), batch UDFs, TensorRT and
CUDA graphs: one tensor of N images in, four tensors whose shapes depend on N and K only out."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FixedShapeDetector(nn.Module):
    """Wraps an eval detector (a fasterrcnn_ext FasterRCNN) for serving with fixed shapes.

    ``forward(images)`` takes one tensor [N, 3, H, W]: uint8 (0 to 255, divided by 255) or float (0 to 1), and
    returns ``(boxes, scores, labels, counts)``: Tensor[N, K, 4] (float, original image coordinates),
    Tensor[N, K] (float), Tensor[N, K] (int64) and Tensor[N] (int64). Image i's detections are its first
    counts[i] rows, in the order and with the values of ``model(list(images))[i]`` (highest scores first); the rows
    after them are zeros (label 0, the background). K is ``detections_per_img`` (default: the model's
    ``roi_heads.detections_per_img``); a smaller K keeps each image's K highest-scoring detections.

    It scripts (``torch.jit.script``), exports (``torch.export``, then AOTInductor) and exports to ONNX
    (``torch.onnx.export``) like the detector it wraps; ``export_fixed_shape`` in engine/export.py does each.
    """

    def __init__(self, model: nn.Module, detections_per_img: int | None = None):
        super().__init__()
        self.model = model.eval()
        k = model.roi_heads.detections_per_img if detections_per_img is None else detections_per_img
        if int(k) < 1:
            raise ValueError(f"detections_per_img must be 1 or more, got {k}")
        self.detections_per_img = int(k)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("images: one tensor [N, 3, H, W] (uint8 0-255 or float 0-1)")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        detections = self._detections([image for image in images.unbind(0)])
        k = self.detections_per_img
        boxes, scores, labels, counts = [], [], [], []
        for detection in detections:
            b, s, lab = detection["boxes"][:k], detection["scores"][:k], detection["labels"][:k]
            # Concatenating K zero rows and keeping the first K pads without reading the count on the host, so a
            # traced graph (torch.export, ONNX) holds no data-dependent shape at its outputs.
            boxes.append(torch.cat([b, b.new_zeros((k, 4))])[:k])
            scores.append(torch.cat([s, s.new_zeros((k,))])[:k])
            labels.append(torch.cat([lab, lab.new_zeros((k,))])[:k])
            counts.append(torch.ones_like(lab).sum())
        return torch.stack(boxes), torch.stack(scores), torch.stack(labels), torch.stack(counts)

    def _detections(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        if torch.jit.is_scripting():
            return self.model(images)[1]  # the scripted detector returns (losses, detections)
        return self._eager_detections(images)

    @torch.jit.unused
    def _eager_detections(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.model(images)
