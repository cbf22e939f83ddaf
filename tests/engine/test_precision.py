"""--precision of detect and eval (engine/precision.py): which model each precision runs (the float32 model, its
bfloat16 mode, quantization.quantize's int8 model), which images int8 calibrates on, and the refusals. quantize's
own arithmetic is tests/test_quantization.py's: here it is replaced by a recorder where only the path is tested."""

import copy
import importlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn_ext import quantization
from fasterrcnn_ext.cli import main
from fasterrcnn_ext.data import load_image
from fasterrcnn_ext.engine.precision import CALIBRATION_IMAGES, load_calibration_images, with_precision
from fasterrcnn_ext.models.detection import fasterrcnn_tiny

# The modules (fasterrcnn_ext.engine exports functions of the same names).
detect_module = importlib.import_module("fasterrcnn_ext.engine.detect")
evaluate_module = importlib.import_module("fasterrcnn_ext.engine.evaluate")


def _images(folder, sizes, start=1):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i, (h, w) in enumerate(sizes, start=start):
        path = os.path.join(folder, f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def fake_quantize(monkeypatch):
    """quantization.quantize replaced by a recorder: it keeps the calibration images it was given and returns a copy
    of the model marked as quantized (the input untouched, as the real one)."""
    calls = []

    def quantize(model, calibration_images, *, inplace=False):
        calls.append(list(calibration_images))
        quantized = copy.deepcopy(model)
        quantized.quantized_by_test = True
        return quantized

    monkeypatch.setattr(quantization, "quantize", quantize)
    return calls


@pytest.fixture
def models_run(monkeypatch):
    """The models detect hands to the pipeline, and its run.json description, while the real run goes on."""
    seen = []
    real = detect_module.run_detect

    def run_detect(paths, ids, model, *args, run, **kwargs):
        seen.append((model, dict(run)))
        return real(paths, ids, model, *args, run=run, **kwargs)

    monkeypatch.setattr(detect_module, "run_detect", run_detect)
    return seen


@pytest.mark.parametrize("command", ["detect", "eval", "bench"])
def test_an_unknown_precision_is_refused_naming_the_choices(command, capsys):
    args = {"detect": ["detect", "x.png", "--weights", "w.pt", "--out", "o"],
            "eval": ["eval", "--data", "synthetic", "--weights", "w.pt", "--out", "o"],
            "bench": ["bench", "--only", "detector"]}[command]
    with pytest.raises(SystemExit) as e:
        main([*args, "--precision", "fp16"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --precision: invalid choice: 'fp16'" in err and "'fp32', 'bf16', 'int8'" in err


def test_with_precision_picks_the_model_of_each_precision(fake_quantize):
    torch.manual_seed(0)
    model = fasterrcnn_tiny(num_classes=3).eval()
    assert with_precision(model, "fp32") is model and model.inference_dtype is None
    images = [torch.rand(3, 64, 64)]
    int8 = with_precision(model, "int8", images)
    assert int8 is not model and int8.quantized_by_test and fake_quantize == [images]
    assert not hasattr(model, "quantized_by_test") and model.inference_dtype is None
    assert with_precision(model, "bf16") is model and model.inference_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision='fp16': choose from fp32, bf16, int8"):
        with_precision(model, "fp16")
    with pytest.raises(ValueError, match="precision='int8' needs calibration images"):
        with_precision(model, "int8", [])
    with pytest.raises(ValueError, match="precision='int8' runs on the CPU .*not device='cuda'"):
        with_precision(model, "int8", images, device="cuda")


def test_calibration_images_are_the_first_readable_ones(tmp_path):
    bad = tmp_path / "0.png"
    bad.write_bytes(b"not an image")
    paths = [str(bad), *_images(tmp_path, [(40, 50), (30, 60), (20, 20)])]
    images = load_calibration_images(paths, 2)
    assert len(images) == 2
    torch.testing.assert_close(images[0], load_image(paths[1]))
    torch.testing.assert_close(images[1], load_image(paths[2]))
    assert len(load_calibration_images(paths)) == 3 < CALIBRATION_IMAGES  # all there are, up to the default
    with pytest.raises(ValueError, match=r"no calibration image could be read \(image file .*0.png could not"):
        load_calibration_images([str(bad)])
    with pytest.raises(ValueError, match="count=0: at least 1"):
        load_calibration_images(paths, 0)


def test_detect_runs_each_precision(tiny_checkpoint, tmp_path, fake_quantize, models_run, capsys):
    bad = tmp_path / "in" / "0.png"
    paths = _images(tmp_path / "in", [(60, 80), (64, 64), (50, 70)])
    bad.write_bytes(b"not an image")
    common = ["--weights", str(tiny_checkpoint), "--workers", "0", "--no-progress"]
    with pytest.warns(UserWarning, match="skipping image"):
        assert main(["detect", str(tmp_path / "in"), "--out", str(tmp_path / "fp32"), *common]) == 0
    model, run = models_run[-1]
    assert model.inference_dtype is None and not hasattr(model, "quantized_by_test") and "precision" not in run
    assert json.loads((tmp_path / "fp32" / "run.json").read_text()) == run  # as before --precision existed

    with pytest.warns(UserWarning, match="skipping image"):
        assert main(["detect", str(tmp_path / "in"), "--out", str(tmp_path / "bf16"), *common,
                     "--precision", "bf16"]) == 0
    model, run = models_run[-1]
    assert model.inference_dtype == torch.bfloat16 and run["precision"] == "bf16"
    assert len((tmp_path / "bf16" / "detections.jsonl").read_text().splitlines()) == 3

    # int8 calibrates on the run's first readable images (0.png cannot be read), as many as asked for.
    with pytest.warns(UserWarning, match="skipping image"):
        assert main(["detect", str(tmp_path / "in"), "--out", str(tmp_path / "int8"), *common,
                     "--precision", "int8", "--calibration-images", "2"]) == 0
    model, run = models_run[-1]
    assert model.quantized_by_test and run["precision"] == "int8"
    assert run["calibration"] == {"images": "the run's first", "count": 2}
    (calibration,) = fake_quantize
    assert [tuple(im.shape) for im in calibration] == [(3, 60, 80), (3, 64, 64)]
    torch.testing.assert_close(calibration[0], load_image(paths[0]))

    # --calibration DIR: its images instead.
    other = _images(tmp_path / "calib", [(32, 48)], start=7)
    assert main(["detect", paths[0], "--out", str(tmp_path / "int8-dir"), *common, "--precision", "int8",
                 "--calibration", str(tmp_path / "calib")]) == 0
    torch.testing.assert_close(fake_quantize[-1], [load_image(other[0])])
    assert models_run[-1][1]["calibration"] == {"images": str(tmp_path / "calib"), "count": 1}

    # A folder holds one precision's detections: a rerun at another is refused.
    capsys.readouterr()
    assert main(["detect", paths[0], "--out", str(tmp_path / "fp32"), *common, "--precision", "bf16"]) == 2
    assert "holds detections of another run" in capsys.readouterr().err
    assert main(["detect", paths[0], "--out", str(tmp_path / "x"), *common, "--calibration", str(tmp_path)]) == 2
    assert "--calibration applies to --precision int8, not fp32" in capsys.readouterr().err
    assert main(["detect", paths[0], "--out", str(tmp_path / "x"), *common, "--precision", "int8",
                 "--device", "cuda"]) == 2
    assert "--precision int8 runs on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.fixture
def evaluated(monkeypatch):
    """The models eval evaluates and the precision it records, in place of the COCO evaluation."""
    seen = []

    def evaluate(model, dataset, *, precision=None, **kwargs):
        seen.append((model, precision, dataset))
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "precision": precision}

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    return seen


def test_eval_runs_each_precision(tiny_checkpoint, tmp_path, fake_quantize, evaluated, capsys):
    common = ["eval", "--data", "synthetic", "--synthetic-images", "3", "--weights", str(tiny_checkpoint),
              "--out", str(tmp_path / "e"), "--no-progress"]
    assert main(common) == 0
    model, precision, _ = evaluated[-1]
    assert model.inference_dtype is None and precision == "fp32"
    assert main([*common, "--precision", "bf16"]) == 0
    model, precision, _ = evaluated[-1]
    assert model.inference_dtype == torch.bfloat16 and precision == "bf16"

    # int8 calibrates on the first images evaluated (all 3 of them here, fewer than the default count) ...
    assert main([*common, "--precision", "int8"]) == 0
    model, precision, dataset = evaluated[-1]
    assert model.quantized_by_test and precision == "int8"
    assert len(fake_quantize[-1]) == 3
    for image, (expected, _) in zip(fake_quantize[-1], [dataset[i] for i in range(3)]):
        torch.testing.assert_close(image, expected)
    # ... or on --calibration DIR, as many as --calibration-images.
    other = _images(tmp_path / "calib", [(32, 48), (40, 40), (24, 24)])
    assert main([*common, "--precision", "int8", "--calibration", str(tmp_path / "calib"),
                 "--calibration-images", "2"]) == 0
    torch.testing.assert_close(fake_quantize[-1], [load_image(p) for p in other[:2]])

    capsys.readouterr()
    assert main([*common, "--precision", "bf16", "--calibration", str(tmp_path / "calib")]) == 2
    assert "--calibration applies to --precision int8, not bf16" in capsys.readouterr().err
    assert main([*common, "--precision", "int8", "--calibration-images", "0"]) == 2
    assert "--calibration-images 0: at least 1" in capsys.readouterr().err
    assert main([*common, "--precision", "int8", "--device", "cuda"]) == 2
    assert "--precision int8 runs on the CPU" in capsys.readouterr().err


def test_evaluate_records_the_precision():
    from fasterrcnn_ext.data import SyntheticShapes

    torch.manual_seed(0)
    model = fasterrcnn_tiny(num_classes=len(SyntheticShapes.class_names) + 1).eval()
    dataset = SyntheticShapes(2, image_size=96, seed=1)
    metrics = evaluate_module.evaluate(model, dataset, batch_size=2, progress=False, precision="bf16")
    assert metrics["precision"] == "bf16" and "map" in metrics
    assert "precision" not in evaluate_module.evaluate(model, dataset, batch_size=2, progress=False)


def test_detect_int8_runs_the_quantized_model(tiny_checkpoint, tmp_path, models_run):
    """The real quantize (its arithmetic: tests/test_quantization.py) through detect, calibrated on the run's first
    image."""
    import warnings

    paths = _images(tmp_path / "in", [(60, 80), (64, 64)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "quantize: ", RuntimeWarning)  # int8 on a CPU without VNNI: slower only
        assert main(["detect", *paths, "--weights", str(tiny_checkpoint), "--out", str(tmp_path / "int8"),
                     "--workers", "0", "--no-progress", "--precision", "int8", "--calibration-images", "1"]) == 0
    model, run = models_run[-1]
    assert any(isinstance(m, quantization.QuantizedConv2d) for m in model.modules())
    assert run["precision"] == "int8" and run["calibration"] == {"images": "the run's first", "count": 1}
    lines = [json.loads(line) for line in (tmp_path / "int8" / "detections.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [os.path.abspath(p) for p in paths]
