"""No hidden host synchronisation in the CUDA ops whose output sizes are known in advance: each runs under
torch.cuda.set_sync_debug_mode("error"), which raises at any synchronising call (a device-to-host copy, a copy from
pageable memory, .item(), nonzero). nms, batched_nms and the post-processing must read their output's size, once;
scripts/cuda_sync_audit.py counts those. Skipped without a GPU."""

import pytest
import torch

import fasterrcnn_ext.ops as ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]


def _boxes(n, seed, size=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * size / 4 + 1], 1).cuda()


def _sync_free_cases():
    """Each case's inputs are on the device before its call: a copy from pageable host memory (`.cuda()`,
    torch.tensor(..., device="cuda")) synchronises, and inside the call it would be counted against the op."""
    b, s, idx = _boxes(300, 0), torch.rand(300).cuda(), torch.randint(0, 4, (300,)).cuda()
    x = torch.randn(2, 16, 40, 48).cuda()
    boxes = [_boxes(40, 1), _boxes(30, 2)]
    rois = torch.cat([torch.cat([torch.full((len(v), 1), float(i), device="cuda"), v], 1) for i, v in enumerate(boxes)])
    feats = [torch.randn(2, 16, 40, 48).cuda(), torch.randn(2, 16, 20, 24).cuda()]
    objectness, deltas, anchors = torch.randn(2, 2000).cuda(), torch.randn(2, 2000, 4).cuda() * 0.1, _boxes(2000, 3)
    logits, regression = torch.randn(80, 5).cuda() * 3, torch.randn(80, 20).cuda() * 0.1
    proposals, proposal_counts = torch.cat([boxes[0], boxes[0]]), torch.tensor([40, 25]).cuda()
    return {
        "box_iou": lambda: ops.box_iou(b, b),
        "clip_boxes_to_image": lambda: ops.clip_boxes_to_image(b, (80, 90)),
        "encode_boxes": lambda: ops.encode_boxes(b, b + 1, (1.0, 1.0, 1.0, 1.0)),
        "decode_boxes": lambda: ops.decode_boxes(torch.zeros_like(b), b, (1.0, 1.0, 1.0, 1.0)),
        "batched_nms_keep_mask": lambda: ops.batched_nms_keep_mask(b, s, idx, 0.5),
        "roi_align (rois)": lambda: ops.roi_align(x, rois, 7, 0.5, 2, True),
        "roi_align (list of boxes)": lambda: ops.roi_align(x, boxes, 7, 0.5, 2, True),
        "roi_pool": lambda: ops.roi_pool(x, rois, 7, 0.5),
        "multi_scale_roi_align": lambda: ops.multi_scale_roi_align(feats, rois, 7, [0.5, 0.25], 2),
        "rpn_proposals_padded": lambda: ops.rpn_proposals_padded(
            objectness, deltas, anchors, [1500, 500], [(200, 220), (210, 200)], 300, 100, 0.7),
        "detection_postprocess_padded": lambda: ops.detection_postprocess_padded(
            logits, regression, proposals, proposal_counts, [(100, 120), (110, 100)]),
    }


@pytest.mark.parametrize("name", list(_sync_free_cases()) if torch.cuda.is_available() else ["cuda"])
def test_cuda_op_does_not_synchronise(name):
    fn = _sync_free_cases()[name]
    fn()  # first calls initialise lazily (and may sync): not what is checked
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
