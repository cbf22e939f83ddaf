"""Smoke tests of every fasterrcnn-ext subcommand, DDP with two gloo processes, and Ctrl-C in a real process."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fasterrcnn_ext.cli import main
from fasterrcnn_ext.data import SyntheticShapes
from fasterrcnn_ext.engine import load_checkpoint

needs_pycocotools = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None,
                                       reason="pycocotools is not installed (COCO evaluation)")

TRAIN_FAST = ["--model", "fasterrcnn_tiny", "--batch-size", "2", "--synthetic-images", "6", "--no-progress",
              "--log-every", "1", "--warmup-iters", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "synthetic", "--out", str(out), "--max-iters", "3", *TRAIN_FAST]) == 0
    return out


def test_train_writes_checkpoint_and_logs(trained):
    ckpt = load_checkpoint(str(trained / "last.pt"))
    assert ckpt["iteration"] == 3 and ckpt["args"]["batch_size"] == 2
    assert "loss_rpn_box_reg" in (trained / "log.txt").read_text()


def test_train_resume_via_cli(trained, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train", "--data", "synthetic", "--out", str(run), "--max-iters", "5", "--resume",
                 str(run / "last.pt"), *TRAIN_FAST]) == 0
    assert load_checkpoint(str(run / "last.pt"))["iteration"] == 5
    iterations = [json.loads(line)["iteration"] for line in (run / "losses.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4, 5]


def test_train_refuses_to_overwrite_a_run(trained, capsys):
    before = (trained / "last.pt").read_bytes()
    assert main(["train", "--data", "synthetic", "--out", str(trained), "--max-iters", "1", *TRAIN_FAST]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (trained / "last.pt").read_bytes() == before


def test_train_on_a_coco_folder_skipping_a_bad_image(tmp_path, capsys):
    root = tmp_path / "coco"
    SyntheticShapes(4, seed=3, image_size=96).write_coco(str(root), "train2017")
    (root / "train2017" / "000002.png").write_bytes(b"truncated")
    args = ["train", "--data", str(root), "--out", str(tmp_path / "run"), "--max-iters", "3", *TRAIN_FAST]
    assert main(args) == 2  # a corrupt image stops training, naming the file
    assert "000002.png" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="000002.png"):
        assert main([*args, "--out", str(tmp_path / "run2"), "--skip-bad-images"]) == 0
    ckpt = load_checkpoint(str(tmp_path / "run2" / "last.pt"))
    assert ckpt["iteration"] == 3 and ckpt["class_names"] == list(SyntheticShapes.class_names)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run3"), "--max-iters", "1",
                 *TRAIN_FAST]) == 2  # no annotations folder
    assert "instances_train" in capsys.readouterr().err


@needs_pycocotools
def test_eval_synthetic(trained, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--data", "synthetic", "--weights", str(trained / "last.pt"), "--out", str(out),
                 "--synthetic-images", "4", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"map", "map_50", "map_75", "per_class"} <= set(metrics)
    assert set(metrics["per_class"]) <= set(SyntheticShapes.class_names)
    assert isinstance(json.loads((out / "detections.json").read_text()), list)


@needs_pycocotools
def test_eval_coco_folder_and_class_mismatch(trained, tmp_path):
    SyntheticShapes(3, seed=9, image_size=96).write_coco(str(tmp_path / "coco"), "val2017")
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(tmp_path / "coco"), "--weights", str(trained / "last.pt"), "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 3
    gt = json.loads((tmp_path / "coco" / "annotations" / "instances_val2017.json").read_text())
    gt["categories"] = gt["categories"][:2]
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] <= 2]
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))
    assert main(["eval", "--data", str(tmp_path / "coco"), "--weights", str(trained / "last.pt"), "--out", str(out),
                 "--no-progress"]) == 2


def test_detect_writes_pictures_and_coco_results(trained, tmp_path, capsys):
    SyntheticShapes(2, seed=4, image_size=96).write_coco(str(tmp_path / "imgs"), "x")
    images = [str(tmp_path / "imgs" / "x" / f"{i:06d}.png") for i in (1, 2)]
    out = tmp_path / "det"
    assert main(["detect", *images, "--weights", str(trained / "last.pt"), "--out", str(out),
                 "--score-thresh", "0.0"]) == 0
    assert sorted(os.listdir(out)) == ["000001.png", "000002.png", "detections.json", "detections.jsonl", "images.json",
                                       "run.json"]
    from PIL import Image
    with Image.open(out / "000001.png") as picture:
        assert picture.size == (96, 96)
    results = json.loads((out / "detections.json").read_text())
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert r["image_id"] in (1, 2) and 1 <= r["category_id"] <= 4 and len(r["bbox"]) == 4
    # Missing image files and unknown weights: an error naming them.
    assert main(["detect", str(tmp_path / "nope.png"), "--weights", str(trained / "last.pt"), "--out", str(out)]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert main(["detect", *images, "--weights", "NoSuchWeights.DEFAULT", "--out", str(out)]) == 2
    assert "NoSuchWeights" in capsys.readouterr().err


def test_detect_resolves_torchvision_weights_names():
    import torchvision

    from fasterrcnn_ext.engine.detect import _TORCHVISION_BUILDERS
    assert sorted(_TORCHVISION_BUILDERS) == ["FasterRCNN_MobileNet_V3_Large_320_FPN_Weights",
                                             "FasterRCNN_MobileNet_V3_Large_FPN_Weights",
                                             "FasterRCNN_ResNet50_FPN_V2_Weights", "FasterRCNN_ResNet50_FPN_Weights"]
    for name, builder in _TORCHVISION_BUILDERS.items():
        assert builder.__module__.startswith("fasterrcnn_ext.")
        weights = torchvision.models.get_weight(name + ".DEFAULT")  # no download: the enum only
        assert torchvision.models.get_model_weights(builder.__name__) is type(weights)
        assert weights.meta["categories"][0] == "__background__"


@needs_pycocotools
def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-iters", "3", "--train-images", "4", "--val-images", "2",
                 "--batch-size", "2", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 3 and metrics["held_out_images"] == 2
    assert sorted(os.listdir(out / "pictures")) == ["heldout_000.png", "heldout_001.png"]
    from PIL import Image
    with Image.open(out / "pictures" / "heldout_000.png") as picture:
        assert picture.size == (3 * 192, 3 * 192)  # enlarged so the labels are readable
    ckpt = load_checkpoint(str(out / "model.pt"))
    assert ckpt["model_name"] == "fasterrcnn_tiny" and "optimizer" not in ckpt
    # A second demo with the same --out leaves the first alone and writes beside it.
    before = (out / "model.pt").read_bytes()
    assert main(["demo", "--out", str(out), "--max-iters", "1", "--train-images", "2", "--val-images", "1",
                 "--batch-size", "2", "--no-progress"]) == 0
    assert (out / "model.pt").read_bytes() == before
    assert json.loads((tmp_path / "demo-2" / "metrics.json").read_text())["iterations"] == 1


def test_bench_quick(tmp_path, capsys):
    assert main(["bench", "--quick", "--only", "nms", "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["results"] and all(r["ours_ms"] > 0 and r["torchvision_ms"] > 0 for r in result["results"])
    assert "speed-up" in capsys.readouterr().out


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.mark.slow
def test_python_dash_m_and_ddp_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fasterrcnn_ext", "train", "--data", "synthetic", "--out", str(out), "--max-iters", "3",
           "--device", "cpu", *TRAIN_FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["iteration"] == 3
    assert ckpt["args"]["batch_size"] == 2
    # Rank 0 alone logs: one line per step.
    assert len((out / "log.txt").read_text().splitlines()) == 3


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fasterrcnn_ext", "train", "--data", "synthetic", "--out", str(out),
           "--max-iters", "100000", *TRAIN_FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    curve = out / "losses.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not curve.exists() or len(curve.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert 2 <= ckpt["iteration"] < 100000
    assert f"--resume {out / 'last.pt'}" in stderr
    assert ckpt["model"]["rpn.head.conv.0.0.weight"].isfinite().all()


@needs_pycocotools
@pytest.mark.slow
def test_demo_defaults_reach_the_target(demo_run):
    """The README's main job: with the defaults, mAP@0.5 >= 0.7 on the held-out images (about 4 minutes here)."""
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["map_50"] >= 0.7, metrics
    assert metrics["held_out_images"] == 200 and metrics["iterations"] == 1500


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@needs_pycocotools
def test_train_on_cuda_with_nccl_and_amp(tmp_path):
    """torchrun with one process per GPU: nccl, float16 autocast with a grad scaler; then eval on the GPU."""
    out = tmp_path / "cuda"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "fasterrcnn_ext", "train", "--data", "synthetic", "--out", str(out), "--max-iters", "3",
           "--device", "cuda", "--amp", *TRAIN_FAST]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["iteration"] == 3 and ckpt["scaler"] is not None
    assert main(["eval", "--data", "synthetic", "--weights", str(out / "last.pt"), "--out", str(tmp_path / "e"),
                 "--synthetic-images", "4", "--device", "cuda", "--no-progress"]) == 0


def test_export_onnx_and_torchscript_give_the_model_detections(trained, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    from fasterrcnn_ext.engine.detect import load_detector

    model, _, _ = load_detector(os.path.join(trained, "last.pt"))
    model.eval().fast_inference = False
    image = SyntheticShapes(1, seed=5)[0][0]
    with torch.no_grad():
        expected = model([image])[0]
    onnx_file, ts_file = tmp_path / "d.onnx", tmp_path / "d.pt"
    assert main(["export", "--weights", os.path.join(trained, "last.pt"), "--format", "onnx", "--out",
                 str(onnx_file), "--image-size", "128", "160"]) == 0
    assert "wrote" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    boxes, labels, scores = session.run(None, {"image": image.numpy()})
    assert len(expected["boxes"]) > 0 and len(boxes) == len(expected["boxes"])
    torch.testing.assert_close(torch.from_numpy(boxes), expected["boxes"], rtol=1e-4, atol=1e-2)
    assert torch.equal(torch.from_numpy(labels), expected["labels"])
    assert main(["export", "--weights", os.path.join(trained, "last.pt"), "--format", "torchscript", "--out",
                 str(ts_file)]) == 0
    _, got = torch.jit.load(str(ts_file))([image])
    for key in expected:
        torch.testing.assert_close(got[0][key], expected[key])


def test_export_pt2_takes_any_image_size_in_a_fresh_process(trained, tmp_path, capsys):
    from fasterrcnn_ext.engine.detect import load_detector

    out = tmp_path / "d.pt2"
    assert main(["export", "--weights", os.path.join(trained, "last.pt"), "--format", "pt2", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model, _, _ = load_detector(os.path.join(trained, "last.pt"))
    model.eval().fast_inference = False
    images = [SyntheticShapes(1, seed=5)[0][0], torch.rand(3, 150, 300)]
    script = ("import sys, torch, fasterrcnn_ext; run = torch.export.load(sys.argv[1]).module(); "
              "torch.save([run([i]) for i in torch.load(sys.argv[2])], sys.argv[3])")
    torch.save(images, tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "in.pt"), str(tmp_path / "o.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for image, got in zip(images, torch.load(tmp_path / "o.pt")):
        with torch.no_grad():
            expected = model([image])
        for key in expected[0]:
            torch.testing.assert_close(got[0][key], expected[0][key])


def test_export_refuses_what_it_cannot_do_and_keeps_the_file(trained, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"earlier")
    assert main(["export", "--weights", os.path.join(trained, "last.pt"), "--format", "pt2", "--out", str(out),
                 "--image-size", "16", "640"]) == 2
    assert "--image-size must be two sizes from 32" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier"
    assert main(["export", "--weights", str(tmp_path / "missing.pt"), "--format", "onnx", "--out", str(out)]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["export", "--weights", os.path.join(trained, "last.pt"), "--format", "onnx", "--out",
                 str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


AOTI_FRESH_PROCESS = """
import sys, torch
from fasterrcnn_ext.engine.export import load_aoti
run = load_aoti(sys.argv[1])
results = []
for image in torch.load(sys.argv[2]):
    try:
        results.append(run([image])[0])
    except ValueError as e:
        results.append(str(e))
torch.save(results, sys.argv[3])
"""


@needs_pycocotools
@pytest.mark.slow
def test_export_aoti_gives_the_trained_models_detections_at_its_size(demo_run, tmp_path, capsys):
    """The demo's trained model, exported by the CLI for 192x192 images (its example a random image, on which the
    model detects nothing), run in a fresh process on held-out images: the eager detections at that size, whatever
    the image's memory layout (the held-out images are channels-last views); a clear error at any other size."""
    from fasterrcnn_ext.engine.detect import load_detector

    out = tmp_path / "d.pt2"
    assert main(["export", "--weights", str(demo_run / "model.pt"), "--format", "aoti", "--out", str(out),
                 "--image-size", "192", "192"]) == 0
    model, _, _ = load_detector(str(demo_run / "model.pt"))
    model.eval()
    held_out = SyntheticShapes(4, seed=1_000_003, image_size=192)
    images = [held_out[i][0] for i in range(4)] + [torch.rand(3, 150, 260)]
    assert not images[0].is_contiguous()
    torch.save(images, tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, "-c", AOTI_FRESH_PROCESS, str(out), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    counts = []
    for image, detections in zip(images[:4], got[:4]):
        with torch.no_grad():
            expected = model([image])[0]
        counts.append(len(expected["boxes"]))
        assert torch.equal(detections["labels"], expected["labels"])
        torch.testing.assert_close(detections["scores"], expected["scores"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(detections["boxes"], expected["boxes"], rtol=1e-3, atol=1e-2)
    assert min(counts) > 0 and len(set(counts)) > 1  # a model that detects, differently per image
    assert isinstance(got[4], str) and "150x260" in got[4] and "compiled for 192x192" in got[4]
