"""Benchmark cases that the quick CLI test does not run: the deployment peer rows (torch.export program,
onnxruntime, OpenVINO)."""

import importlib.util

import pytest
import torch

from fasterrcnn_ext import capabilities
from fasterrcnn_ext.benchmark import cases
from fasterrcnn_ext.models import detection


def test_deployment_peers_run_the_same_model():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                           box_score_thresh=0.0).eval()
    image = torch.rand(3, 240, 320)
    peers = cases._deployment_peers(model, image)
    assert "torch.export" in peers[0].name and all(case.target == 1.0 for case in peers)
    assert any("dynamo ONNX" in case.name for case in peers) == (importlib.util.find_spec("onnxscript") is not None)
    for case in peers:
        with torch.no_grad():
            ours = case.ours()
            outputs = case.torchvision()
        if isinstance(outputs, list) and isinstance(outputs[0], dict):  # the torch.export program's detections
            outputs = outputs[0]
        boxes = outputs[0] if isinstance(outputs, list) else outputs["boxes"]
        # Counts may differ by a near tie (random weights): tests/models/test_onnx.py compares detections.
        assert boxes.shape[1] == 4 and len(boxes) > 0 and len(ours[0]["boxes"]) > 0


def test_training_step_gives_torchvision_losses_and_fills_gradients():
    """The training case's step: the same seeded samples on both sides, so the same losses; and a real backward."""
    from torchvision.models.detection import faster_rcnn as tv

    torch.manual_seed(0)
    theirs = tv.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5).train()
    ours = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5).train()
    ours.load_state_dict(theirs.state_dict())
    images = [torch.rand(3, 240, 320), torch.rand(3, 200, 300)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 120.0, 150.0], [150.0, 30.0, 300.0, 200.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 90.0]]), "labels": torch.tensor([4])}]
    ours_step = cases.training_step(ours, images, targets)
    theirs_step = cases.training_step(theirs, images, targets)
    with torch.no_grad():  # as the benchmark runner calls it
        ours_losses, theirs_losses = ours_step(), theirs_step()
    assert ours_losses.shape == (4,) and bool(torch.isfinite(ours_losses).all())
    # Sorted keys: loss_box_reg, loss_classifier, loss_objectness, loss_rpn_box_reg. The box head's losses within
    # the tolerance of tests/models/test_faster_rcnn.py (near-equal proposal scores may be ordered differently).
    torch.testing.assert_close(ours_losses[2:], theirs_losses[2:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_losses[:2], theirs_losses[:2], rtol=1e-2, atol=1e-3)
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[-4:])
    assert any(bool(g.abs().sum() > 0) for g in grads if g is not None)
    # A second call starts from zeroed gradients: the same gradients again, not twice them.
    first = ours.roi_heads.box_predictor.cls_score.weight.grad.clone()
    with torch.no_grad():
        ours_step()
    torch.testing.assert_close(ours.roi_heads.box_predictor.cls_score.weight.grad, first)


def test_training_group_is_registered():
    assert "training" in cases.ALL_CASES


# --- bench --precision: the detector group's bf16 and int8 rows ---------------------------------------------------

def _tiny_pair():
    """make_model and the reference of low_precision_cases at a tiny size: torchvision's MobileNetV3 320 detector
    (random weights) and ours with its weights."""
    from torchvision.models.detection import faster_rcnn as tv

    # Images resized to 96 pixels (the builder's 320 would cost every quantizer's calibration and every row 11x).
    options = dict(weights=None, weights_backbone=None, num_classes=3, box_score_thresh=0.0, min_size=96,
                   max_size=128)
    torch.manual_seed(0)
    reference = tv.fasterrcnn_mobilenet_v3_large_320_fpn(**options).eval()
    built = []

    def make_model():
        model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(**options).eval()
        model.load_state_dict(reference.state_dict())
        built.append(model)
        return model

    return make_model, reference, built


@pytest.fixture
def fake_quantize(monkeypatch):
    """quantization.quantize replaced by a recorder that returns a copy of the model (the rows' construction is
    tested here, int8's arithmetic in tests/test_quantization.py); int8 available."""
    import copy

    from fasterrcnn_ext import quantization

    calls = []

    def quantize(model, calibration_images, *, inplace=False):
        calls.append(calibration_images)
        return copy.deepcopy(model)

    monkeypatch.setattr(quantization, "quantize", quantize)
    monkeypatch.setattr(quantization, "int8_available", lambda: (True, ""))
    return calls


def _never_built():
    raise AssertionError("a skipped row built a model")


def _names(rows):
    return [name for name, _ in rows]


def test_precision_rows_are_skipped_off_the_cpu():
    rows = cases.low_precision_cases(_never_built, None, torch.rand(3, 8, 8), "cuda", ["bf16", "int8"])
    assert [r.name for r in rows] == _names(cases.BF16_ROWS + cases.INT8_ROWS)
    assert all(isinstance(r, cases.Skipped) and r.reason.startswith("a CPU row") for r in rows)


def test_precision_rows_are_skipped_where_the_cpu_lacks_the_instructions(fake_quantize):
    image = torch.rand(3, 8, 8)
    with capabilities.forced(native_bfloat16=False, native_int8=False):
        rows = cases.low_precision_cases(_never_built, None, image, "cpu", ["bf16", "int8"])
    assert [(r.name, r.target) for r in rows] == list(cases.BF16_ROWS + cases.INT8_ROWS)
    assert all(isinstance(r, cases.Skipped) for r in rows)
    assert all("neither AVX512-BF16 nor AMX" in r.reason for r in rows[:2])
    assert all("neither VNNI nor AMX" in r.reason for r in rows[2:])
    assert not fake_quantize


def test_int8_rows_are_skipped_with_the_reason_int8_gives(fake_quantize, monkeypatch):
    from fasterrcnn_ext import quantization

    monkeypatch.setattr(quantization, "int8_available", lambda: (False, "no oneDNN int8 kernels in this build"))
    with capabilities.forced(native_int8=True):
        rows = cases.low_precision_cases(_never_built, None, torch.rand(3, 8, 8), "cpu", ["int8"])
    assert [r.name for r in rows] == _names(cases.INT8_ROWS)
    assert all(isinstance(r, cases.Skipped) and r.reason == "int8 does not pay here: no oneDNN int8 kernels in this "
               "build" for r in rows)


def test_a_peer_row_is_skipped_where_its_package_is_absent(fake_quantize, monkeypatch):
    real_peer = cases._peer
    absent = {"openvino", "onnxruntime"}
    monkeypatch.setattr(cases, "_peer", lambda name: f"{name} is not installed" if name in absent else real_peer(name))
    make_model, reference, _ = _tiny_pair()
    image = torch.rand(3, 64, 80)
    with capabilities.forced(native_bfloat16=True, native_int8=True):
        rows = cases.low_precision_cases(make_model, reference, image, "cpu", ["bf16", "int8"])
    by_name = {r.name: r for r in rows}
    assert list(by_name) == _names(cases.BF16_ROWS + cases.INT8_ROWS)  # no peer runs: no versions in the names
    ours = [name for name, _ in (cases.BF16_ROWS[0], cases.INT8_ROWS[0], cases.INT8_ROWS[1])]
    assert all(isinstance(by_name[name], cases.Case) for name in ours)
    assert by_name[cases.BF16_ROWS[1][0]].reason == "openvino is not installed"
    assert by_name[cases.INT8_ROWS[2][0]].reason == "openvino is not installed"
    assert by_name[cases.INT8_ROWS[3][0]].reason == "onnxruntime is not installed"
    (calibration,) = fake_quantize  # default: BENCH_CALIBRATION_IMAGES of the image's size
    assert len(calibration) == cases.BENCH_CALIBRATION_IMAGES and calibration[0].shape == image.shape

    # OpenVINO present but not NNCF: the OpenVINO int8 row says which is missing.
    absent = {"nncf", "onnxruntime"}
    with capabilities.forced(native_bfloat16=False, native_int8=True):
        rows = cases.low_precision_cases(make_model, reference, image, "cpu", ["int8"])
    assert [r.name for r in rows] == _names(cases.INT8_ROWS) and rows[2].reason == "nncf is not installed"
    # int8 against our bf16 needs the bf16 mode: skipped with its reason on a CPU without it.
    assert isinstance(rows[1], cases.Skipped) and "neither AVX512-BF16 nor AMX" in rows[1].reason


def test_peer_reasons_name_the_missing_package():
    assert cases._peer("no_such_runtime_xyz") == ("no_such_runtime_xyz is not installed (an optional peer: "
                                                  "requirements-dev.txt)")
    assert cases._peer("onnx").__name__ == "onnx"


def test_an_unknown_bench_precision_is_refused():
    with pytest.raises(ValueError, match="precisions holds 'fp16': choose from fp32, bf16, int8"):
        cases.detector_cases("cpu", precisions=("fp16",))


def test_precision_rows_run_the_same_model_at_a_tiny_size(monkeypatch):
    """Every bf16 and int8 row built and run once: ours (quantization.quantize's int8 model), OpenVINO bf16, NNCF's
    int8 OpenVINO model and onnxruntime's QDQ model, on one ONNX export, every int8 side calibrated on the same
    images."""
    import warnings

    from fasterrcnn_ext import quantization

    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    calibrated = []
    real_quantize = quantization.quantize
    monkeypatch.setattr(quantization, "quantize", lambda model, images: calibrated.append(images) or
                        real_quantize(model, images))
    monkeypatch.setattr(quantization, "int8_available", lambda: (True, ""))
    for name in ("_openvino_int8", "_onnxruntime_int8"):
        real = getattr(cases, name)
        monkeypatch.setattr(cases, name, lambda *args, real=real: calibrated.append(args[-2]) or real(*args))
    make_model, reference, built = _tiny_pair()
    image = torch.rand(3, 96, 128)
    calibration = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    native_bf16 = capabilities.cpu_capabilities().native_bfloat16
    with capabilities.forced(native_int8=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "quantize: ", RuntimeWarning)  # int8 on a CPU without VNNI: slower only
        rows = cases.low_precision_cases(make_model, reference, image, "cpu", ["bf16", "int8"], calibration)
    assert calibrated == [calibration] * 3
    expected = (cases.BF16_ROWS if native_bf16 else ()) + cases.INT8_ROWS
    ran = [r for r in rows if isinstance(r, cases.Case)]
    assert len(ran) == len(expected) and all(r.target == t for r, (_, t) in zip(ran, expected))
    assert any("OpenVINO" in r.name and "NNCF" in r.name for r in ran)
    assert any("onnxruntime" in r.name and "QDQ" in r.name for r in ran)
    if native_bf16:
        assert built[0].inference_dtype == torch.bfloat16
    for case in ran:
        with torch.no_grad():
            ours = case.ours()
            theirs = case.torchvision()
        assert ours[0]["boxes"].shape[1] == 4 and len(ours[0]["boxes"]) > 0
        if isinstance(theirs, list) and isinstance(theirs[0], dict):  # torchvision's or our bf16 detections
            boxes = theirs[0]["boxes"]
        else:  # a peer's outputs: boxes first
            boxes = theirs[0] if isinstance(theirs, list) else next(iter(theirs.values()))
        assert boxes.shape[1] == 4 and len(boxes) > 0


def test_detector_group_runs_the_precisions_asked_for(monkeypatch):
    """detector_cases at bf16 and int8 only: no float32 row, the low-precision rows in order (skipped here: the
    capabilities are forced off, so no detector is timed or exported)."""
    from torchvision.models.detection import faster_rcnn as tv

    from fasterrcnn_ext.models import detection as ours

    make_model, reference, built = _tiny_pair()
    monkeypatch.setattr(tv, "fasterrcnn_resnet50_fpn", lambda **kwargs: reference)
    monkeypatch.setattr(ours, "fasterrcnn_resnet50_fpn", lambda **kwargs: make_model())
    with capabilities.forced(native_bfloat16=False, native_int8=False):
        rows = cases.detector_cases("cpu", precisions=("int8", "bf16"))
    assert [r.name for r in rows] == _names(cases.BF16_ROWS + cases.INT8_ROWS)
    assert all(isinstance(r, cases.Skipped) for r in rows) and not built  # no float32 detector built either
