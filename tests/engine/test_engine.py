"""Training, checkpoints, evaluation and detection, on the tiny model and small synthetic data (seconds each)."""

import importlib.util
import json
import os
import pickle
import signal

import pytest
import torch

from fasterrcnn_ext.data import SyntheticShapes
from fasterrcnn_ext.engine import TrainConfig, build_model, coco_metrics, load_checkpoint, model_from_checkpoint, train
from fasterrcnn_ext.engine.evaluate import detections_to_coco
from fasterrcnn_ext.engine.train import epoch_batches, lr_factor

train_module = importlib.import_module("fasterrcnn_ext.engine.train")  # (the package exports the function `train`)
needs_pycocotools = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None,
                                       reason="pycocotools is not installed (COCO evaluation)")


def _cfg(out, **kw):
    base = dict(data="synthetic", model="fasterrcnn_tiny", out=str(out), max_iters=4, batch_size=2,
                synthetic_images=8, checkpoint_every=2, log_every=1, progress=False, warmup_iters=2)
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_the_loss(tmp_path):
    result = train(_cfg(tmp_path, max_iters=60, synthetic_images=4, lr=0.02, warmup_iters=5))
    curve = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [c["iteration"] for c in curve] == list(range(1, 61))
    first = sum(c["loss"] for c in curve[:5]) / 5
    last = sum(c["loss"] for c in curve[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert result["iteration"] == 60 and not result["interrupted"]
    log = (tmp_path / "log.txt").read_text()
    for name in ("lr:", "loss:", "loss_classifier:", "loss_box_reg:", "loss_objectness:", "loss_rpn_box_reg:"):
        assert name in log


def test_checkpoint_contents_and_model_rebuild(tmp_path):
    train(_cfg(tmp_path))
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["iteration"] == 4 and isinstance(ckpt["iteration"], int)
    assert ckpt["model_name"] == "fasterrcnn_tiny" and ckpt["num_classes"] == 5
    assert {"optimizer", "scheduler", "args", "class_names", "category_ids"} <= set(ckpt)
    model = model_from_checkpoint(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k


def test_existing_run_is_never_overwritten(tmp_path):
    train(_cfg(tmp_path))
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="pass resume="):
        train(_cfg(tmp_path))
    other = tmp_path / "other"
    train(_cfg(other, max_iters=2))
    with pytest.raises(FileExistsError, match="pass resume="):  # resuming another run into this folder
        train(_cfg(tmp_path, max_iters=6, resume=str(other / "last.pt")))
    assert (tmp_path / "last.pt").read_bytes() == before


class _InterruptAt(torch.utils.data.Dataset):
    """Sends this process SIGINT (a Ctrl-C) when item number `at` is loaded: the step being loaded finishes, then the
    loop saves and stops."""

    def __init__(self, dataset, at):
        self.dataset, self.at, self.loaded = dataset, at, 0
        self.num_classes, self.class_names, self.category_ids = (dataset.num_classes, dataset.class_names,
                                                                 dataset.category_ids)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.loaded += 1
        if self.loaded == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.dataset[i]


def test_interrupt_saves_and_resume_continues_exactly(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(_cfg(straight, max_iters=6))

    interrupted = tmp_path / "interrupted"
    original = train_module.build_dataset
    monkeypatch.setattr(train_module, "build_dataset",
                        lambda *a, **k: _InterruptAt(original(*a, **k), at=5))  # while loading step 3
    result = train(_cfg(interrupted, max_iters=6))
    assert result["interrupted"] and result["iteration"] == 3
    assert load_checkpoint(str(interrupted / "last.pt"))["iteration"] == 3
    monkeypatch.setattr(train_module, "build_dataset", original)

    result = train(_cfg(interrupted, max_iters=6, resume=str(interrupted / "last.pt")))
    assert result["iteration"] == 6 and not result["interrupted"]
    a = load_checkpoint(str(straight / "last.pt"))
    b = load_checkpoint(str(interrupted / "last.pt"))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    # The loss curve continues where it stopped, with the same values as the uninterrupted run.
    curve_a = [json.loads(line) for line in (straight / "losses.jsonl").read_text().splitlines()]
    curve_b = [json.loads(line) for line in (interrupted / "losses.jsonl").read_text().splitlines()]
    assert [c["iteration"] for c in curve_b] == list(range(1, 7))
    for x, y in zip(curve_a, curve_b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_resume_rejects_another_model_or_class_count(tmp_path, monkeypatch):
    train(_cfg(tmp_path, max_iters=2))
    last = str(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="fasterrcnn_tiny"):
        train(_cfg(tmp_path / "b", model="fasterrcnn_mobilenet_v3_large_320_fpn", resume=last))
    ckpt = load_checkpoint(last)
    ckpt["num_classes"] = 3
    ckpt["class_names"] = ["a", "b"]
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="classes"):
        train(_cfg(tmp_path / "c", resume=str(tmp_path / "other.pt")))


def test_corrupt_and_foreign_checkpoints_name_the_file(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt"):
        load_checkpoint(str(tmp_path / "foreign.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    # A checkpoint whose weights are of another class count than it claims: a clear error, not a crash.
    model = build_model("fasterrcnn_tiny", 5)
    torch.save({"model": model.state_dict(), "model_name": "fasterrcnn_tiny", "num_classes": 7}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="w.pt"):
        model_from_checkpoint(load_checkpoint(str(tmp_path / "w.pt")), str(tmp_path / "w.pt"))


def test_bad_training_arguments(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        train(_cfg(tmp_path, max_iters=None))
    with pytest.raises(ValueError, match="batch_size"):
        train(_cfg(tmp_path, batch_size=0))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(_cfg(tmp_path, data=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet9000", 3)


def test_epoch_batches_cover_the_data_once_per_epoch_and_split_evenly():
    for world in (1, 2, 3):
        per_rank = [epoch_batches(10, 4, 0, r, world, 3) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # every rank steps the same number of times
        items = [i for b in per_rank for batch in b for i in batch]
        assert set(items) == set(range(10)) and len(items) == 10 + (-10) % world
    assert epoch_batches(10, 0, 0, 0, 1, 4) != epoch_batches(10, 1, 0, 0, 1, 4)
    assert epoch_batches(10, 1, 0, 0, 1, 4) == epoch_batches(10, 1, 0, 0, 1, 4)


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.02) == pytest.approx(1e-3)
    assert lr_factor(10, 10, 100, 0.02) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.02) == pytest.approx(0.02)
    assert lr_factor(55, 10, 100, 0.02) == pytest.approx(0.51)


@needs_pycocotools
def test_coco_metrics_perfect_partial_and_empty():
    ds = SyntheticShapes(6, seed=11)
    gt = ds.coco_ground_truth()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    m = coco_metrics(gt, perfect)
    assert m["map"] == pytest.approx(1.0) and m["map_50"] == pytest.approx(1.0) and m["map_75"] == pytest.approx(1.0)
    present = {a["category_id"] for a in gt["annotations"]}
    for c in gt["categories"]:
        assert (m["per_class"][c["name"]] is None) == (c["id"] not in present)
    wrong_class = [dict(r, category_id=r["category_id"] % 4 + 1) for r in perfect]
    assert coco_metrics(gt, wrong_class)["map_50"] < 0.5
    empty = coco_metrics(gt, [])
    assert empty["map"] == 0.0 and empty["num_detections"] == 0


def test_detections_to_coco():
    det = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "labels": torch.tensor([2]),
           "scores": torch.tensor([0.75])}
    assert detections_to_coco(det, 5, (11, 22)) == [{"image_id": 5, "category_id": 22, "bbox": [10.0, 20.0, 20.0, 40.0],
                                                      "score": 0.75}]
    assert detections_to_coco(det, 5)[0]["category_id"] == 2


def test_epochs_and_amp(tmp_path):
    # 6 images in batches of 2: one epoch is 3 steps. bfloat16 autocast on the CPU trains with finite losses.
    result = train(_cfg(tmp_path, max_iters=None, epochs=1, synthetic_images=6, amp=True))
    assert result["iteration"] == 3
    assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())
    assert load_checkpoint(str(tmp_path / "last.pt"))["iteration"] == 3


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    from fasterrcnn_ext.engine.checkpoint import save_checkpoint
    from fasterrcnn_ext.files import write_json

    path = str(tmp_path / "metrics.json")
    write_json(path, {"map": 0.5})
    with pytest.raises(TypeError):
        write_json(path, {"map": object()})  # not serialisable: fails half way through the dump
    assert json.load(open(path)) == {"map": 0.5}
    ckpt = str(tmp_path / "last.pt")
    save_checkpoint(ckpt, {"iteration": 1})
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local lambda: AttributeError
        save_checkpoint(ckpt, {"iteration": 2, "bad": lambda: None})  # lambdas do not pickle
    assert torch.load(ckpt)["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "metrics.json"]  # no temporary files left behind


def test_cpu_training_runs_in_the_memory_pool_and_restores_it(tmp_path):
    from fasterrcnn_ext import memory

    memory.empty_cpu_cache()
    before = memory.cpu_cache_stats()
    pooled = train(_cfg(tmp_path / "pooled"))
    after = memory.cpu_cache_stats()
    assert after.hits > before.hits  # later steps reused the blocks of earlier ones
    assert after.cached_bytes == 0 and after.limit_bytes == before.limit_bytes  # emptied, limit restored
    plain = train(_cfg(tmp_path / "plain", reuse_cpu_memory=False))
    assert memory.cpu_cache_stats().hits == after.hits and memory.cpu_cache_stats().misses == after.misses
    assert pooled["losses"].keys() == plain["losses"].keys()
    for k in pooled["losses"]:
        assert pooled["losses"][k] == pytest.approx(plain["losses"][k], rel=1e-4, abs=1e-6), k
