"""COCO evaluation with pycocotools: detections in the COCO results format, then COCOeval's bbox metrics."""

from __future__ import annotations

import contextlib
import io
import os

import torch
from tqdm import tqdm

from ..files import write_json

COCO_STAT_NAMES = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
                   "mar_small", "mar_medium", "mar_large")


def detections_to_coco(detections: dict, image_id: int, category_ids=None) -> list[dict]:
    """One image's detections ({boxes x1y1x2y2, labels, scores}) as COCO results: {image_id, category_id,
    bbox [x, y, w, h], score}. ``category_ids[label - 1]`` maps labels to category ids (None: the label is the id,
    as for torchvision's COCO weights)."""
    boxes = detections["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    labels = detections["labels"].tolist()
    scores = detections["scores"].detach().float().cpu().tolist()
    return [{"image_id": int(image_id), "category_id": int(category_ids[lab - 1] if category_ids else lab),
             "bbox": [round(v, 2) for v in box], "score": round(s, 5)}
            for box, lab, s in zip(xywh, labels, scores)]


@torch.inference_mode()
def predict(model, dataset, *, batch_size: int = 4, device="cpu", workers: int = 0, progress: bool = True,
            category_ids=None) -> list[dict]:
    """The model's detections on every image of ``dataset``, in the COCO results format. Batches hold images of one
    size only (pipeline.size_batches), so no image is padded for another and each image's detections are what it
    gets alone, whatever the batch size or the sharding over processes (results come in dataset order)."""
    from .pipeline import size_batches

    model.eval().to(device)
    # batch_size=None: the loader decodes item by item; size_batches groups them.
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    items = ((index, image, target) for index, (image, target) in enumerate(loader))
    by_index = {}
    with tqdm(total=len(dataset), desc="eval", disable=not progress, dynamic_ncols=True) as bar:
        for batch in size_batches(items, batch_size, window=4 * batch_size):
            outputs = model([image.to(device) for _, image, _ in batch])
            for (index, _, target), output in zip(batch, outputs):
                by_index[index] = detections_to_coco(output, target["image_id"], category_ids)
            bar.update(len(batch))
    return [r for index in sorted(by_index) for r in by_index[index]]


def coco_metrics(ground_truth: dict, results: list[dict]) -> dict:
    """COCOeval bbox metrics: map, map_50, map_75, ... and per_class AP (by category name; None where the class has
    no ground truth)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    metrics = {"num_images": len(ground_truth["images"]), "num_detections": len(results)}
    if not results:  # pycocotools cannot load an empty result list; nothing detected is an AP of 0
        metrics.update({k: 0.0 for k in COCO_STAT_NAMES})
        has_gt = {a["category_id"] for a in ground_truth.get("annotations", [])}
        metrics["per_class"] = {names[c]: (0.0 if c in has_gt else None) for c in names}
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(results)
        coco_eval = COCOeval(gt, dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            coco_eval.summarize()
    metrics.update({k: float(v) for k, v in zip(COCO_STAT_NAMES, coco_eval.stats)})
    metrics["summary"] = summary.getvalue()
    # precision: [IoU thresholds, recall points, categories, area ranges, max detections]; area "all", 100 dets.
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        per_class[names[cat_id]] = float(p.mean()) if p.size else None
    metrics["per_class"] = per_class
    return metrics


def evaluate(model, dataset, *, batch_size: int = 4, device="cpu", workers: int = 0, progress: bool = True,
             out: str | None = None, precision: str | None = None) -> dict | None:
    """COCO bbox metrics of ``model`` on ``dataset`` (which provides coco_ground_truth() and category_ids). With
    ``out``, also writes out/detections.json (COCO results format) and out/metrics.json. Under torch.distributed,
    rank r predicts images r, r + K, r + 2K, ... (each image once, none repeated to even the shards), rank 0
    gathers the results and alone computes, writes and returns the metrics (the other ranks return None).
    ``precision`` (the --precision the model runs at; engine/precision.py) is recorded in the metrics when given."""
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    shard = dataset if world_size == 1 else torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    results = predict(model, shard, batch_size=batch_size, device=device, workers=workers,
                      progress=progress and rank == 0, category_ids=dataset.category_ids)
    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if rank != 0:
            return None
        results = [r for part in gathered for r in part]
    metrics = coco_metrics(dataset.coco_ground_truth(), results)
    if precision is not None:
        metrics["precision"] = precision
    if out is not None:
        write_json(os.path.join(out, "detections.json"), results)
        write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics
