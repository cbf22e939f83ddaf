"""The README's Python code blocks, run as written: each block in a fresh namespace holding the inputs it assumes
(boxes, features, a model, ...), in a temporary working folder. A line that cannot run here (a download, a GPU) is
listed in NOT_HERE with the reason, and a line run with another value in SUBSTITUTIONS; both lists are checked
against the README, so a changed line is run again rather than silently skipped."""

import os
import re
import warnings

import pytest
import torch
import torchvision

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# Lines that need what this machine lacks, and why.
NOT_HERE = {
    'model = fasterrcnn_resnet50_fpn(weights="DEFAULT")   # torchvision\'s weights (downloaded by torchvision),':
        "downloads torchvision's weights",
    'model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights="DEFAULT")  # our FasterRCNN, as '
    'get_model(...)': "downloads torchvision's weights",
}
NOT_HERE_WITHOUT_CUDA = {
    "detector = CUDAGraphDetector(model.cuda(), image_size=(800, 1067), batch_size=1)  # captured once",
    "detections = detector([image])                       # each call one graph replay: model([image])'s detections",
}
# (README text, what runs instead, why): R50-FPN's exports take minutes on 2 cores; the mobilenet builder has the
# same interface and goes through the same steps.
SUBSTITUTIONS = [
    ("from fasterrcnn_ext.models.detection import fasterrcnn_resnet50_fpn",
     "from fasterrcnn_ext.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn as fasterrcnn_resnet50_fpn",
     "time: a smaller builder with the same interface"),
]


def python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def runnable(block: str) -> str:
    lines = []
    for line in block.splitlines():
        skip = line.rstrip() in NOT_HERE or (not torch.cuda.is_available() and line.rstrip() in NOT_HERE_WITHOUT_CUDA)
        if skip:
            lines.append(re.match(r"\s*", line).group(0) + "pass")
            continue
        for text, replacement, _ in SUBSTITUTIONS:
            line = line.replace(text, replacement)
        lines.append(line)
    return "\n".join(lines)


def test_every_listed_line_is_in_the_readme():
    text = "\n".join(python_blocks())
    listed = [*NOT_HERE, *NOT_HERE_WITHOUT_CUDA, *(t for t, _, _ in SUBSTITUTIONS)]
    missing = [line for line in listed if line not in text]
    assert not missing, f"README lines no longer there (update tests/test_readme.py): {missing}"


def _boxes(n, size=300.0, generator=None):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 4 + 1
    return torch.cat([xy, xy + wh], 1)


def _inputs(tmp_path) -> dict:
    """What the README's blocks assume is defined."""
    from fasterrcnn_ext.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    g = torch.Generator().manual_seed(0)
    n_images, per_level, proposals_per_image, classes = 2, (600, 500), 1000, 5
    anchors_total = sum(per_level)
    boxes = _boxes(3000, generator=g)
    features = torch.rand(2, 16, 25, 34, generator=g)
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), _boxes(40, 400.0, g)], 1)

    torch.manual_seed(0)
    torchvision_model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=classes).eval()
    torch.save(torchvision_model.state_dict(), tmp_path / "model.pt")
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=str(tmp_path / "model.pt")).eval()
    image = torch.rand(3, 240, 320, generator=g)

    class ModuleWithRoIOps(torch.nn.Module):
        def forward(self, x, rois):
            from fasterrcnn_ext import ops

            return ops.roi_align(x, rois, 7, 1 / 16, 2, True), ops.roi_pool(x, rois, 7, 1 / 16)

    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    calls = []
    return dict(
        torch=torch, torchvision=torchvision,
        boxes=boxes, scores=torch.rand(3000, generator=g), labels=torch.randint(0, 80, (3000,), generator=g),
        a=_boxes(50, generator=g), b=_boxes(60, generator=g), h=240, w=320,
        gt=_boxes(100, generator=g), reference=_boxes(100, generator=g),
        features=features, rois=rois, boxes_img0=_boxes(10, 400.0, g), boxes_img1=_boxes(12, 400.0, g),
        objectness=torch.randn(n_images, anchors_total, generator=g),
        deltas=torch.randn(n_images, anchors_total, 4, generator=g) * 0.1,
        anchors=_boxes(anchors_total, generator=g), num_anchors_per_level=list(per_level),
        image_sizes=[(320, 400), (300, 420)],
        class_logits=torch.randn(n_images * proposals_per_image, classes, generator=g),
        box_regression=torch.randn(n_images * proposals_per_image, 4 * classes, generator=g) * 0.1,
        proposals=[_boxes(proposals_per_image, generator=g) for _ in range(n_images)],
        class_logits_padded=torch.randn(n_images * proposals_per_image, classes, generator=g),
        box_regression_padded=torch.randn(n_images * proposals_per_image, 4 * classes, generator=g) * 0.1,
        x=torch.rand(1, 64, 20, 24, generator=g), conv=conv,
        module_with_roi_ops=ModuleWithRoIOps(), args=(features, rois),
        torchvision_model=torchvision_model, model=model, image=image,
        images=[image, torch.rand(3, 200, 260, generator=g)], batch=torch.rand(2, 3, 240, 320, generator=g),
        run_someone_elses_code=lambda: calls.append(torchvision.ops.nms(boxes, torch.rand(3000), 0.5)),
        _calls=calls,
    )


def _block(first_line: str) -> str:
    matches = [b for b in python_blocks() if b.startswith(first_line)]
    assert len(matches) == 1, f"one README block starts with {first_line!r}"
    return matches[0]


# The blocks by their first line, and whether they are slow (exports of a whole detector).
BLOCKS = {
    "import fasterrcnn_ext.ops as ops": False,
    "scripted = torch.jit.script(ops.roi_align)": False,
    "from fasterrcnn_ext.models.detection import fasterrcnn_resnet50_fpn": True,
    "from fasterrcnn_ext import capabilities": False,
    "import fasterrcnn_ext\n\nfasterrcnn_ext.patch_torchvision()": False,
    "from fasterrcnn_ext import library_path": True,
}


def test_every_block_is_run():
    assert sorted(python_blocks()) == sorted(_block(first) for first in BLOCKS)


@pytest.mark.parametrize("first_line", [pytest.param(k, marks=pytest.mark.slow) if slow else k
                                        for k, slow in BLOCKS.items()])
def test_readme_block_runs_as_written(first_line, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    namespace = _inputs(tmp_path)
    if "fasterrcnn_ext.ops" in first_line or "scripted" in first_line:
        import fasterrcnn_ext.ops as ops

        namespace["ops"] = ops
    code = compile(runnable(_block(first_line)), f"README.md block {first_line!r}", "exec")
    import fasterrcnn_ext

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation, the exporters' notes
            exec(code, namespace)
    finally:
        fasterrcnn_ext.unpatch_torchvision()
    _check_claims(first_line, namespace)


def _check_claims(first_line: str, ns: dict) -> None:
    """What the blocks' comments say of their results."""
    if first_line.startswith("import fasterrcnn_ext.ops"):
        assert ns["pooled"].shape[-2:] == (7, 7)
        assert len(ns["dets"]) == ns["det_counts"].numel() == 2 and ns["det_scores"].shape[0] == 2
        assert ns["padded"].shape == (2, 1000, 4) and ns["counts"].dtype == torch.int64
        assert torch.equal(ns["area"], torchvision.ops.box_area(ns["boxes"]))
    elif first_line.startswith("scripted"):
        assert os.path.getsize("m.onnx") > 0
    elif first_line.startswith("from fasterrcnn_ext.models.detection"):
        for detections in ns["detections"]:
            assert detections["boxes"].dtype == torch.float32 and detections["scores"].dtype == torch.float32
        for name in ("detector.pt", "detector.onnx", "detector.pt2", "d.pt2"):
            assert os.path.getsize(name) > 0, name
        assert ns["counts"].shape == (2,)
    elif first_line.startswith("from fasterrcnn_ext import library_path"):
        assert os.path.exists(ns["library_path"]()) and os.path.getsize("detector.onnx") > 0
        k = ns["serving"].detections_per_img
        assert ns["boxes"].shape == (2, k, 4) and ns["scores"].shape == ns["labels"].shape == (2, k)
        assert ns["counts"].shape == (2,)
    elif first_line.startswith("import fasterrcnn_ext\n"):
        assert ns["_calls"], "run_someone_elses_code ran"
        assert not ns["fasterrcnn_ext"].patched()
