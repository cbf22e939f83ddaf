"""Ray Data: the detector as a callable class for ``Dataset.map_batches`` (``pip install fasterrcnn_ext[ray]``).

    import ray
    from fasterrcnn_ext.integrations.ray import Detector

    ds = ray.data.read_images("s3://bucket/images", mode="RGB", include_paths=True)
    ds = ds.map_batches(Detector, fn_constructor_kwargs={"weights": "runs/a/last.pt"}, batch_size=16,
                        concurrency=4)            # 4 actors, each building the model once; num_gpus=1 for a GPU each
    ds.write_parquet("s3://bucket/detections")    # columns path, boxes, labels, scores (and category_ids)

Ray itself is not imported here: the class is plain Python that Ray constructs in each actor.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.pipeline import size_batches


def _objects(values: list) -> np.ndarray:
    """A 1-D object array of per-image arrays of different lengths (np.array would stack equal ones into 2-D)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


class Detector:
    """Detections for batches of Ray Data rows: ``batch[image_column]`` holds uint8 images [H, W, 3] (or [H, W],
    greyscale), as ``ray.data.read_images`` makes them; the output has columns ``boxes`` (float32 [K, 4], x1y1x2y2),
    ``labels`` (int64 [K]), ``scores`` (float32 [K]) and ``category_ids`` (int64 [K], the COCO category ids), with
    every other column (such as ``path``) carried through and the image column left out.

    Args:
        weights: what ``fasterrcnn-ext detect --weights`` takes: a checkpoint, a torchvision weights name, or a
            bare state_dict with ``model``.
        model: the builder's name for a bare state_dict file.
        score_thresh: detections below it are dropped.
        device: "cpu" or "cuda" (give the actors GPUs with map_batches' num_gpus).
        max_batch: images per forward pass; a batch holds images of one size (none padded for another), so the
            detections equal ``fasterrcnn-ext detect``'s.
    """

    def __init__(self, weights: str, *, model: str | None = None, score_thresh: float = 0.5, device: str = "cpu",
                 image_column: str = "image", max_batch: int = 8):
        from ..engine.detect import load_detector

        self.model, self.class_names, category_ids = load_detector(weights, model)
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.score_thresh = score_thresh
        self.image_column = image_column
        self.max_batch = max_batch
        self.category_ids = np.asarray(category_ids or range(1, len(self.class_names) + 1), dtype=np.int64)

    def _tensor(self, image) -> torch.Tensor:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
            raise ValueError(f"column {self.image_column!r}: expected uint8 images [H, W, 3] (read_images with "
                             f"mode='RGB'), got {array.dtype} {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array[:, :, :3])).permute(2, 0, 1).float().div_(255)

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        images = [self._tensor(image) for image in batch[self.image_column]]
        detections: list = [None] * len(images)
        for group in size_batches(((i, image, None) for i, image in enumerate(images)), self.max_batch,
                                  window=8 * self.max_batch):
            outputs = self.model([image.to(self.device) for _, image, _ in group])
            for (i, _, _), output in zip(group, outputs):
                keep = output["scores"] >= self.score_thresh
                detections[i] = {k: v[keep].cpu().numpy() for k, v in output.items()}
        out = {k: v for k, v in batch.items() if k != self.image_column}
        out["boxes"] = _objects([d["boxes"].astype(np.float32).reshape(-1, 4) for d in detections])
        out["labels"] = _objects([d["labels"].astype(np.int64) for d in detections])
        out["scores"] = _objects([d["scores"].astype(np.float32) for d in detections])
        out["category_ids"] = _objects([self.category_ids[d["labels"] - 1] if self.category_ids.size else
                                        d["labels"] for d in detections])
        return out
