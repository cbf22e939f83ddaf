"""Every public op and module under torch.jit.script gives the eager results, and the RoI ops are torch.fx leaves
(as torchvision's are), so FX tools (symbolic_trace, feature extraction) work on models that hold them."""

import warnings

import pytest
import torch
import torch.fx
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fasterrcnn_ext.ops as ops


def script(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.x, still supported
        return torch.jit.script(fn)


def boxes_and_scores(n=300, seed=0, size=200.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * size / 4 + 1], dim=1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, 4, (n,), generator=g)


def rois_for(n_images, per_image=6, size=60.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for _ in range(n_images):
        xy = torch.rand(per_image, 2, generator=g) * size
        boxes.append(torch.cat([xy, xy + torch.rand(per_image, 2, generator=g) * size / 2 + 2], dim=1))
    return boxes


def assert_equal(got, expected):
    if isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_equal(a, b)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_box_ops_script():
    boxes, scores, idxs = boxes_and_scores()
    cases = [
        (ops.nms, (boxes, scores, 0.5)),
        (ops.nms, (boxes, scores, 0.5, 7)),  # max_keep: ours, positional so that TorchScript keeps it
        (ops.batched_nms, (boxes, scores, idxs, 0.5)),
        (ops.batched_nms, (boxes, scores, idxs, 0.5, 3)),
        (ops.batched_nms, (boxes[:0], scores[:0], idxs[:0], 0.5)),
        (ops.batched_nms_keep_mask, (boxes, scores, idxs, 0.5)),
        (ops.box_iou, (boxes[:20], boxes[10:50])),
        (ops.box_iou, (boxes[:20].round().long(), boxes[10:50].round().long())),  # integer boxes: torchvision's
        (ops.clip_boxes_to_image, (boxes - 20, (150, 120))),
        (ops.clip_boxes_to_image, ((boxes - 20).round().int(), (150, 120))),
        (ops.remove_small_boxes, (boxes, 20.0)),
        (ops.encode_boxes, (boxes[:50], boxes[50:100], (10.0, 10.0, 5.0, 5.0))),
        (ops.decode_boxes, (torch.randn(50, 8) * 0.2, boxes[:50], (10.0, 10.0, 5.0, 5.0))),
    ]
    for fn, args in cases:
        scripted = script(fn)
        assert_equal(scripted(*args), fn(*args))
    assert len(script(ops.nms)(boxes, scores, 0.5, 7)) == 7


def test_roi_ops_script_with_tensor_and_list_boxes():
    x = torch.randn(2, 5, 30, 36)
    boxes = rois_for(2)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    feats = [torch.randn(2, 5, 30, 36), torch.randn(2, 5, 15, 18)]
    for fn, args in [
        (ops.roi_align, (x, rois, [7, 7], 0.5, 2, True)),
        (ops.roi_align, (x, boxes, [5, 3], 0.5, -1, False)),
        (ops.roi_pool, (x, rois, [7, 7], 0.5)),
        (ops.roi_pool, (x, boxes, [4, 6], 0.5)),
        (ops.multi_scale_roi_align, (feats, boxes, [7, 7], [0.5, 0.25], 2)),
    ]:
        assert_equal(script(fn)(*args), fn(*args))
    # BroadcastingList2: an int output size too, as torchvision's scripted ops take it.
    assert_equal(script(ops.roi_align)(x, rois, 7, 0.5, 2, True), ops.roi_align(x, rois, 7, 0.5, 2, True))


def test_postprocess_ops_script():
    n, a, k, c = 2, 120, 40, 4
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(a, 2, generator=g) * 80
    anchors = torch.cat([xy, xy + torch.rand(a, 2, generator=g) * 30 + 4], 1)
    args = (torch.randn(n, a, generator=g), torch.randn(n, a, 4, generator=g) * 0.1, anchors, [80, 40],
            [(100, 90), (96, 100)], 50, 20, 0.7, 0.0, 1e-3)
    assert_equal(script(ops.rpn_proposals)(*args), ops.rpn_proposals(*args))
    proposals = [anchors[:k], anchors[k:k + 25]]
    args = (torch.randn(k + 25, c, generator=g) * 3, torch.randn(k + 25, 4 * c, generator=g) * 0.1, proposals,
            [(100, 90), (96, 100)], (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 30)
    assert_equal(script(ops.detection_postprocess)(*args), ops.detection_postprocess(*args))


def test_modules_script():
    x = torch.randn(2, 5, 30, 36)
    boxes = rois_for(2)
    for module in (ops.RoIAlign(7, 0.5, 2, aligned=True), ops.RoIAlign((3, 5), 0.5, -1), ops.RoIPool(7, 0.5)):
        assert_equal(script(module)(x, boxes), module(x, boxes))
    features = {"p2": torch.randn(2, 5, 32, 40), "p3": torch.randn(2, 5, 16, 20), "other": torch.randn(2, 5, 8, 10)}
    shapes = [(128, 160), (120, 150)]
    eager, scripted = ops.MultiScaleRoIAlign(["p2", "p3"], 7, 2), script(ops.MultiScaleRoIAlign(["p2", "p3"], 7, 2))
    assert_equal(scripted(features, boxes, shapes), eager(features, boxes, shapes))
    assert scripted.scales == eager.scales == [0.25, 0.125]


def test_multi_scale_roi_align_scripted_over_non_adjacent_levels(monkeypatch):
    """Maps at strides 8 and 32 (torchvision's own ONNX test): the scripted module takes the same per-level path."""
    from fasterrcnn_ext.ops import poolers

    monkeypatch.setattr(poolers, "_warned_non_adjacent", [False])
    features = {"a": torch.randn(1, 3, 16, 16), "b": torch.randn(1, 3, 4, 4)}
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 40.0], [0.0, 0.0, 120.0, 120.0], [10.0, 20.0, 14.0, 26.0]])]
    eager = ops.MultiScaleRoIAlign(["a", "b"], 3, 2)
    with pytest.warns(UserWarning, match="skip a pyramid level"):
        expected = eager(features, boxes, [(128, 128)])
    got = script(ops.MultiScaleRoIAlign(["a", "b"], 3, 2))(features, boxes, [(128, 128)])
    assert_equal(got, expected)
    assert expected.abs().sum() > 0


class _Detector(torch.nn.Module):
    """A toy model holding every RoI module, and calling the ops directly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.align = ops.RoIAlign(5, 0.5, 2, aligned=True)
        self.pool = ops.RoIPool(5, 0.5)
        self.multi = ops.MultiScaleRoIAlign(["a", "b"], 5, 2)

    def forward(self, x, rois, boxes: list[torch.Tensor]):
        f = self.conv(x)
        a = self.align(f, rois)
        p = self.pool(f, rois)
        m = self.multi({"a": f, "b": torch.nn.functional.max_pool2d(f, 2)}, boxes, [(40, 48), (40, 48)])
        keep = ops.nms(rois[:, 1:], rois[:, 0] + 0.5, 0.5)
        return a.sum(1) + p.sum(1) + m.sum(1), keep


def _detector_inputs():
    x = torch.rand(2, 3, 40, 48)
    boxes = rois_for(2, per_image=4, size=30.0)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    return x, rois, boxes


def test_roi_ops_are_fx_leaves():
    model = _Detector()
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert {ops.roi_align, ops.roi_pool} <= targets
    assert any(getattr(t, "__name__", "") == "_multi_scale_pool" for t in targets)
    assert model.multi.scales is None  # the trace left the module as it was
    args = _detector_inputs()
    assert_equal(traced(*args), model(*args))


def test_fx_feature_extraction_through_roi_modules():
    model = _Detector()
    train_nodes, eval_nodes = get_graph_node_names(model)
    # torchvision's feature extraction keeps the modules of torchvision.ops whole: ours too, once patched in there.
    whole = torchvision.ops.RoIAlign is ops.RoIAlign
    align, pool = ("align", "pool") if whole else ("align.roi_align", "pool.roi_pool")
    assert align in eval_nodes and pool in eval_nodes and "multi" in eval_nodes
    extractor = create_feature_extractor(model, return_nodes={align: "aligned", "multi": "multi"})
    args = _detector_inputs()
    out = extractor(*args)
    f = model.conv(args[0])
    assert_equal(out["aligned"], ops.roi_align(f, args[1], 5, 0.5, 2, True))
    assert out["multi"].shape == (len(args[1]), 4, 5, 5)


class _FunctionalRoIOps(torch.nn.Module):
    """Calls the functional ops through the ops module, as user code does (``ops.roi_align(...)``)."""

    def forward(self, x, rois, boxes):
        aligned = ops.roi_align(x, rois, 5, 0.5, 2, True)
        pooled = ops.roi_pool(x, boxes, (3, 4), 0.5)
        multi = ops.multi_scale_roi_align([x, torch.nn.functional.max_pool2d(x, 2)], boxes, 3, [0.5, 0.25], 2,
                                          [(40, 48), (40, 48)])
        keep = ops.nms(rois[:, 1:], rois[:, 0] + 0.5, 0.5)
        keep_batched = ops.batched_nms(rois[:, 1:], rois[:, 0] + 0.5, rois[:, 0].long(), 0.5)
        return aligned.sum(1), pooled.sum(1), multi.sum(1), keep, keep_batched


def test_functional_roi_ops_are_fx_leaves_where_user_code_calls_them():
    model = _FunctionalRoIOps()
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert {ops.roi_align, ops.roi_pool, ops.multi_scale_roi_align, ops.nms, ops.batched_nms} <= targets
    args = _detector_inputs()
    for got, expected in zip(traced(*args), model(*args)):
        assert_equal(got, expected)
