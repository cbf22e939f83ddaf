"""fasterrcnn_ext.patch_torchvision(): our ops, modules and Faster R-CNN behind torchvision's names, for code that
calls torchvision itself; torchvision as it was after unpatching."""

import contextlib
import sys
import threading
from types import ModuleType

import pytest
import torch
import torchvision
from torchvision.models.detection import faster_rcnn as tv_faster_rcnn

import fasterrcnn_ext
import fasterrcnn_ext.ops as ops
from fasterrcnn_ext import _torchvision as tv
from fasterrcnn_ext.models import detection as det

SMALL = dict(min_size=320, max_size=512)


@pytest.fixture(autouse=True)
def _unpatched():
    """Each test starts from torchvision as it is (a session run with --patch-torchvision is patched again after)."""
    was_patched = bool(fasterrcnn_ext.patched())
    fasterrcnn_ext.unpatch_torchvision()
    yield
    fasterrcnn_ext.unpatch_torchvision()
    if was_patched:
        fasterrcnn_ext.patch_torchvision()


def torchvision_namespace() -> dict:
    """Every name of every loaded torchvision module, and torchvision.models' registry, by identity."""
    from torchvision.models._api import BUILTIN_MODELS

    names = {(name, key): id(value) for name, module in list(sys.modules.items())
             if (name == "torchvision" or name.startswith("torchvision.")) and isinstance(module, ModuleType)
             for key, value in list(vars(module).items())}
    names.update({("registry", key): id(value) for key, value in BUILTIN_MODELS.items()})
    return names


def test_patch_puts_ours_behind_torchvision_names_and_unpatch_restores_everything():
    before = torchvision_namespace()
    assert fasterrcnn_ext.patched() == {}
    fasterrcnn_ext.patch_torchvision()
    try:
        for name in ("nms", "batched_nms", "box_iou", "clip_boxes_to_image", "remove_small_boxes", "roi_align",
                     "roi_pool", "RoIAlign", "RoIPool", "MultiScaleRoIAlign"):
            assert getattr(torchvision.ops, name) is getattr(ops, name), name
        # The names torchvision's own modules imported at load time, which its functions call each other through.
        assert sys.modules["torchvision.ops.boxes"].box_iou is ops.box_iou  # complete_box_iou, distance_box_iou
        assert sys.modules["torchvision.ops.boxes"].nms is ops.nms  # batched_nms
        assert sys.modules["torchvision.ops.poolers"].roi_align is ops.roi_align  # MultiScaleRoIAlign
        assert sys.modules["torchvision.models.detection.roi_heads"].roi_align is ops.roi_align
        assert tv_faster_rcnn.RegionProposalNetwork is det.RegionProposalNetwork
        assert tv_faster_rcnn.RoIHeads is det.RoIHeads
        assert torchvision.models.detection.FasterRCNN is det.FasterRCNN
        assert torchvision.models.detection.anchor_utils.AnchorGenerator is det.AnchorGenerator
        # torchvision's other names stay its own, fasterrcnn_ext.ops' re-exports of them too.
        assert torchvision.ops.box_area is tv.OPS["box_area"] is ops.box_area
        assert torchvision.ops.generalized_box_iou is ops.generalized_box_iou
        # Type checks of torchvision's FasterRCNN (and Mask R-CNN's) still take torchvision's own modules.
        assert tv_faster_rcnn.MultiScaleRoIAlign is tv.MultiScaleRoIAlign
        assert tv_faster_rcnn.AnchorGenerator is tv.AnchorGenerator
        in_place = fasterrcnn_ext.patched()
        assert in_place["torchvision.ops.nms"] is ops.nms
        assert in_place["torchvision.ops.boxes.box_iou"] is ops.box_iou
        assert "torchvision.models._api.BUILTIN_MODELS['fasterrcnn_resnet50_fpn']" in in_place
        assert "torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn" in in_place
    finally:
        fasterrcnn_ext.unpatch_torchvision()
    assert fasterrcnn_ext.patched() == {}
    assert torchvision_namespace() == before
    assert torchvision.ops.nms is tv.nms and torchvision.ops.MultiScaleRoIAlign is tv.MultiScaleRoIAlign


def test_patch_is_idempotent_and_one_unpatch_undoes_it():
    before = torchvision_namespace()
    fasterrcnn_ext.patch_torchvision()
    first = fasterrcnn_ext.patched()
    again = fasterrcnn_ext.patch_torchvision()
    assert not again.made_it
    assert fasterrcnn_ext.patched() == first
    fasterrcnn_ext.unpatch_torchvision()
    assert torchvision_namespace() == before
    fasterrcnn_ext.unpatch_torchvision()  # unpatching an unpatched torchvision changes nothing
    assert torchvision_namespace() == before


def test_the_block_form_restores_on_exit_and_after_an_exception():
    before = torchvision_namespace()
    with fasterrcnn_ext.patch_torchvision() as handle:
        assert handle.made_it and torchvision.ops.nms is ops.nms
    assert torchvision_namespace() == before
    with pytest.raises(RuntimeError, match="inside"):
        with fasterrcnn_ext.patch_torchvision():
            raise RuntimeError("inside")
    assert torchvision_namespace() == before
    # A block inside a patch (or another block) leaves the outer patch in place.
    fasterrcnn_ext.patch_torchvision()
    with fasterrcnn_ext.patch_torchvision():
        pass
    assert torchvision.ops.nms is ops.nms
    fasterrcnn_ext.unpatch_torchvision()
    assert torchvision_namespace() == before


def test_modules_imported_while_patched_are_restored_too():
    """A torchvision module first imported while patched took ours from torchvision.ops (``from torchvision.ops
    import roi_align``); unpatching gives it torchvision's."""
    name = "torchvision._fasterrcnn_ext_test_probe"
    try:
        with fasterrcnn_ext.patch_torchvision():
            probe = sys.modules[name] = ModuleType(name)
            probe.roi_align, probe.RoIPool = torchvision.ops.roi_align, torchvision.ops.RoIPool
            assert probe.roi_align is ops.roi_align
        assert probe.roi_align is tv.roi_align and probe.RoIPool is tv.RoIPool
    finally:
        sys.modules.pop(name, None)


def test_patching_from_many_threads_at_once():
    before = torchvision_namespace()
    errors = []
    barrier = threading.Barrier(8)

    def work():
        try:
            barrier.wait()
            fasterrcnn_ext.patch_torchvision()
            assert torchvision.ops.box_iou is ops.box_iou
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(fasterrcnn_ext.patched()) == len(set(fasterrcnn_ext.patched()))
    fasterrcnn_ext.unpatch_torchvision()
    assert torchvision_namespace() == before


# --- no recursion, whatever is patched -----------------------------------------------------------------------------

BOX_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int16, torch.int32, torch.int64,
              torch.uint8]
IOU_FUNCTIONS = ["box_iou", "generalized_box_iou", "distance_box_iou", "complete_box_iou", "generalized_box_iou_loss",
                 "distance_box_iou_loss", "complete_box_iou_loss"]


def boxes_of(dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 80 + 2
    return torch.cat([xy, xy + wh], 1).round().to(dtype)


def box_calls(dtype):
    """(name, call) for every box op and box-IoU variant of torchvision.ops, looked up at call time (as code that
    does ``import torchvision`` does)."""
    a, b = boxes_of(dtype, 12, 0), boxes_of(dtype, 12, 1)
    scores = (torch.randperm(12, generator=torch.Generator().manual_seed(2)).float() / 12).to(
        dtype if dtype.is_floating_point else torch.float32)
    classes = torch.arange(12) % 3
    calls = [(name, lambda name=name: getattr(torchvision.ops, name)(a, b)) for name in IOU_FUNCTIONS]
    calls += [
        ("box_iou mixed dtypes", lambda: torchvision.ops.box_iou(a, b.to(torch.float32))),
        ("box_iou batched", lambda: torchvision.ops.box_iou(a[None], b[None])),
        ("complete_box_iou batched", lambda: torchvision.ops.complete_box_iou(a[None], b[None])),
        ("clip_boxes_to_image", lambda: torchvision.ops.clip_boxes_to_image(a, (60, 70))),
        ("remove_small_boxes", lambda: torchvision.ops.remove_small_boxes(a, 40)),
        ("nms", lambda: torchvision.ops.nms(a, scores, 0.3)),
        ("batched_nms", lambda: torchvision.ops.batched_nms(a, scores, classes, 0.3)),
        ("boxes.batched_nms (torchvision's own, internal)",
         lambda: sys.modules["torchvision.ops.boxes"]._batched_nms_vanilla(a, scores, classes, 0.3)),
    ]
    if tv.BOX_IOU_TAKES_FMT:
        calls += [(f"box_iou fmt={fmt}", lambda fmt=fmt: torchvision.ops.box_iou(a, b, fmt=fmt))
                  for fmt in ("xyxy", "xywh", "cxcywh")]
    return calls


def roi_calls(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16, generator=g).to(dtype)
    boxes = [boxes_of(torch.float32, 4, 4).div(8).to(dtype), boxes_of(torch.float32, 3, 5).div(8).to(dtype)]
    rois = torch.cat([torch.tensor([[0.0]] * 4 + [[1.0]] * 3).to(dtype), torch.cat(boxes)], 1)
    features = {"0": x, "1": x[:, :, ::2, ::2].contiguous()}
    return [
        ("roi_align list", lambda: torchvision.ops.roi_align(x, boxes, 3, 0.5, 2, True)),
        ("roi_align rois", lambda: torchvision.ops.roi_align(x, rois, (3, 2), 0.5, -1)),
        ("roi_pool", lambda: torchvision.ops.roi_pool(x, rois, 3, 0.5)),
        ("RoIAlign", lambda: torchvision.ops.RoIAlign(3, 0.5, 2)(x, boxes)),
        ("RoIPool", lambda: torchvision.ops.RoIPool(3, 0.5)(x, boxes)),
        ("MultiScaleRoIAlign", lambda: torchvision.ops.MultiScaleRoIAlign(["0", "1"], 3, 2)(
            features, boxes, [(32, 32), (32, 32)])),
        ("MultiScaleRoIAlign (torchvision's)", lambda: tv.MultiScaleRoIAlign(["0", "1"], 3, 2)(
            features, boxes, [(32, 32), (32, 32)])),
    ]


def outcome(call):
    try:
        return call()
    except RecursionError:
        raise
    except Exception as e:  # noqa: BLE001 (an error is an outcome to compare)
        return e


def assert_same_outcome(name, dtype, got, expected):
    assert not isinstance(got, RecursionError), name
    if isinstance(expected, Exception):
        return  # torchvision refuses it: ours may refuse it or compute it, but must not recurse
    assert not isinstance(got, Exception), f"{name} {dtype}: torchvision computes it, ours raised {got!r}"
    if isinstance(expected, torch.Tensor) and expected.dtype == torch.int64 and name.startswith(("nms", "batched")):
        if dtype in (torch.float32, torch.float64):  # half types: IoU rounding may decide a threshold differently
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        return
    tol = dict(rtol=1e-2, atol=1e-2) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, **tol, equal_nan=True, check_dtype=True)


@pytest.mark.parametrize("dtype", BOX_DTYPES, ids=str)
def test_everything_patched_no_op_recurses_on_any_dtype(dtype):
    """Every op on every dtype path (integer boxes included) and every box-IoU variant, with torchvision patched:
    ours give torchvision's outcome, and nothing recurses (our fallbacks call torchvision's saved originals)."""
    calls = box_calls(dtype) + (roi_calls(dtype) if dtype.is_floating_point else [])
    expected = [outcome(call) for _, call in calls]
    with fasterrcnn_ext.patch_torchvision():
        got = [outcome(call) for _, call in calls]
    for (name, _), g, e in zip(calls, got, expected):
        assert_same_outcome(name, dtype, g, e)


def test_the_usual_monkeypatch_of_box_iou_does_not_recurse(monkeypatch):
    """What a new user tries first: our box_iou in torchvision's place by hand, then integer boxes (which ours hands
    to torchvision's arithmetic) and the IoU variants that call box_iou inside torchvision."""
    a, b = boxes_of(torch.int64, 5, 0), boxes_of(torch.int64, 4, 1)
    expected = [tv.box_iou(a, b), torchvision.ops.complete_box_iou(a, b), torchvision.ops.distance_box_iou(a, b)]
    monkeypatch.setattr(torchvision.ops, "box_iou", ops.box_iou)
    monkeypatch.setattr(sys.modules["torchvision.ops.boxes"], "box_iou", ops.box_iou)
    got = [torchvision.ops.box_iou(a, b), torchvision.ops.complete_box_iou(a, b),
           torchvision.ops.distance_box_iou(a, b)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# --- the detector ----------------------------------------------------------------------------------------------------


def spread_scores(model):
    """Larger head weights than the random initialisation's spread the scores, so detections compare one to one."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor.cls_score):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)


def images(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 320, 416, generator=g) for _ in range(n)]


def assert_same_detections(got, expected):
    """Every detection has a twin: same label, IoU >= 0.99, score within 1e-3."""
    for a, b in zip(got, expected):
        assert len(a["boxes"]) == len(b["boxes"])
        if len(b["boxes"]) == 0:
            continue
        iou = tv.box_iou(a["boxes"], b["boxes"])
        same_label = a["labels"][:, None] == b["labels"][None, :]
        close_score = (a["scores"][:, None] - b["scores"][None, :]).abs() <= 1e-3
        assert ((iou >= 0.99) & same_label & close_score).any(1).all()


def our_ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key.split("::")[1] for e in prof.key_averages() if e.key.startswith("fasterrcnn_ext::")}


def test_torchvisions_own_detector_runs_patched_with_our_builders_detections():
    """torchvision's own FasterRCNN (its classes, built before the patch) runs on our ops once patched, and gives
    the detections of our builder (the builder torchvision's name gives while patched) with the same weights."""
    torch.manual_seed(0)
    theirs = tv.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.05,
                                        box_detections_per_img=1000, **SMALL).eval()
    assert type(theirs) is tv.FasterRCNN
    spread_scores(theirs)
    batch = images()
    with torch.no_grad():
        unpatched = theirs(batch)
        assert not our_ops_called(lambda: theirs(batch[:1]))
        with fasterrcnn_ext.patch_torchvision():
            patched = theirs(batch)
            called = our_ops_called(lambda: theirs(batch[:1]))
            mine = torchvision.models.detection.fasterrcnn_resnet50_fpn(
                weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.05, box_detections_per_img=1000,
                **SMALL)
        assert type(mine) is det.FasterRCNN
        mine.load_state_dict(theirs.state_dict(), strict=True)
        mine.eval().fast_inference = False
        ours = mine(batch)
    assert {"batched_nms", "roi_align", "clip_boxes_to_image", "remove_small_boxes"} <= called, called
    assert sum(len(d["boxes"]) for d in unpatched) > 0
    assert_same_detections(patched, unpatched)
    assert_same_detections(ours, patched)


def test_builders_and_registry_build_ours_while_patched():
    with fasterrcnn_ext.patch_torchvision():
        kw = dict(weights=None, weights_backbone=None, num_classes=3)
        built = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(**kw)
        assert type(built) is det.FasterRCNN
        assert type(torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", **kw)) is det.FasterRCNN
        # torchvision's introspection of its builders still works: name, module, weights enum.
        assert (torchvision.models.get_model_weights("fasterrcnn_resnet50_fpn")
                is torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights)
        assert "fasterrcnn_resnet50_fpn" in torchvision.models.list_models(module=torchvision.models.detection)
        assert torchvision.models.detection.fasterrcnn_resnet50_fpn.__name__ == "fasterrcnn_resnet50_fpn"
        # The class and the modules it composes, also for a subclass of torchvision's own FasterRCNN.
        backbone = det.TinyBackbone()
        model = torchvision.models.detection.FasterRCNN(backbone, num_classes=3)
        assert type(model) is det.FasterRCNN

        class Subclass(tv.FasterRCNN):  # as a library that subclassed torchvision's class at import would
            pass

        sub = Subclass(backbone, num_classes=3, rpn_anchor_generator=tv.AnchorGenerator(((32,),), ((1.0,),)),
                       box_roi_pool=tv.MultiScaleRoIAlign(["0"], 7, 2))  # torchvision's own modules are accepted
        assert isinstance(sub.rpn, det.RegionProposalNetwork) and isinstance(sub.roi_heads, det.RoIHeads)
        assert isinstance(torchvision.ops.MultiScaleRoIAlign(["0"], 7, 2), ops.MultiScaleRoIAlign)
    assert type(torchvision.models.detection.FasterRCNN(backbone, num_classes=3)) is tv.FasterRCNN


def test_training_step_of_torchvisions_detector_while_patched():
    """Training torchvision's FasterRCNN class while patched (ours, through its name): torchvision's losses with the
    same weights (the box head's within the tolerance of test_faster_rcnn.test_train_losses_equal_torchvision: the
    sampler draws over proposals whose near-equal scores two correct implementations may order differently)."""
    anchors = (((16, 32, 64),), ((0.5, 1.0, 2.0),))
    kw = dict(num_classes=3, min_size=192, max_size=320, rpn_batch_size_per_image=128, box_batch_size_per_image=128)
    batch = images(1)
    target = [{"boxes": torch.tensor([[20.0, 30, 120, 140], [200, 100, 300, 250]]), "labels": torch.tensor([1, 2])}]
    torch.manual_seed(0)
    theirs = tv.FasterRCNN(det.TinyBackbone(), rpn_anchor_generator=tv.AnchorGenerator(*anchors),
                           box_roi_pool=tv.MultiScaleRoIAlign(["0"], 7, 2), **kw)
    with fasterrcnn_ext.patch_torchvision():
        generator = torchvision.models.detection.anchor_utils.AnchorGenerator(*anchors)
        mine = torchvision.models.detection.FasterRCNN(
            det.TinyBackbone(), rpn_anchor_generator=generator,
            box_roi_pool=torchvision.ops.MultiScaleRoIAlign(["0"], 7, 2), **kw)
    assert type(mine) is det.FasterRCNN
    mine.load_state_dict(theirs.state_dict(), strict=True)
    losses = []
    torch.manual_seed(1)
    losses.append(theirs.train()(batch, target))
    with fasterrcnn_ext.patch_torchvision():
        torch.manual_seed(1)
        losses.append(mine.train()(batch, target))
    assert losses[0].keys() == losses[1].keys()
    for key in ("loss_objectness", "loss_rpn_box_reg"):
        torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-4, atol=1e-5)
    for key in ("loss_classifier", "loss_box_reg"):
        torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-2, atol=1e-3)
    sum(losses[1].values()).backward()


def test_patch_refuses_without_the_compiled_library(monkeypatch):
    from fasterrcnn_ext import _library

    monkeypatch.setattr(_library, "LOADED", False)
    monkeypatch.setattr(_library, "LOAD_ERROR", "the compiled library is missing (test)")
    with pytest.raises(fasterrcnn_ext.ExtensionNotBuiltError):
        fasterrcnn_ext.patch_torchvision()
    assert fasterrcnn_ext.patched() == {}


def test_the_benchmark_row_times_the_same_work_patched_and_not():
    from fasterrcnn_ext.benchmark import cases

    (case,) = cases.ALL_CASES["patch"]("cpu")
    with torch.no_grad():
        boxes, iou, pooled = case.ours()
        assert torchvision.ops.nms is ops.nms  # the patched side runs patched
        expected_boxes, expected_iou, expected_pooled = case.torchvision()
    assert fasterrcnn_ext.patched() == {}  # and torchvision's side unpatched, which leaves torchvision as it was
    assert [len(b) for b in boxes] == [len(b) for b in expected_boxes] and len(boxes[0]) > 0
    for got, expected in zip(boxes + iou, expected_boxes + expected_iou):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-5, atol=1e-5)


def test_mask_rcnn_built_while_patched_trains_and_detects_as_torchvisions():
    """torchvision's Mask R-CNN subclasses its FasterRCNN, whose constructor then builds our RPN and RoI heads: the
    losses and detections (masks included) of the unpatched model with the same weights."""
    from torchvision.models.detection import mask_rcnn

    kw = dict(weights=None, weights_backbone=None, num_classes=3, box_score_thresh=0.0, **SMALL)
    torch.manual_seed(0)
    theirs = mask_rcnn.maskrcnn_resnet50_fpn(**kw)
    with fasterrcnn_ext.patch_torchvision():
        mine = mask_rcnn.maskrcnn_resnet50_fpn(**kw)
    assert isinstance(mine.rpn, det.RegionProposalNetwork) and isinstance(mine.roi_heads, det.RoIHeads)
    mine.load_state_dict(theirs.state_dict(), strict=True)
    batch = images(1)
    masks = torch.zeros(2, 320, 416, dtype=torch.uint8)
    masks[0, 30:140, 20:120] = masks[1, 100:250, 200:300] = 1
    target = [{"boxes": torch.tensor([[20.0, 30, 120, 140], [200, 100, 300, 250]]), "labels": torch.tensor([1, 2]),
               "masks": masks}]
    results = []
    for model in (theirs, mine):
        with fasterrcnn_ext.patch_torchvision() if model is mine else contextlib.nullcontext():
            torch.manual_seed(1)
            losses = model.train()(batch, target)
            with torch.no_grad():
                detections = model.eval()(batch)
        results.append((losses, detections))
    (expected_losses, expected), (losses, got) = results
    for key in expected_losses:
        torch.testing.assert_close(losses[key], expected_losses[key], rtol=1e-4, atol=1e-5)
    assert len(got[0]["boxes"]) == len(expected[0]["boxes"]) > 0
    assert_same_detections(got, expected)
    a, b = got[0], expected[0]
    twin = (tv.box_iou(a["boxes"], b["boxes"]) * (a["labels"][:, None] == b["labels"][None, :])).argmax(1)
    torch.testing.assert_close(a["masks"], b["masks"][twin], rtol=1e-4, atol=1e-4)
