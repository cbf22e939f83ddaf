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
