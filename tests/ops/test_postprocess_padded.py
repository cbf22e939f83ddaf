"""rpn_proposals_padded and detection_postprocess_padded: the fused post-processing with static output sizes (for CUDA
graphs) gives, in each image's first counts[i] rows, exactly what the dynamic ops give, and zeros after."""

import pytest
import torch

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext.ops._registration import ops_and_twins

from .test_postprocess import HEADS_CODER, IMAGE_SIZES, RPN_CODER, detection_inputs, rpn_inputs

E = torch.ops.fasterrcnn_ext
WEIGHTS = [10.0, 10.0, 5.0, 5.0]


def flat(sizes):
    return [v for hw in sizes for v in hw]


def assert_padded_equals(padded, counts, dynamic, dynamic_counts):
    """Each image's first counts[i] padded rows are the dynamic op's rows of that image, bit for bit; the rest are 0."""
    assert counts.tolist() == dynamic_counts.tolist()
    for p, d in zip(padded, dynamic):
        parts = d.split(dynamic_counts.tolist())
        for i, part in enumerate(parts):
            c = int(counts[i])
            assert torch.equal(p[i, :c], part)
            assert not p[i, c:].any()


# (padded op, dynamic op): the CPU's fused kernels padded, and the device-generic path (what CUDA runs).
RPN_PAIRS = list(zip(ops_and_twins("rpn_proposals_padded"), ops_and_twins("rpn_proposals")))
DETECTION_PAIRS = list(zip(ops_and_twins("detection_postprocess_padded"), ops_and_twins("detection_postprocess")))


@pytest.mark.parametrize("ops_pair", RPN_PAIRS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("post_nms_top_n, score_thresh", [(1000, 0.0), (300, 0.0), (6000, 0.7)])  # 6000: > 5 x 1000
@pytest.mark.parametrize("coder", [{}, RPN_CODER], ids=["default_coder", "other_coder"])
def test_rpn_proposals_padded_is_rpn_proposals(ops_pair, batch, post_nms_top_n, score_thresh, coder):
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(batch)
    args = (objectness, deltas, anchors, per_level, flat(sizes), 1000, post_nms_top_n, 0.7, score_thresh, 1e-3)
    boxes, scores, counts = getattr(E, ops_pair[0])(*args, **coder)
    assert boxes.shape == (batch, post_nms_top_n, 4) and scores.shape == (batch, post_nms_top_n)
    d_boxes, d_scores, d_counts = getattr(E, ops_pair[1])(*args, **coder)
    assert_padded_equals((boxes, scores), counts, (d_boxes, d_scores), d_counts)
    if score_thresh > 0:
        assert (counts < post_nms_top_n).all()  # padding really happens


def test_rpn_proposals_padded_without_candidates():
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(2)
    boxes, scores, counts = ops.rpn_proposals_padded(objectness, deltas, anchors, per_level, sizes, 0, 50, 0.7)
    assert boxes.shape == (2, 50, 4) and not boxes.any() and not counts.any()
    boxes, scores, counts = ops.rpn_proposals_padded(objectness, deltas, anchors, per_level, sizes, 100, 0, 0.7)
    assert boxes.shape == (2, 0, 4) and scores.shape == (2, 0) and not counts.any()
    with pytest.raises(RuntimeError, match="post_nms_top_n must be >= 0"):
        ops.rpn_proposals_padded(objectness, deltas, anchors, per_level, sizes, 100, -1, 0.7)


def extra_args(coder):
    """The arguments of a detection coder past its weights (which the detection ops take without a default)."""
    return {k: v for k, v in coder.items() if k != "weights"}


def padded_detection_inputs(proposal_counts=(1000, 700), rows=1000, classes=91):
    """detection_inputs with every image's proposals padded to `rows` by garbage rows that must be ignored."""
    class_logits, box_regression, proposals = detection_inputs((rows,) * len(proposal_counts), classes)
    real = [p[:c] for p, c in zip(proposals, proposal_counts)]
    keep = torch.cat([torch.arange(c) + i * rows for i, c in enumerate(proposal_counts)])
    dynamic = (class_logits[keep], box_regression[keep], real)
    padded = (class_logits, box_regression, torch.cat(proposals), torch.tensor(proposal_counts))
    return padded, dynamic


@pytest.mark.parametrize("ops_pair", DETECTION_PAIRS)
@pytest.mark.parametrize("proposal_counts", [(1000, 700), (0, 1000), (0, 0), (1000,)])
@pytest.mark.parametrize("score_thresh, detections", [(0.05, 100), (0.0, 300), (0.9, 50)])
@pytest.mark.parametrize("coder", [dict(weights=WEIGHTS), HEADS_CODER], ids=["default_coder", "other_coder"])
def test_detection_postprocess_padded_is_detection_postprocess(ops_pair, proposal_counts, score_thresh, detections,
                                                               coder):
    padded, (logits, regression, real) = padded_detection_inputs(proposal_counts)
    sizes = IMAGE_SIZES[:len(proposal_counts)]
    boxes, scores, labels, counts = getattr(E, ops_pair[0])(*padded, flat(sizes), coder["weights"], score_thresh,
                                                           0.5, detections, 0.01, **extra_args(coder))
    assert boxes.shape == (len(sizes), detections, 4) and labels.shape == (len(sizes), detections)
    d = getattr(E, ops_pair[1])(logits, regression, torch.cat(real), [len(p) for p in real], flat(sizes),
                                coder["weights"], score_thresh, 0.5, detections, 0.01, **extra_args(coder))
    assert_padded_equals((boxes, scores, labels), counts, d[:3], d[3])
    if score_thresh > 0.5:
        assert (counts < detections).all()


def test_generic_padded_ops_equal_the_cpu_kernels():
    """The two padded paths agree (up to the order of tied scores, which no test input here has)."""
    padded, _ = padded_detection_inputs((1000, 700))
    args = (*padded, flat(IMAGE_SIZES), WEIGHTS, 0.05, 0.5, 100, 0.01)
    cpu, generic = E.detection_postprocess_padded(*args), E._detection_postprocess_padded_generic(*args)
    assert torch.equal(cpu[3], generic[3]) and torch.equal(cpu[2], generic[2])
    torch.testing.assert_close(cpu[:2], generic[:2], rtol=1e-5, atol=1e-4)


def test_detection_postprocess_padded_edges_and_bad_input():
    padded, _ = padded_detection_inputs((10, 5), rows=10, classes=1)  # background only: no detection
    out = ops.detection_postprocess_padded(*padded, IMAGE_SIZES, detections_per_img=7)
    assert out[0].shape == (2, 7, 4) and not out[3].any()
    padded, _ = padded_detection_inputs((10, 5), rows=10, classes=5)
    out = ops.detection_postprocess_padded(*padded, IMAGE_SIZES, score_thresh=0.0, detections_per_img=0)
    assert out[0].shape == (2, 0, 4) and not out[3].any()
    logits, regression, proposals, counts = padded
    with pytest.raises(RuntimeError, match=r"proposal_counts must be an int64 \[N\] tensor with N = 2"):
        ops.detection_postprocess_padded(logits, regression, proposals, counts.int(), IMAGE_SIZES)
    with pytest.raises(RuntimeError, match=r"must be \[N \* P, 4\] for N = 2 images"):
        E.detection_postprocess_padded(logits[:-1], regression[:-1], proposals[:-1], counts, flat(IMAGE_SIZES),
                                       WEIGHTS, 0.05, 0.5, 100, 0.01)
    with pytest.raises(RuntimeError, match="detections_per_img must be >= 0"):
        ops.detection_postprocess_padded(logits, regression, proposals, counts, IMAGE_SIZES, detections_per_img=-1)
    with pytest.raises(RuntimeError, match=r"proposal_counts\[1\] = 11 is outside \[0, 10\]"):
        ops.detection_postprocess_padded(logits, regression, proposals, torch.tensor([3, 11]), IMAGE_SIZES)
    # the generic (CUDA) path does not read the counts on the host: out-of-range counts act as clamped
    clamped = E._detection_postprocess_padded_generic(logits, regression, proposals, torch.tensor([-3, 11]),
                                                      flat(IMAGE_SIZES), WEIGHTS, 0.0, 0.5, 100, 0.01)
    expected = E._detection_postprocess_padded_generic(logits, regression, proposals, torch.tensor([0, 10]),
                                                       flat(IMAGE_SIZES), WEIGHTS, 0.0, 0.5, 100, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(clamped, expected))


def test_opcheck():
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(1)
    small = objectness[:, :4000], deltas[:, :4000], anchors[:4000]
    padded, _ = padded_detection_inputs((50, 30), rows=50, classes=5)
    for name in ops_and_twins("rpn_proposals_padded"):
        op = getattr(torch.ops.fasterrcnn_ext, name).default
        torch.library.opcheck(op, (*small, [4000], flat(sizes), 300, 100, 0.7, 0.0, 1e-3))
        torch.library.opcheck(op, (*small, [4000], flat(sizes), 300, 100, 0.7, 0.0, 1e-3), RPN_CODER)
    for name in ops_and_twins("detection_postprocess_padded"):
        op = getattr(torch.ops.fasterrcnn_ext, name).default
        torch.library.opcheck(op, (*padded, flat(IMAGE_SIZES), WEIGHTS, 0.05, 0.5, 100, 0.01))
        torch.library.opcheck(op, (*padded, flat(IMAGE_SIZES), HEADS_CODER["weights"], 0.05, 0.5, 100),
                              extra_args(HEADS_CODER))


def test_padded_ops_trace_with_static_shapes():
    """The fake kernels give static sizes: torch.compile traces both ops in one graph without unbacked sizes."""
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(1)
    small = objectness[:, :4000], deltas[:, :4000], anchors[:4000]
    padded, _ = padded_detection_inputs((50,), rows=50, classes=5)

    def both(o, d, a, logits, regression, proposals, counts):
        boxes, scores, n = ops.rpn_proposals_padded(o, d, a, [4000], sizes, 300, 100, 0.7)
        det = ops.detection_postprocess_padded(logits, regression, proposals, counts, sizes)
        return boxes, scores, n, *det

    eager = both(*small, *padded)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False, capture_scalar_outputs=False):
        compiled = torch.compile(both, fullgraph=True, backend="eager")(*small, *padded)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
