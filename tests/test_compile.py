"""torch.compile(fullgraph=True) and torch.export trace the ops through their fake kernels."""

import torch

import fasterrcnn_ext.ops as ops


def _nms_model(boxes, scores, idxs):
    keep = ops.nms(boxes, scores, 0.5)
    keep_batched = ops.batched_nms(boxes, scores, idxs, 0.5, max_keep=10)
    return keep, keep_batched


def _inputs(n=200):
    xy = torch.rand(n, 2) * 100
    boxes = torch.cat([xy, xy + torch.rand(n, 2) * 30 + 1], dim=1)
    return boxes, torch.rand(n), torch.randint(0, 3, (n,))


def test_torch_compile_fullgraph():
    args = _inputs()
    compiled = torch.compile(_nms_model, fullgraph=True, backend="eager")
    for got, expected in zip(compiled(*args), _nms_model(*args)):
        torch.testing.assert_close(got, expected)


def test_torch_export():
    class Model(torch.nn.Module):
        def forward(self, boxes, scores, idxs):
            return _nms_model(boxes, scores, idxs)

    args = _inputs()
    exported = torch.export.export(Model(), args)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "fasterrcnn_ext.nms.default" in targets and "fasterrcnn_ext.batched_nms.default" in targets
    for got, expected in zip(exported.module()(*args), _nms_model(*args)):
        torch.testing.assert_close(got, expected)


def _pool_model(x, feats, rois):
    a = ops.roi_align(x, rois, 7, 0.5, 2, True)
    p = ops.roi_pool(x, rois, 7, 0.5)
    m = ops.multi_scale_roi_align(feats, rois, 7, [1 / 4, 1 / 8], 2)
    return a, p, m


def _pool_inputs():
    x = torch.randn(2, 4, 20, 24)
    feats = [torch.randn(2, 4, 20, 24), torch.randn(2, 4, 10, 12)]
    xy = torch.rand(12, 2) * 30
    rois = torch.cat([torch.randint(0, 2, (12, 1)).float(), xy, xy + torch.rand(12, 2) * 40 + 1], 1)
    return x, feats, rois


def test_torch_compile_roi_ops_forward_and_backward():
    x, feats, rois = _pool_inputs()
    compiled = torch.compile(_pool_model, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    got = compiled(xc, feats, rois)
    expected = _pool_model(xe, feats, rois)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    (got[0].sum() + got[1].sum()).backward()
    (expected[0].sum() + expected[1].sum()).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_torch_export_roi_ops():
    class Model(torch.nn.Module):
        def forward(self, x, f0, f1, rois):
            return _pool_model(x, [f0, f1], rois)

    x, feats, rois = _pool_inputs()
    exported = torch.export.export(Model(), (x, *feats, rois))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "fasterrcnn_ext._roi_pool_values.default" in targets  # no gradient wanted: the op without the argmax
    for got, expected in zip(exported.module()(x, *feats, rois), _pool_model(x, feats, rois)):
        torch.testing.assert_close(got, expected)


def test_torch_compile_roi_ops_inference():
    x, feats, rois = _pool_inputs()
    compiled = torch.compile(_pool_model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for got, expected in zip(compiled(x.requires_grad_(), feats, rois), _pool_model(x, feats, rois)):
            torch.testing.assert_close(got, expected)
