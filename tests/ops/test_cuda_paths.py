"""Code that only CUDA runs: the composite post-processing ops on CUDA (against the CPU op and torchvision) and the
channel chunking of the CUDA RoIAlign forward (a partial last chunk; more chunks than the grid's y dimension
holds). Skipped without a GPU; scripts/gpu_check.sh runs them (marker `cuda`)."""

import pytest
import torch
import torchvision

import fasterrcnn_ext.ops as ops

from .test_postprocess import (
    IMAGE_SIZES,
    assert_same_proposals,
    canonical,
    detection_inputs,
    reference_proposals,
    rpn_inputs,
    torchvision_postprocess,
)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]


def to_cpu(per_image):
    return [[t.cpu() for t in group] for group in per_image]


@pytest.mark.parametrize("batch", [1, 2])
def test_rpn_proposals_cuda_matches_cpu_and_torchvision(batch):
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(batch)
    expected = reference_proposals(objectness, deltas, anchors, per_level, sizes)
    cpu = ops.rpn_proposals(objectness, deltas, anchors, per_level, sizes, 1000, 1000, 0.7)
    cuda = ops.rpn_proposals(objectness.cuda(), deltas.cuda(), anchors.cuda(), per_level, sizes, 1000, 1000, 0.7)
    assert cuda[0][0].is_cuda
    assert_same_proposals(to_cpu(cuda), expected)
    assert_same_proposals(to_cpu(cuda), cpu)


@pytest.mark.parametrize("score_thresh, detections", [(0.05, 100), (0.0, 300)])
def test_detection_postprocess_cuda_matches_cpu_and_torchvision(score_thresh, detections):
    class_logits, box_regression, proposals = detection_inputs()
    expected = torchvision_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES, score_thresh, 0.5,
                                       detections)
    cpu = ops.detection_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES, score_thresh=score_thresh,
                                    detections_per_img=detections)
    cuda = to_cpu(ops.detection_postprocess(class_logits.cuda(), box_regression.cuda(), [p.cuda() for p in proposals],
                                            IMAGE_SIZES, score_thresh=score_thresh, detections_per_img=detections))
    for reference in (expected, cpu):
        for b, s, lab, tb, ts, tl in zip(*cuda, *reference):
            b, s, lab = canonical(b, s, lab)
            tb, ts, tl = canonical(tb, ts, tl)
            torch.testing.assert_close(lab, tl)
            torch.testing.assert_close(s, ts, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b, tb, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("channels, output_size, num_rois", [
    (256, 7, 300),  # 7 chunks of 37 channels, the last one 34: a partial chunk
    # 46 x 46 = 2,116 bins > 2,048 elements a block: one channel a chunk, 70,000 chunks > 65,535 (the grid's y
    # dimension), so blocks 0 to 4,464 of y loop to a second chunk
    (70_000, 46, 1),
])
def test_roi_align_cuda_channel_chunks(channels, output_size, num_rois):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, 12, 10, generator=g)
    xy = torch.rand(num_rois, 2, generator=g) * 30
    rois = torch.cat([torch.zeros(num_rois, 1), xy, xy + torch.rand(num_rois, 2, generator=g) * 20 + 1], 1)
    got = ops.roi_align(x.cuda(), rois.cuda(), output_size, 0.25, 2, True)
    expected = torchvision.ops.roi_align(x.cuda(), rois.cuda(), output_size, 0.25, 2, True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
