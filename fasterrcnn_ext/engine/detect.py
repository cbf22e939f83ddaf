"""Detection on image files: the detector from weights, annotated PNGs (torchvision.utils.draw_bounding_boxes);
the run itself is engine/pipeline.py's."""

from __future__ import annotations

import os

import torch
import torchvision
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from .._arguments import argument_error
from ..files import (
    describe_checkpoint,
    is_checkpoint_path,
    read_checkpoint_file,
    state_dict_of,
)
from .checkpoint import MODEL_BUILDERS, checked_checkpoint, model_from_checkpoint
from .pipeline import expand_inputs, run_detect
from .precision import (
    CALIBRATION_IMAGES,
    calibration_paths,
    check_precision,
    load_calibration_images,
    with_precision,
)

# torchvision's weights enums -> our builder of the same model: the builders of MODEL_BUILDERS that torchvision has
# under the same name.
_TORCHVISION_BUILDERS = {
    torchvision.models.get_model_weights(name).__name__: builder
    for name, builder in MODEL_BUILDERS.items()
    if name in torchvision.models.list_models(module=torchvision.models.detection)
}

# Distinct colours by label (tab10), so a class keeps its colour across pictures.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]


def load_detector(weights: str, model_name: str | None = None):
    """(model, class_names, category_ids) from a fasterrcnn_ext checkpoint path, a bare state_dict file (a
    torchvision-trained .pth; ``model_name`` says which builder's) or a torchvision weights name such as
    ``FasterRCNN_ResNet50_FPN_Weights.DEFAULT`` (downloaded by torchvision). class_names[label - 1] names a label;
    category_ids is None where labels are COCO category ids already (torchvision's weights, and bare state_dicts of
    91 classes: COCO's)."""
    if is_checkpoint_path(weights):
        checkpoint = read_checkpoint_file(weights)
        if isinstance(checkpoint, dict) and "model_name" in checkpoint:
            if model_name is not None and model_name != checkpoint["model_name"]:
                raise argument_error(ValueError, "{weights} holds {what:value}, not a {model_name}",
                                     weights=weights, what=describe_checkpoint(checkpoint), model_name=model_name)
            checkpoint = checked_checkpoint(checkpoint, weights)
            model = model_from_checkpoint(checkpoint, weights)
            return model, list(checkpoint["class_names"]), list(checkpoint["category_ids"])
        return _from_state_dict(weights, checkpoint, model_name)
    if model_name is not None:
        raise argument_error(ValueError, "{model_name} applies to a state_dict file; torchvision weights "
                             "({weights:value}) name their model", model_name=model_name, weights=weights)
    try:
        enum_value = torchvision.models.get_weight(weights)
    except (ValueError, KeyError, AttributeError) as e:
        raise argument_error(ValueError, "{weights}: neither an existing checkpoint file nor a torchvision weights "
                             "name such as FasterRCNN_ResNet50_FPN_Weights.DEFAULT", weights=weights) from e
    builder = _TORCHVISION_BUILDERS.get(type(enum_value).__name__)
    if builder is None:
        raise argument_error(ValueError, "{weights}: not Faster R-CNN weights; choose from {names:value}",
                             weights=weights, names=", ".join(n + ".DEFAULT" for n in _TORCHVISION_BUILDERS))
    categories = enum_value.meta["categories"]  # index = label, 0 the background
    return builder(weights=enum_value), list(categories[1:]), None


# torchvision's COCO category names, label = index (the background first, "N/A" where COCO left an id out).
COCO_CATEGORIES = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]


def _from_state_dict(path: str, checkpoint, model_name: str | None):
    """A bare state_dict (or {"model": state_dict}) of the builder ``model_name``; a 91-class one is taken as COCO's
    classes, as torchvision's weights are, else its labels are their own category ids."""
    if model_name is None:
        raise argument_error(ValueError, "{weights} holds {what:value}, not a fasterrcnn_ext checkpoint: say which "
                             "model it is with {model_name:name} (one of {names:value})", weights=path,
                             what=describe_checkpoint(checkpoint), model_name=model_name,
                             names=", ".join(MODEL_BUILDERS))
    if model_name not in MODEL_BUILDERS:
        raise argument_error(ValueError, "{model_name}: choose from {names:value}", model_name=model_name,
                             names=", ".join(MODEL_BUILDERS))
    state = state_dict_of(checkpoint, path)
    predictor = state.get("roi_heads.box_predictor.cls_score.weight")
    if predictor is None:
        raise argument_error(ValueError, "{weights} holds {what:value}: no Faster R-CNN box predictor "
                             "(roi_heads.box_predictor.cls_score.weight)", weights=path,
                             what=describe_checkpoint(checkpoint))
    num_classes = int(predictor.shape[0])
    model = MODEL_BUILDERS[model_name](weights=path, num_classes=num_classes)
    if num_classes == len(COCO_CATEGORIES):
        return model, list(COCO_CATEGORIES[1:]), None
    return model, [f"class {label}" for label in range(1, num_classes)], list(range(1, num_classes))


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
    """uint8 [3, H, W] to a PNG file, a path or a binary file object (PIL: torchvision's image I/O is deprecated)."""
    Image.fromarray(picture.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")


# The files a folder argument contributes (searched recursively), by extension, case-insensitive.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def expand_image_paths(inputs: list[str]) -> list[str]:
    """Image files, folders (each searched recursively for IMAGE_EXTENSIONS, in sorted order), globs and text files
    of paths to the list of image files, in the order given. FileNotFoundError names every input that does not
    exist; ValueError names a folder without images."""
    return expand_inputs(list(inputs), IMAGE_EXTENSIONS)


def image_ids(paths: list[str]) -> list[int]:
    """COCO-style ids, unique: the file names' numbers (000000397133.jpg -> 397133) where every name is a number
    and no two are equal, else the 1-based positions."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if all(stem.isdigit() for stem in stems):
        numbers = [int(stem) for stem in stems]
        if len(set(numbers)) == len(numbers):
            return numbers
    return list(range(1, len(paths) + 1))


def detect(image_paths: list[str], weights: str, out: str, *, score_thresh: float = 0.5, device="cpu",
           progress: bool = True, model_name: str | None = None, batch_size: int = 1, workers: int | None = None,
           pictures: int | None = None, coco: str | None = None, split: str = "val", precision: str = "fp32",
           calibration: str | None = None, calibration_images: int = CALIBRATION_IMAGES) -> list[dict] | None:
    """Detects objects in image files, folders (recursively), globs and text files of paths, or in the images of a
    COCO-format dataset (``coco``, its ``split``; ids from its annotation file), with engine/pipeline.py: batched,
    sharded under torchrun, resumable. Writes ``out/detections.jsonl`` (a line per image), ``out/detections.json``
    (COCO results), ``out/images.json`` (image_id to file) and ``out/<image stem>.png`` for the first ``pictures``
    images (default: all up to pipeline.DEFAULT_PICTURES_LIMIT images, else none). An image that cannot be read or
    detected is skipped with a warning naming it, and listed in ``out/failures.json`` (file, error); the run stops
    with a ValueError, leaving no folder it made, only where no image succeeded. Returns the results on rank 0.

    ``precision`` (engine/precision.py): fp32, bf16 or int8; int8 calibrates on the first ``calibration_images``
    readable images of the run (every process on the same ones, so a rerun or another rank quantizes alike), or of
    ``calibration`` (a folder, glob or list file of images). A folder's run.json records a precision other than
    fp32, so that a rerun at another precision is refused."""
    if coco is not None:
        if image_paths:
            raise argument_error(ValueError, "give {image_paths:name} or {coco:name}, not both",
                                 image_paths=image_paths, coco=coco)
        from ..data import CocoDetection

        dataset = CocoDetection(coco, split)
        paths = [os.path.join(dataset.image_dir, info["file_name"]) for info in dataset.images]
        ids = [int(info["id"]) for info in dataset.images]
    else:
        if not image_paths:
            raise ValueError("no images given")
        paths = expand_image_paths(list(image_paths))
        ids = image_ids(paths)
    if not paths:
        raise ValueError("no images given")
    if batch_size < 1:
        raise argument_error(ValueError, "{batch_size}: at least 1", batch_size=batch_size)
    check_precision(precision, device)
    if calibration is not None and precision != "int8":
        raise argument_error(ValueError, "{calibration:name} applies to {precision:name} int8, not {precision:value}",
                             calibration=calibration, precision=precision)
    model, class_names, category_ids = load_detector(weights, model_name)
    run = {"weights": os.path.abspath(weights) if is_checkpoint_path(weights) else weights, "model": model_name,
           "score_thresh": score_thresh}
    if precision != "fp32":  # the default, left out: a run.json without a precision is an fp32 run
        run["precision"] = precision
    calibration_set = None
    if precision == "int8":
        source = calibration_paths(calibration) if calibration is not None else paths
        calibration_set = load_calibration_images(source, calibration_images)
        run["calibration"] = {"images": os.path.abspath(calibration) if calibration is not None else "the run's first",
                              "count": len(calibration_set)}
    model = with_precision(model, precision, calibration_set, device)
    return run_detect(paths, ids, model, class_names, category_ids, out, run=run, score_thresh=score_thresh,
                      device=device, batch_size=batch_size, workers=workers, pictures=pictures, progress=progress)
