"""The demo: trains fasterrcnn_tiny on generated shapes on the CPU, evaluates it on held-out images and draws its
detections. With the defaults it takes about 4 minutes on 2 CPU cores (220 s measured)."""

from __future__ import annotations

import os
import time

import torch

from .._arguments import argument_error
from ..data import build_dataset
from ..files import write_json
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .detect import draw_detections, save_png
from .evaluate import evaluate
from .train import TrainConfig, train

DEMO_PICTURES = 8


def demo(out: str, *, max_iters: int = 1500, train_images: int = 1000, val_images: int = 200, batch_size: int = 4,
         seed: int = 0, device: str | None = None, progress: bool = True) -> dict:
    """Writes out/last.pt (the training checkpoint), out/model.pt (model only), out/metrics.json and
    out/pictures/*.png; returns the metrics."""
    for name in ("model.pt", "metrics.json"):
        if os.path.exists(os.path.join(out, name)):
            raise argument_error(FileExistsError, "{path:value} exists from an earlier demo: choose another "
                                 "{out:name}", path=os.path.join(out, name), out=out)
    start = time.time()
    cfg = TrainConfig(data="synthetic", model="fasterrcnn_tiny", out=out, max_iters=max_iters,
                      batch_size=batch_size, synthetic_images=train_images, seed=seed, device=device,
                      progress=progress)
    result = train(cfg)
    train_seconds = time.time() - start
    checkpoint = load_checkpoint(result["checkpoint"])
    model = model_from_checkpoint(checkpoint, result["checkpoint"]).eval()
    save_checkpoint(os.path.join(out, "model.pt"), {k: checkpoint[k] for k in (
        "model", "model_name", "num_classes", "class_names", "category_ids")})
    held_out = build_dataset("synthetic", train=False, split="val", seed=seed, synthetic_images=val_images)
    dev = "cuda" if device == "cuda" else "cpu"
    metrics = evaluate(model, held_out, device=dev, progress=progress)
    metrics.update(train_seconds=round(train_seconds, 1), total_seconds=round(time.time() - start, 1),
                   iterations=result["iteration"], train_images=train_images, held_out_images=val_images)
    os.makedirs(os.path.join(out, "pictures"), exist_ok=True)
    with torch.inference_mode():
        for index in range(min(DEMO_PICTURES, val_images)):
            image, _ = held_out[index]
            detections = model([image.to(dev)])[0]
            picture = draw_detections(image, detections, checkpoint["class_names"], score_thresh=0.5, upscale=3)
            save_png(picture, os.path.join(out, "pictures", f"heldout_{index:03d}.png"))
    write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics
