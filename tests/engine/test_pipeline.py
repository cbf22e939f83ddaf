"""detect over collections (engine/pipeline.py): inputs, batching by size, JSON Lines, pictures, resuming after a
killed run, and torchrun sharding of detect and eval with two gloo processes."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn_ext.cli import main
from fasterrcnn_ext.data import SyntheticShapes
from fasterrcnn_ext.engine.pipeline import size_batches


def _images(folder, sizes):
    """PNG files 1.png, 2.png, ... of the given (H, W), random content."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes, start=1):
        path = os.path.join(folder, f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _lines(out):
    return [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]


def test_size_batches_hold_one_size_and_every_item_once():
    items = [(i, torch.zeros(3, 8 + 8 * (i % 3), 8), None) for i in range(20)] + [(20, None, "bad")]
    batches = list(size_batches(iter(items), batch_size=4, window=12))
    assert sorted(i for b in batches for i, _, _ in b) == list(range(21))
    assert all(len(b) <= 4 and len({tuple(x.shape) for _, x, _ in b if x is not None}) <= 1 for b in batches)
    assert sum(len(b) == 4 for b in batches) >= 3  # grouped, not one image at a time


def test_batches_give_batch_ones_detections_and_inputs_of_every_kind(tiny_checkpoint, tmp_path):
    paths = _images(tmp_path / "in", [(64, 80), (48, 64), (64, 80), (48, 64), (64, 80)])
    listing = tmp_path / "list.txt"
    listing.write_text("in/1.png\n# a comment\n\nin/2.png\n")
    one, four = tmp_path / "b1", tmp_path / "b4"
    assert main(["detect", *paths, "--weights", str(tiny_checkpoint), "--out", str(one), "--score-thresh", "0",
                 "--no-progress", "--workers", "0"]) == 0
    assert main(["detect", str(tmp_path / "in" / "*.png"), "--weights", str(tiny_checkpoint), "--out", str(four),
                 "--score-thresh", "0", "--batch-size", "4", "--pictures", "2", "--no-progress"]) == 0
    a, b = _lines(one), _lines(four)
    assert [r["file_name"] for r in a] == [r["file_name"] for r in b] == [os.path.abspath(p) for p in paths]
    assert [(r["width"], r["height"]) for r in a] == [(80, 64), (64, 48), (80, 64), (64, 48), (80, 64)]
    assert sum(len(r["scores"]) for r in a) > 0
    for x, y in zip(a, b):
        assert x["image_id"] == y["image_id"]
        want, got = _rows(x), _rows(y)
        assert got.shape == want.shape and np.array_equal(got[:, 0], want[:, 0])  # labels
        np.testing.assert_allclose(got[:, 1], want[:, 1], atol=1e-4)  # scores
        np.testing.assert_allclose(got[:, 2:], want[:, 2:], atol=0.05)  # boxes
    assert sorted(f for f in os.listdir(four) if f.endswith(".png")) == ["1.png", "2.png"]
    assert len(json.loads((four / "detections.json").read_text())) == sum(len(r["scores"]) for r in a)
    # A text file of paths, relative to its folder.
    listed = tmp_path / "listed"
    assert main(["detect", str(listing), "--weights", str(tiny_checkpoint), "--out", str(listed), "--no-progress"]) == 0
    assert [os.path.basename(r["file_name"]) for r in _lines(listed)] == ["1.png", "2.png"]
    # A COCO-format folder: its images, with its ids.
    SyntheticShapes(2, seed=4, image_size=64).write_coco(str(tmp_path / "coco"), "val")
    coco_out = tmp_path / "coco_out"
    assert main(["detect", "--data", str(tmp_path / "coco"), "--weights", str(tiny_checkpoint), "--out", str(coco_out),
                 "--no-progress"]) == 0
    assert [r["image_id"] for r in _lines(coco_out)] == [1, 2]


def _rows(record) -> np.ndarray:
    """[K, 6] rows (label, score, x1, y1, x2, y2) in an order that detections of equal score cannot swap."""
    rows = np.concatenate([np.asarray(record["labels"], dtype=np.float64).reshape(-1, 1),
                           np.asarray(record["scores"], dtype=np.float64).reshape(-1, 1),
                           np.asarray(record["boxes"], dtype=np.float64).reshape(-1, 4)], axis=1)
    return rows[np.lexsort(np.round(rows, 1).T[::-1])]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.mark.slow
def test_a_killed_run_continues_and_holds_every_image_once(tiny_checkpoint, tmp_path):
    paths = _images(tmp_path / "in", [(64, 64)] * 12)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fasterrcnn_ext", "detect", str(tmp_path / "in"), "--weights",
           str(tiny_checkpoint), "--out", str(out), "--score-thresh", "0", "--workers", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    part = out / "parts" / "rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not part.exists() or len(part.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = len(part.read_text().splitlines())
    assert 3 <= done < 12 and not (out / "detections.jsonl").exists()
    with open(part, "a") as f:  # a line torn by the kill
        f.write('{"file_name": "' + os.path.abspath(paths[-1]) + '", "image_id": 12, "box')
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert rerun.returncode == 0, rerun.stderr
    lines = _lines(out)
    assert [r["file_name"] for r in lines] == [os.path.abspath(p) for p in sorted(paths)]
    assert len({r["image_id"] for r in lines}) == 12 and not (out / "parts").exists()
    # A third run finds everything done and rewrites the same files.
    before = (out / "detections.json").read_text()
    assert main(cmd[3:]) == 0
    assert (out / "detections.json").read_text() == before and len(_lines(out)) == 12
    # Another threshold in the same folder would mix two runs: refused.
    assert main([*cmd[3:-5], "--score-thresh", "0.5", "--no-progress"]) == 2


@pytest.mark.slow
def test_torchrun_shards_detect_and_eval_exactly(tiny_checkpoint, tmp_path):
    paths = _images(tmp_path / "in", [(64, 64)] * 5)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "fasterrcnn_ext"]
    out = tmp_path / "det"
    proc = subprocess.run([*torchrun, "detect", str(tmp_path / "in"), "--weights", str(tiny_checkpoint), "--out",
                           str(out), "--score-thresh", "0", "--batch-size", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["file_name"] for r in _lines(out)] == [os.path.abspath(p) for p in paths]
    # eval: the 2 processes' metrics are one process's, on 5 images (uneven shards, none repeated).
    SyntheticShapes(5, seed=4, image_size=64).write_coco(str(tmp_path / "coco"), "val")
    args = ["eval", "--data", str(tmp_path / "coco"), "--weights", str(tiny_checkpoint), "--batch-size", "1",
            "--no-progress"]
    proc = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "e2")], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert main([*args, "--out", str(tmp_path / "e1")]) == 0
    two = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    one = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert two["num_detections"] == one["num_detections"] > 0
    assert {k: two[k] for k in ("map", "map_50", "mar_100")} == pytest.approx({k: one[k] for k in
                                                                               ("map", "map_50", "mar_100")})
    assert sorted(r["image_id"] for r in json.loads((tmp_path / "e2" / "detections.json").read_text())) == sorted(
        r["image_id"] for r in json.loads((tmp_path / "e1" / "detections.json").read_text()))


def test_benchmark_passes_run_and_leave_no_folder(tiny_checkpoint, tmp_path, monkeypatch):
    """The pipeline benchmark's two loops over images (fasterrcnn_tiny here; the group times MobileNet-320)."""
    from fasterrcnn_ext.benchmark import cases, throughput
    from fasterrcnn_ext.engine import load_detector

    assert "pipeline" in cases.ALL_CASES
    monkeypatch.setattr(throughput, "SIZES", ((48, 64), (64, 48)))
    paths = throughput.write_images(str(tmp_path), count=3)
    assert [Image.open(p).size for p in paths] == [(64, 48), (48, 64), (64, 48)]
    model, _, _ = load_detector(str(tiny_checkpoint))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    throughput.pipeline_pass(model, paths, batch_size=2, device="cpu", workers=1)
    throughput.naive_pass(model, paths, "cpu")
    assert os.listdir(tmp_path / "tmp") == []


class _MixedSizes(torch.utils.data.Dataset):
    """Images of three sizes, interleaved, with COCO-style targets."""

    def __init__(self, n):
        generator = torch.Generator().manual_seed(5)
        sizes = [(64, 64), (80, 48), (56, 72)]
        self.images = [torch.rand(3, *sizes[i % 3], generator=generator) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], {"image_id": 100 + index}


def test_eval_predictions_do_not_depend_on_batch_size_with_mixed_sizes():
    """predict batches only images of one size: no image is padded for another, so each image's detections are
    what it gets alone, and 2-process eval (another batch composition per shard) gives one process's results."""
    from fasterrcnn_ext.engine.evaluate import predict
    from fasterrcnn_ext.models.detection import fasterrcnn_tiny

    torch.manual_seed(0)
    model = fasterrcnn_tiny(weights=None, box_score_thresh=0.0).eval()
    dataset = _MixedSizes(7)
    with torch.no_grad():
        one = predict(model, dataset, batch_size=1, progress=False)
        three = predict(model, dataset, batch_size=3, progress=False)
        shards = [predict(model, torch.utils.data.Subset(dataset, range(r, 7, 2)), batch_size=2, progress=False)
                  for r in range(2)]
    assert one and [r["image_id"] for r in one] == sorted(r["image_id"] for r in one)  # dataset order
    for other in (three, sorted(shards[0] + shards[1], key=lambda r: r["image_id"])):
        assert [(r["image_id"], r["category_id"]) for r in other] == [(r["image_id"], r["category_id"]) for r in one]
        np.testing.assert_allclose([r["bbox"] for r in other], [r["bbox"] for r in one], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose([r["score"] for r in other], [r["score"] for r in one], rtol=1e-4, atol=1e-5)


def test_default_workers_follow_the_cores_the_model_leaves_and_the_collection(monkeypatch):
    from fasterrcnn_ext.engine import pipeline

    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert pipeline.default_workers(1000, "cpu") == 0  # the model's threads take every core
    assert pipeline.default_workers(1000, "cuda") == pipeline.MAX_DEFAULT_WORKERS
    assert pipeline.default_workers(pipeline.MIN_IMAGES_FOR_WORKERS - 1, "cuda") == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert pipeline.default_workers(1000, "cpu") == 2
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert pipeline.default_workers(1000, "cuda:0") == 0
