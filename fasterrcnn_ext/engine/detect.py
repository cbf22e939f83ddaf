"""Detection on image files: annotated PNGs (torchvision.utils.draw_bounding_boxes) and COCO-format results."""

from __future__ import annotations

import os

import torch
import torchvision
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from ..data import load_image
from ..files import is_checkpoint_path, write_json
from ..models import detection
from .checkpoint import load_checkpoint, model_from_checkpoint
from .evaluate import detections_to_coco

# torchvision's weights enums -> our builder of the same model.
_TORCHVISION_BUILDERS = {
    "FasterRCNN_ResNet50_FPN_Weights": detection.fasterrcnn_resnet50_fpn,
    "FasterRCNN_ResNet50_FPN_V2_Weights": detection.fasterrcnn_resnet50_fpn_v2,
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights": detection.fasterrcnn_mobilenet_v3_large_fpn,
    "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights": detection.fasterrcnn_mobilenet_v3_large_320_fpn,
}

# Distinct colours by label (tab10), so a class keeps its colour across pictures.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]


def load_detector(weights: str):
    """(model, class_names, category_ids) from a fasterrcnn_ext checkpoint path or a torchvision weights name such
    as ``FasterRCNN_ResNet50_FPN_Weights.DEFAULT`` (downloaded by torchvision). class_names[label - 1] names a
    label; category_ids is None where labels are COCO category ids already (torchvision's weights)."""
    if is_checkpoint_path(weights):
        checkpoint = load_checkpoint(weights)
        model = model_from_checkpoint(checkpoint, weights)
        return model, list(checkpoint["class_names"]), list(checkpoint["category_ids"])
    try:
        enum_value = torchvision.models.get_weight(weights)
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"--weights {weights}: neither an existing checkpoint file nor a torchvision weights name "
                         f"such as FasterRCNN_ResNet50_FPN_Weights.DEFAULT") from e
    builder = _TORCHVISION_BUILDERS.get(type(enum_value).__name__)
    if builder is None:
        raise ValueError(f"--weights {weights}: not Faster R-CNN weights; choose from "
                         f"{', '.join(n + '.DEFAULT' for n in _TORCHVISION_BUILDERS)}")
    categories = enum_value.meta["categories"]  # index = label, 0 the background
    return builder(weights=enum_value), list(categories[1:]), None


def draw_detections(image: torch.Tensor, detections: dict, class_names, score_thresh: float = 0.0,
                    upscale: int = 1) -> torch.Tensor:
    """uint8 [3, H, W] picture of ``image`` (float [0, 1]) with boxes labelled "name score" above score_thresh;
    ``upscale`` enlarges small images (nearest neighbour) so the labels stay readable."""
    keep = detections["scores"] >= score_thresh
    boxes = detections["boxes"][keep].float().cpu() * upscale
    if upscale != 1:
        image = torch.nn.functional.interpolate(image[None].cpu(), scale_factor=upscale, mode="nearest")[0]
    labels = detections["labels"][keep].tolist()
    scores = detections["scores"][keep].tolist()
    names = [f"{class_names[lab - 1] if 0 < lab <= len(class_names) else lab} {s:.2f}"
             for lab, s in zip(labels, scores)]
    colours = [_PALETTE[lab % len(_PALETTE)] for lab in labels]
    picture = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if len(labels) == 0:
        return picture
    return draw_bounding_boxes(picture, boxes, labels=names, colors=colours, width=2)


def save_png(picture: torch.Tensor, path: str) -> None:
    """uint8 [3, H, W] to a PNG file (PIL: torchvision's image I/O is deprecated)."""
    Image.fromarray(picture.permute(1, 2, 0).contiguous().numpy()).save(path)


def image_id_of(path: str, position: int) -> int:
    """COCO-style ids: the file name's number where it is one (000000397133.jpg -> 397133), else the 1-based
    position on the command line."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else position


def detect(image_paths: list[str], weights: str, out: str, *, score_thresh: float = 0.5, device="cpu",
           progress: bool = True) -> list[dict]:
    """Writes ``out/<image stem>.png`` per image and ``out/detections.json`` (COCO results, with
    ``out/images.json`` mapping image_id to file). Returns the results."""
    if not image_paths:
        raise ValueError("no images given")
    missing = [p for p in image_paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    model, class_names, category_ids = load_detector(weights)
    model.eval().to(device)
    os.makedirs(out, exist_ok=True)
    results, images_info, used_names = [], [], set()
    for position, path in enumerate(image_paths, start=1):
        image = load_image(path)
        with torch.inference_mode():
            detections = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        keep = detections["scores"] >= score_thresh
        detections = {k: v[keep] for k, v in detections.items()}
        image_id = image_id_of(path, position)
        results += detections_to_coco(detections, image_id, category_ids)
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        if name in used_names:  # two inputs with one stem: keep both pictures
            name = f"{position:04d}_{name}"
        used_names.add(name)
        save_png(draw_detections(image, detections, class_names), os.path.join(out, name))
        images_info.append({"id": image_id, "file_name": os.path.abspath(path), "picture": name})
        if progress:
            print(f"{path}: {int(keep.sum())} detections -> {os.path.join(out, name)}", flush=True)
    write_json(os.path.join(out, "detections.json"), results)
    write_json(os.path.join(out, "images.json"), images_info)
    return results
