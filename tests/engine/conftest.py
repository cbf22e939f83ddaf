import pytest
import torch

from fasterrcnn_ext.data import SyntheticShapes
from fasterrcnn_ext.engine import build_model
from fasterrcnn_ext.engine.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A fasterrcnn_tiny checkpoint with random weights, for tests of files, ids and runs (not of detections)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.manual_seed(0)
    model = build_model("fasterrcnn_tiny", 5)
    save_checkpoint(str(path), {"model": model.state_dict(), "model_name": "fasterrcnn_tiny", "num_classes": 5,
                                "class_names": list(SyntheticShapes.class_names), "category_ids": [1, 2, 3, 4]})
    return path
