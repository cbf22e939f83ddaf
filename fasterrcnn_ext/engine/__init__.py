"""Training (single process or torchrun/DDP), COCO evaluation, detection on image files, and the demo."""

from .checkpoint import MODEL_BUILDERS, build_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from .demo import demo
from .detect import detect, draw_detections, load_detector
from .evaluate import coco_metrics, evaluate, predict
from .train import TrainConfig, train

__all__ = ["MODEL_BUILDERS", "TrainConfig", "build_model", "coco_metrics", "demo", "detect", "draw_detections",
           "evaluate", "load_checkpoint", "load_detector", "model_from_checkpoint", "predict", "save_checkpoint",
           "train"]
