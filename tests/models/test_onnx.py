"""ONNX export with the TorchScript-based exporter (torch.onnx.export(..., dynamo=False)), run with onnxruntime: the
ops map to standard ONNX operators and give the eager results; the whole detector exports for every builder, with
dynamic image sizes, and onnxruntime gives our PyTorch model's detections."""

import io
import os
import warnings

import pytest
import torch
import torchvision

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext.engine.export import export_onnx
from fasterrcnn_ext.models import detection as ours

from .test_faster_rcnn import BUILDERS, assert_same_detections, model_pair

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def export(module, args, opset=17, **kwargs) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(module, args, f, dynamo=False, opset_version=opset, **kwargs)
    return f.getvalue()


def export_dynamic(module, args, opset=17) -> bytes:
    """Every dimension of every input dynamic."""
    names = [f"input{i}" for i in range(len(args))]
    return export(module, args, opset, input_names=names,
                  dynamic_axes={n: list(range(a.dim())) for n, a in zip(names, args)})


def run(model_bytes: bytes, *inputs: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(v) for v in session.run(None, feeds)]


def op_types(model_bytes: bytes) -> set[str]:
    """Every operator of the graph, subgraphs (If, Loop) included."""
    types = set()

    def visit(graph):
        for node in graph.node:
            types.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)

    visit(onnx.load_from_string(model_bytes).graph)
    return types


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _rois(n=40, size=40.0, max_side=25.0, images=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * max_side + 0.1], 1)
    return torch.cat([torch.randint(0, images, (n, 1), generator=g).float(), boxes], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0, -1])
def test_roi_align_exports_to_roi_align(aligned, sampling_ratio):
    x, rois = torch.randn(2, 6, 20, 24), _rois()
    fn = Fn(lambda x, r: ops.roi_align(x, r, (7, 5), 0.5, sampling_ratio, aligned))
    model = export_dynamic(fn, (x, rois), opset=16)
    assert "RoiAlign" in op_types(model)
    torch.testing.assert_close(run(model, x, rois)[0], fn(x, rois), rtol=1e-5, atol=1e-6)
    other_x, other_rois = torch.randn(1, 6, 13, 9), _rois(n=7, images=1, seed=1)  # dynamic sizes
    torch.testing.assert_close(run(model, other_x, other_rois)[0], fn(other_x, other_rois), rtol=1e-5, atol=1e-6)


def test_roi_align_aligned_needs_opset_16():
    fn = Fn(lambda x, r: ops.roi_align(x, r, 7, 0.5, 2, True))
    with pytest.raises(Exception, match="aligned=True needs ONNX opset 16"):
        export(fn, (torch.randn(2, 6, 20, 24), _rois()), opset=11)
    fn = Fn(lambda x, r: ops.roi_align(x, r, 7, 0.5, 2, False))
    x, rois = torch.randn(2, 6, 20, 24), _rois()
    torch.testing.assert_close(run(export(fn, (x, rois), opset=11), x, rois)[0], fn(x, rois))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_roi_pool_exports_to_max_roi_pool(requires_grad):
    x, rois = torch.randn(2, 6, 20, 24, requires_grad=requires_grad), _rois()
    fn = Fn(lambda x, r: ops.roi_pool(x, r, 7, 0.5))
    model = export(fn, (x, rois))
    assert "MaxRoiPool" in op_types(model)
    torch.testing.assert_close(run(model, x.detach(), rois)[0], fn(x, rois).detach())


def _boxes(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 1], 1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_nms_and_batched_nms_export_to_non_max_suppression():
    boxes, scores, idxs = _boxes()
    cases = [(Fn(lambda b, s: ops.nms(b, s, 0.4)), (boxes, scores)),
             (Fn(lambda b, s: ops.nms(b, s, 0.4, 9)), (boxes, scores)),
             (Fn(lambda b, s, i: ops.batched_nms(b, s, i, 0.4)), (boxes, scores, idxs)),
             (Fn(lambda b, s, i: ops.batched_nms(b, s, i, 0.4, 11)), (boxes, scores, idxs)),
             (Fn(lambda b, s, i: ops.batched_nms_keep_mask(b, s, i, 0.4)), (boxes, scores, idxs))]
    for fn, args in cases:
        model = export_dynamic(fn, args)
        assert "NonMaxSuppression" in op_types(model)
        assert torch.equal(run(model, *args)[0], fn(*args))
        other = _boxes(n=57, seed=1)[: len(args)]  # dynamic number of boxes
        assert torch.equal(run(model, *other)[0], fn(*other))


@pytest.mark.parametrize("names", [["0", "1", "2", "3"], ["0", "2"]])  # every level, and levels that skip one
def test_multi_scale_roi_align_exports_per_level(names):
    features = {str(i): torch.randn(1, 5, 64 // 2 ** i, 80 // 2 ** i) for i in range(4)}
    rois = _rois(n=120, size=200.0, max_side=120.0, images=1)
    pooler = ops.MultiScaleRoIAlign(names, 7, 2)

    class Pool(torch.nn.Module):
        def forward(self, *maps_and_boxes):
            return pooler(dict(zip(names, maps_and_boxes[:-1])), [maps_and_boxes[-1]], [(256, 320)])

    args = (*[features[n] for n in names], rois[:, 1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the skipped level's one-time warning
        expected = Pool()(*args)
        model = export(Pool(), args)
    assert "RoiAlign" in op_types(model)
    torch.testing.assert_close(run(model, *args)[0], expected, rtol=1e-5, atol=1e-6)


# --- the whole detector ---------------------------------------------------------------------------------------------

def export_detector(model, image) -> bytes:
    f = io.BytesIO()
    export_onnx(model, image, f)  # what `fasterrcnn-ext export --format onnx` writes
    return f.getvalue()


def detections(outputs):
    boxes, labels, scores = outputs
    return [{"boxes": boxes, "labels": labels, "scores": scores}]


IMAGE_SIZES = [(320, 416), (360, 300)]  # the second is resized and padded: the exported graph's shapes are dynamic


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "resnet" in n else n for n in BUILDERS])
def test_detector_exports_and_equals_torchvision_export(name):
    """Our exported detector computes what torchvision's exported detector (same weights) computes: the exported
    graph holds standard operators only, and onnxruntime gives the same detections for both on two image sizes."""
    mine, theirs = model_pair(name, box_score_thresh=0.05, box_detections_per_img=1000)
    mine.eval()
    theirs.eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in IMAGE_SIZES]
    model, reference = export_detector(mine, images[0]), export_detector(theirs, images[0])
    assert not any(t.startswith("fasterrcnn_ext") for t in op_types(model))
    for image in images:
        got, expected = detections(run(model, image)), detections(run(reference, image))
        assert len(got[0]["boxes"]) > 0
        assert_same_detections(got, expected)


def assert_twins_across_runtimes(got, expected):
    """Two runtimes' detections of a randomly initialised model: the 10 best have twins and >= 90% overall (twin:
    same label, score within 1e-3, IoU >= 0.99 or every coordinate within 0.05 pixel); see the test below."""
    assert abs(len(got["boxes"]) - len(expected["boxes"])) <= max(2, len(expected["boxes"]) // 50)
    iou = torchvision.ops.box_iou(got["boxes"], expected["boxes"])
    near = (got["boxes"][:, None] - expected["boxes"][None]).abs().amax(-1) <= 0.05
    twin = (((iou >= 0.99) | near) & (got["labels"][:, None] == expected["labels"][None])
            & ((got["scores"][:, None] - expected["scores"][None]).abs() <= 1e-3)).any(1)
    assert twin[:10].all() and twin.float().mean() >= 0.9, (twin[:10], twin.float().mean())


@pytest.mark.slow
def test_detector_export_gives_the_pytorch_detections():
    """onnxruntime against our PyTorch model, on two image sizes. A randomly initialised detector proposes slivers
    (boxes a hundredth of a pixel wide, whose IoU a last-bit difference between onnxruntime's and PyTorch's
    convolutions changes a lot) and near-tied scores whose order such a difference can flip; torchvision's own
    export shows the same. So a detection's twin has the same label, a score within 1e-3 and IoU >= 0.99 or every
    coordinate within 0.05 pixel; the 10 best detections each have one, and at least 90% of all detections do."""
    mine, _ = model_pair("fasterrcnn_resnet50_fpn", box_score_thresh=0.05, box_detections_per_img=1000)
    mine.eval()
    g = torch.Generator().manual_seed(0)
    # Sizes the transform neither resizes nor pads: onnxruntime's Resize differs from torch's interpolate in the last
    # bits (torchvision's export too), which the random model above amplifies (the resized case is compared with
    # torchvision's export in test_detector_exports_and_equals_torchvision_export).
    images = [torch.rand(3, h, w, generator=g) for h, w in [(320, 416), (320, 480)]]
    model = export_detector(mine, images[0])
    mine.fast_inference = False
    for image in images:
        got = detections(run(model, image))[0]
        with torch.no_grad():
            expected = mine([image])[0]
        assert_twins_across_runtimes(got, expected)


@pytest.mark.slow
def test_vgg16_detector_exports_with_max_roi_pool():
    torch.manual_seed(0)
    model = ours.fasterrcnn_vgg16(num_classes=5, min_size=224, max_size=320, box_score_thresh=0.0).eval()
    image = torch.rand(3, 224, 288)
    exported = export_detector(model, image)
    assert "MaxRoiPool" in op_types(exported)
    got = detections(run(exported, image))
    model.fast_inference = False
    with torch.no_grad():
        expected = model([image])
    assert len(got[0]["boxes"]) == len(expected[0]["boxes"]) > 0
    torch.testing.assert_close(got[0]["scores"][:10], expected[0]["scores"][:10], rtol=1e-3, atol=1e-4)


def import_openvino():
    """openvino, or a skip: where it is not installed, and under the sanitizers (scripts/sanitize.sh), whose runtime
    refuses OpenVINO's dlopen of its TBB libraries with RTLD_DEEPBIND and stops the process."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("OpenVINO dlopens TBB with RTLD_DEEPBIND, which AddressSanitizer's runtime refuses")
    return pytest.importorskip("openvino")


def openvino_compile(openvino, exported):
    """The exported detector compiled by OpenVINO's CPU plugin in float32. Where the CPU has bfloat16 units
    (AVX512_BF16, AMX) the plugin's default inference precision is bfloat16, whose 8-bit mantissa moves boxes by
    tenths of a pixel; the comparison with onnxruntime is of the same float32 model."""
    core = openvino.Core()
    return core.compile_model(core.read_model(exported), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def test_openvino_runs_the_exported_detector_like_onnxruntime():
    """OpenVINO loads the exported file and gives onnxruntime's detections on two image sizes (the two runtimes'
    convolutions differ in the last bits, as onnxruntime's and PyTorch's do: the same criterion as below)."""
    openvino = import_openvino()
    mine, _ = model_pair("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.05)
    mine.eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in IMAGE_SIZES]
    exported = export_detector(mine, images[0])
    compiled = openvino_compile(openvino, exported)
    for image in images:
        outputs = compiled({"image": image.numpy()})
        got = detections([torch.from_numpy(outputs[name]) for name in ("boxes", "labels", "scores")])
        expected = detections(run(exported, image))
        assert len(expected[0]["boxes"]) > 0
        assert_twins_across_runtimes(got[0], expected[0])
