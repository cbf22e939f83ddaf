import importlib.util
import json

import pytest
import torch

from fasterrcnn_ext.benchmark.agreement import detection_agreement


def _det(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_twins_need_label_iou_and_score():
    ref = [_det([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], [1, 2, 3, 4],
                [0.9, 0.8, 0.7, 0.3])]
    other = [_det([[0, 0, 10, 10.2],      # twin of the first
                   [20, 20, 30, 30],      # other label: no twin
                   [40, 40, 50, 50],      # score off by 0.2: no twin
                   [80, 80, 90, 90]],     # nothing of the reference's: extra
                  [1, 1, 3, 2], [0.88, 0.8, 0.5, 0.9])]
    result = detection_agreement(ref, other, iou=0.9, score_tol=0.05, score_thresh=0.5)
    assert result["reference_detections"] == 3  # 0.3 is under the threshold
    assert result["twins"] == 1
    assert result["unmatched_other_detections"] == 3  # [20..30] label 1, [40..50] is 0.5, [80..90]
    assert detection_agreement(ref, ref)["twin_fraction"] == 1.0


def test_each_other_detection_is_a_twin_once():
    ref = [_det([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 1], [0.9, 0.9])]
    other = [_det([[0, 0, 10, 10]], [1], [0.9])]
    assert detection_agreement(ref, other)["twins"] == 1
    empty = [_det([], [], [])]
    assert detection_agreement(empty, empty)["twin_fraction"] == 1.0


@pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None, reason="pycocotools is not installed")
@pytest.mark.slow
def test_cli_reports_both_comparisons_and_writes_json(tmp_path):
    from fasterrcnn_ext.benchmark.agreement import main
    from fasterrcnn_ext.engine import TrainConfig, train

    train(TrainConfig(data="synthetic", model="fasterrcnn_tiny", out=str(tmp_path / "run"), max_iters=2, batch_size=2,
                      synthetic_images=4, checkpoint_every=2, log_every=1, progress=False, warmup_iters=1))
    out = tmp_path / "agreement.json"
    result = main(["--weights", str(tmp_path / "run" / "last.pt"), "--images", "2", "--score-thresh", "0.0",
                   "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["images"] == 2
    for key in ("agreement", "fast_path_agreement"):
        assert 0.0 <= result[key]["twin_fraction"] <= 1.0
    assert set(result) >= {"float32", "bfloat16", "float32_plain"}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
