"""Throughput of detect's pipeline (engine/pipeline.py) over a folder of JPEGs of mixed sizes: our detector against
torchvision's in the same pipeline at batch 1, 4 and 8, and the pipeline against a naive per-image loop (decode,
forward, COCO results, one image after another in one process) with our detector. Images/s is IMAGES / time."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image

# The folder: IMAGES JPEGs cycling through three sizes (landscape, portrait, square), as a photo collection's.
IMAGES = 16
SIZES = ((480, 640), (640, 480), (512, 512))
BATCH_SIZES = (1, 4, 8)


def write_images(folder: str, count: int = IMAGES) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        path = os.path.join(folder, f"{i:06d}.jpg")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def pipeline_pass(model, paths: list[str], batch_size: int, device: str, workers: int | None = None) -> None:
    """One run of detect's pipeline over ``paths`` into a fresh folder (a reused one would be resumed: nothing to
    do), no pictures."""
    from fasterrcnn_ext.engine.pipeline import run_detect

    out = tempfile.mkdtemp(prefix="bench-pipeline-")
    shutil.rmtree(out)  # run_detect makes it, and removes it only where it made it
    try:
        run_detect(paths, list(range(1, len(paths) + 1)), model, [], None, out, run={}, score_thresh=0.0,
                   device=device, batch_size=batch_size, workers=workers, pictures=0, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@torch.inference_mode()
def naive_pass(model, paths: list[str], device: str) -> None:
    """The per-image loop: decode, forward, COCO results, in series."""
    from fasterrcnn_ext.data import load_image
    from fasterrcnn_ext.engine.evaluate import detections_to_coco

    results = []
    for image_id, path in enumerate(paths, start=1):
        detections = model([load_image(path).to(device)])[0]
        results += detections_to_coco(detections, image_id)


def pipeline_cases(device: str) -> list:
    from torchvision.models.detection import faster_rcnn as tv

    from fasterrcnn_ext.benchmark.cases import Case
    from fasterrcnn_ext.models import detection as ours

    torch.manual_seed(0)
    theirs = tv.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval().to(device)
    mine = ours.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval().to(device)
    mine.load_state_dict(theirs.state_dict())
    folder = tempfile.TemporaryDirectory(prefix="bench-images-")  # removed with the last case that holds it
    paths = write_images(folder.name)
    cases = []
    for b in BATCH_SIZES:
        cases.append(Case(f"pipeline {IMAGES} imgs MobileNet-320, batch {b}, vs torchvision's model",
                          lambda b=b, f=folder: pipeline_pass(mine, paths, b, device),
                          lambda b=b, f=folder: pipeline_pass(theirs, paths, b, device), target=1.3))
    for b in BATCH_SIZES:
        cases.append(Case(f"pipeline {IMAGES} imgs MobileNet-320, batch {b}, vs our per-image loop",
                          lambda b=b, f=folder: pipeline_pass(mine, paths, b, device),
                          lambda f=folder: naive_pass(mine, paths, device), target=1.3 if b == 4 else 1.0))
    return cases
