"""fasterrcnn_ext.integrations.ray.Detector in Ray Data's map_batches on a local Ray instance: the detections of
`fasterrcnn-ext detect` on the same images. Skipped where Ray is not installed (CI installs it)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn_ext.cli import main
from fasterrcnn_ext.data import SyntheticShapes
from fasterrcnn_ext.engine import build_model
from fasterrcnn_ext.engine.checkpoint import save_checkpoint

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.mark.slow
def test_map_batches_gives_detects_detections(tmp_path):
    from fasterrcnn_ext.integrations.ray import Detector

    weights = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    save_checkpoint(str(weights), {"model": build_model("fasterrcnn_tiny", 5).state_dict(),
                                   "model_name": "fasterrcnn_tiny", "num_classes": 5,
                                   "class_names": list(SyntheticShapes.class_names), "category_ids": [1, 2, 3, 4]})
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 80), (48, 64), (64, 80), (48, 64), (64, 80)], start=1):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "det"
    assert main(["detect", str(folder), "--weights", str(weights), "--out", str(out), "--score-thresh", "0",
                 "--no-progress", "--workers", "0"]) == 0
    expected = {os.path.basename(r["file_name"]): r for r in
                map(json.loads, (out / "detections.jsonl").read_text().splitlines())}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_images(str(folder), mode="RGB", include_paths=True)
        ds = ds.map_batches(Detector, fn_constructor_kwargs={"weights": str(weights), "score_thresh": 0.0},
                            batch_size=4, concurrency=1)
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert sorted(os.path.basename(r["path"]) for r in rows) == sorted(expected)
    assert all("image" not in r for r in rows)
    assert sum(len(r["scores"]) for r in rows) > 0
    for r in rows:
        e = expected[os.path.basename(r["path"])]
        got = _rows(r["boxes"], r["labels"], r["scores"])
        want = _rows(e["boxes"], e["labels"], e["scores"])
        assert np.asarray(r["category_ids"]).tolist() == np.asarray(r["labels"]).tolist()  # ids [1, 2, 3, 4]
        assert got.shape == want.shape and np.array_equal(got[:, 0], want[:, 0])  # labels
        np.testing.assert_allclose(got[:, 1], want[:, 1], atol=1e-4)  # scores
        np.testing.assert_allclose(got[:, 2:], want[:, 2:], atol=0.02)  # boxes (detect rounds to 0.01)


def _rows(boxes, labels, scores) -> np.ndarray:
    """[K, 6] rows (label, score, x1, y1, x2, y2) in an order that detections of equal score cannot swap."""
    rows = np.concatenate([np.asarray(labels, dtype=np.float64).reshape(-1, 1),
                           np.asarray(scores, dtype=np.float64).reshape(-1, 1),
                           np.asarray([np.asarray(b, dtype=np.float64) for b in boxes]).reshape(-1, 4)], axis=1)
    key = np.round(rows, 1)
    return rows[np.lexsort(key.T[::-1])]
