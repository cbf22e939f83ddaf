"""What users meet outside the happy path: the modes of written files, checkpoints that are not ours or not
checkpoints, offline weights downloads, image files of unusual bit depths, and detect's ids and bad images."""

import json
import os
import stat
import urllib.error
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn_ext.cli import main
from fasterrcnn_ext.data import SyntheticShapes, load_image
from fasterrcnn_ext.engine import build_model
from fasterrcnn_ext.engine.checkpoint import save_checkpoint
from fasterrcnn_ext.engine.detect import detect, image_ids
from fasterrcnn_ext.files import WeightsDownloadError, atomic_write, write_json
from fasterrcnn_ext.models import detection


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_honour_the_umask(tmp_path, mask):
    """As a plain open() would: 0o666 less the umask (the temporary file's private 0o600 is not kept)."""
    old = os.umask(mask)
    try:
        write_json(str(tmp_path / "metrics.json"), {"map": 1.0})
        save_checkpoint(str(tmp_path / "last.pt"), {"iteration": 1})
        with atomic_write(str(tmp_path / "model.onnx"), binary=True) as f:
            f.write(b"x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    for name in ("metrics.json", "last.pt", "model.onnx"):
        assert _mode(tmp_path / name) == 0o666 & ~mask == _mode(tmp_path / "plain.txt"), name


def test_a_builder_given_another_models_checkpoint_names_what_it_holds(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError) as info:
        detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=str(tiny_checkpoint))
    message = str(info.value)
    assert "tiny.pt holds a fasterrcnn_tiny with 5 classes" in message and "Missing key" not in message
    assert len(message) < 500  # one sentence, not load_state_dict's key lists
    # A bare state_dict of another model: its size and class count.
    torch.save(build_model("fasterrcnn_tiny", 3).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=r"bare.pth holds a state_dict of \d+ tensors with 3 classes"):
        detection.fasterrcnn_vgg16(weights=str(tmp_path / "bare.pth"), num_classes=3)


@pytest.mark.parametrize("kind", ["text", "torchscript", "garbage"])
def test_files_that_are_not_checkpoints_get_our_message(tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("model weights: see the wiki\n")
    elif kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    else:
        path.write_bytes(bytes(range(256)) * 4)
    (image,) = _write_images(tmp_path / "in", ["1.png"])
    assert main(["detect", image, "--weights", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{kind}.pt" in err and "weights_only" not in err and len(err.splitlines()) == 1
    expected = {"text": "is a text file", "torchscript": "is a TorchScript file", "garbage": "could not be read"}
    assert expected[kind] in err


def test_offline_torchvision_weights_give_one_line(tmp_path, monkeypatch, capsys):
    """No network: one line naming the weights, the URL and where torch.hub caches the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsDownloadError, match="fasterrcnn_mobilenet_v3_large_320_fpn.*could not download "
                       "https://.*Network is unreachable.*hub/checkpoints/"):
        detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights="DEFAULT")
    (image,) = _write_images(tmp_path / "in", ["1.png"])
    assert main(["detect", image, "--weights", "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.DEFAULT",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "could not download" in err and "hub/checkpoints" in err
    assert main(["train", "--data", "synthetic", "--model", "fasterrcnn_mobilenet_v3_large_320_fpn",
                 "--weights-backbone", "DEFAULT", "--out", str(tmp_path / "run"), "--max-iters", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "weights_backbone=DEFAULT" in err and "mobilenet_v3_large" in err


def _write_images(folder, names, size=64):
    os.makedirs(folder, exist_ok=True)
    images = SyntheticShapes(len(names), seed=7, image_size=size)
    paths = []
    for name, i in zip(names, range(len(names))):
        array = (images[i][0].permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(os.path.join(folder, name))
        paths.append(os.path.join(folder, name))
    return paths


def test_image_ids_are_unique():
    assert image_ids(["a/000000397133.jpg", "b/12.png"]) == [397133, 12]
    assert image_ids(["x.png", "1.png"]) == [1, 2]  # not every name a number: positions
    assert image_ids(["a/1.png", "b/1.png"]) == [1, 2]  # equal numbers: positions
    assert image_ids(["a/01.png", "b/1.png"]) == [1, 2]


def test_detect_gives_unique_ids_and_walks_folders(tiny_checkpoint, tmp_path):
    x, one = _write_images(tmp_path / "in", ["x.png", "1.png"])
    _write_images(tmp_path / "in" / "sub", ["2.jpg"])
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["detect", x, one, "--weights", str(tiny_checkpoint), "--out", str(out), "--score-thresh",
                 "0"]) == 0
    info = json.loads((out / "images.json").read_text())
    assert [(i["id"], os.path.basename(i["file_name"])) for i in info] == [(1, "x.png"), (2, "1.png")]
    results = json.loads((out / "detections.json").read_text())
    assert {r["image_id"] for r in results} <= {1, 2}
    # A folder: its images, recursively, in sorted order; other files ignored.
    out2 = tmp_path / "out2"
    assert main(["detect", str(tmp_path / "in"), "--weights", str(tiny_checkpoint), "--out", str(out2)]) == 0
    names = [os.path.relpath(i["file_name"], tmp_path / "in") for i in json.loads((out2 / "images.json").read_text())]
    assert names == ["1.png", "sub/2.jpg", "x.png"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no image files"):
        detect([str(tmp_path / "empty")], str(tiny_checkpoint), str(tmp_path / "out3"))


def test_detect_skips_a_bad_image_and_keeps_the_others(tiny_checkpoint, tmp_path, capsys):
    """A thin image (that the model cannot resize) and a corrupt one part-way through the list: each named in a
    warning and in failures.json; the other images' results are all written."""
    paths = _write_images(tmp_path / "in", ["1.png", "2.png", "4.png"])
    Image.fromarray(np.zeros((2, 3840, 3), np.uint8)).save(tmp_path / "in" / "3.png")
    (tmp_path / "in" / "5.png").write_bytes(b"\x89PNG truncated")
    inputs = [paths[0], str(tmp_path / "in" / "3.png"), paths[1], str(tmp_path / "in" / "5.png"), paths[2]]
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as caught:
        assert main(["detect", *inputs, "--weights", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert any("3.png" in str(w.message) for w in caught) and any("5.png" in str(w.message) for w in caught)
    failures = json.loads((out / "failures.json").read_text())
    assert [os.path.basename(f["file_name"]) for f in failures] == ["3.png", "5.png"]
    assert "3.png" in failures[0]["error"] and "2x3840" in failures[0]["error"]
    assert [i["id"] for i in json.loads((out / "images.json").read_text())] == [1, 2, 4]
    assert sorted(os.listdir(out)) == ["1.png", "2.png", "4.png", "detections.json", "detections.jsonl",
                                       "failures.json", "images.json", "run.json"]
    # Nothing readable at all: an error, and nothing written.
    with pytest.warns(UserWarning, match="5.png"), pytest.raises(ValueError, match="no image could be detected"):
        detect([str(tmp_path / "in" / "5.png")], str(tiny_checkpoint), str(tmp_path / "none"))
    assert not os.path.exists(tmp_path / "none")


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I")  # PIL's 16-bit (or 32-bit integer) greyscale
    image = load_image(str(tmp_path / "grey16.png"))
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535)
    for channel in image:
        torch.testing.assert_close(channel, expected)
    # An 8-bit greyscale image of the same picture decodes to the same values within 8-bit rounding.
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "grey8.png")
    torch.testing.assert_close(load_image(str(tmp_path / "grey8.png")), image, atol=1 / 255 + 1e-6, rtol=0)
    with pytest.raises(ValueError, match="is a folder"):
        load_image(str(tmp_path))


def test_sixteen_bit_images_in_the_coco_loader(tmp_path):
    root = tmp_path / "coco"
    SyntheticShapes(1, seed=3, image_size=64).write_coco(str(root), "val")
    png = root / "val" / "000001.png"
    with Image.open(png) as im:
        grey = np.asarray(im.convert("L"), dtype=np.uint16) * 257  # the same picture in 16 bits
    Image.fromarray(grey).save(png)
    from fasterrcnn_ext.data import CocoDetection

    image, _ = CocoDetection(str(root), "val")[0]
    assert 0.0 < image.mean() < 0.99  # not the all-white image that clipping at 255 gives
    torch.testing.assert_close(image[0], torch.from_numpy(grey.astype(np.float32) / 65535))


def test_cli_takes_a_torchvision_state_dict_with_model(tmp_path, capsys):
    """A user's torchvision-trained .pth: a bare state_dict, named by --model."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                                           num_classes=3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    (image,) = _write_images(tmp_path / "in", ["7.png"], size=96)
    out = tmp_path / "out"
    assert main(["detect", image, "--weights", str(tmp_path / "tv.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "state_dict" in err and "with 3 classes" in err
    assert main(["detect", image, "--weights", str(tmp_path / "tv.pth"), "--model",
                 "fasterrcnn_mobilenet_v3_large_320_fpn", "--out", str(out), "--score-thresh", "0"]) == 0
    tv.eval()
    with torch.no_grad():
        expected = tv([load_image(image)])[0]
    results = json.loads((out / "detections.json").read_text())
    assert len(results) == len(expected["boxes"])
    assert sorted({r["category_id"] for r in results}) == sorted(set(expected["labels"].tolist()))
    assert main(["detect", image, "--weights", str(tmp_path / "tv.pth"), "--model", "fasterrcnn_tiny", "--out",
                 str(tmp_path / "o2")]) == 2
    assert "tv.pth holds a state_dict" in capsys.readouterr().err


def test_library_errors_name_arguments_and_the_cli_names_flags(tmp_path, capsys):
    """The library speaks in its argument names (data='...'); the command line rewords the same error in the flags
    that set those arguments (--data ...), keeping its type."""
    from fasterrcnn_ext._arguments import argument_error, cli_message
    from fasterrcnn_ext.cli import flag_of
    from fasterrcnn_ext.data import build_dataset
    from fasterrcnn_ext.engine.detect import load_detector
    from fasterrcnn_ext.engine.export import export_detector

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(missing, train=True, split="train")
    assert str(info.value) == f"data={missing!r}: not 'synthetic' and not a folder"
    assert cli_message(info.value, flag_of) == f"--data {missing}: not 'synthetic' and not a folder"
    with pytest.raises(ValueError) as info:
        load_detector("FasterRCNN_ResNet50_FPN_Weights.DEFAULT", "fasterrcnn_tiny")
    assert "model_name='fasterrcnn_tiny' applies to a state_dict file" in str(info.value)
    assert "--" not in str(info.value)
    assert cli_message(info.value, flag_of).startswith("--model fasterrcnn_tiny applies to a state_dict file")
    with pytest.raises(ValueError) as info:
        export_detector(torch.nn.Identity(), "onnx", str(tmp_path), image_size=(8, 640))
    assert str(info.value).startswith("image_size must be two sizes from") and str(info.value).endswith("[8, 640]")
    assert cli_message(info.value, flag_of).startswith("--image-size must be two sizes")

    # Every field form; braces in a value are text, not fields; a plain error is left as it is.
    e = argument_error(ValueError, "{weights} holds {what:value}: choose another {out:name}", weights="a{b}.pt",
                       what="7 tensors", out="runs/x")
    assert str(e) == "weights='a{b}.pt' holds 7 tensors: choose another out"
    assert cli_message(e, flag_of) == "--weights a{b}.pt holds 7 tensors: choose another --out"
    assert cli_message(ValueError("as it is"), flag_of) == "as it is"
    assert flag_of("model_name") == "--model" and flag_of("batch_size") == "--batch-size"

    # Through the command line: the flag, not the argument.
    assert main(["train", "--data", missing, "--out", str(tmp_path / "run"), "--max-iters", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--data {missing}: not 'synthetic'" in err and "data=" not in err
