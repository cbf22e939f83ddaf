"""The fused post-processing ops against torchvision's RegionProposalNetwork and RoIHeads, on real-sized inputs."""

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext.ops._registration import ops_and_twins
from fasterrcnn_ext.ops.constants import BBOX_XFORM_CLIP

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5
IMAGE_SIZES = [(750, 1333), (768, 1100)]  # batched and padded to 768x1344: 257,796 anchors


def rpn_inputs(batch, dtype=torch.float32, device="cpu"):
    images = ImageList(torch.zeros(batch, 3, 768, 1344), IMAGE_SIZES[:batch])
    feats = [torch.zeros(batch, 1, 768 // s, 1344 // s) for s in (4, 8, 16, 32)] + [torch.zeros(batch, 1, 12, 21)]
    anchors = AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)[0]
    per_level = [f.shape[-2] * f.shape[-1] * 3 for f in feats]
    a = anchors.shape[0]
    objectness = torch.randn(batch, a) * 2
    deltas = torch.randn(batch, a, 4) * 0.3
    return (objectness.to(device, dtype), deltas.to(device, dtype), anchors.to(device, dtype), per_level,
            IMAGE_SIZES[:batch])


def torchvision_rpn(pre_nms_top_n=1000, post_nms_top_n=1000, nms_thresh=0.7, score_thresh=0.0):
    rpn = RegionProposalNetwork(AnchorGenerator(FPN_SIZES, FPN_RATIOS), RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
                                dict(training=pre_nms_top_n, testing=pre_nms_top_n),
                                dict(training=post_nms_top_n, testing=post_nms_top_n), nms_thresh, score_thresh)
    return rpn.eval()


def canonical(boxes, scores, *extra):
    """Rows by decreasing score, tied scores by coordinates: tied scores may come in either order."""
    order = torch.arange(len(scores))
    for column in (3, 2, 1, 0):
        order = order[torch.sort(boxes[order, column].double(), stable=True).indices]
    order = order[torch.sort(scores[order].double(), descending=True, stable=True).indices]
    return (boxes[order], scores[order], *(e[order] for e in extra))


def assert_same_proposals(ours, theirs):
    for (b, s), (tb, ts) in zip(zip(*ours), zip(*theirs)):
        assert b.shape == tb.shape, (b.shape, tb.shape)
        b, s = canonical(b, s)
        tb, ts = canonical(tb, ts)
        torch.testing.assert_close(s, ts, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, tb, rtol=1e-5, atol=1e-3)


def reference_proposals(objectness, deltas, anchors, per_level, image_sizes, coder=None, **kw):
    """torchvision's RPN selection, decoding with ``coder`` (a BoxCoder; the RPN's own by default)."""
    rpn = torchvision_rpn(**kw)
    rpn.box_coder = coder or rpn.box_coder
    n = objectness.shape[0]
    proposals = rpn.box_coder.decode(deltas.reshape(-1, 4)[None].reshape(n, -1, 4).detach(), [anchors] * n)
    return rpn.filter_proposals(proposals.view(n, -1, 4), objectness, image_sizes, per_level)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("op", ops_and_twins("rpn_proposals"))
def test_rpn_proposals_match_torchvision(batch, op):
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(batch)
    theirs = reference_proposals(objectness, deltas, anchors, per_level, sizes)
    boxes, scores, counts = getattr(torch.ops.fasterrcnn_ext, op)(
        objectness, deltas, anchors, per_level, [v for hw in sizes for v in hw], 1000, 1000, 0.7, 0.0, 1e-3)
    assert counts.tolist() == [len(b) for b in theirs[0]]
    assert_same_proposals((boxes.split(counts.tolist()), scores.split(counts.tolist())), theirs)


# Box coders unlike torchvision's defaults: other weights, and exp clamps that the inputs' dw and dh pass (the tests
# check that they do).
RPN_CODER = dict(weights=[2.0, 2.0, 0.5, 0.5], bbox_xform_clip=0.4)
HEADS_CODER = dict(weights=[5.0, 5.0, 2.0, 2.0], bbox_xform_clip=0.3)


@pytest.mark.parametrize("op", ops_and_twins("rpn_proposals"))
def test_rpn_proposals_decode_with_the_given_weights_and_clamp(op):
    """Against torchvision's selection with a box coder of the same weights and clamp, all in float64."""
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(2, dtype=torch.float64)
    theirs = reference_proposals(objectness, deltas, anchors, per_level, sizes, coder=BoxCoder(**RPN_CODER))
    args = (objectness, deltas, anchors, per_level, [v for hw in sizes for v in hw], 1000, 1000, 0.7, 0.0, 1e-3)
    boxes, scores, counts = getattr(torch.ops.fasterrcnn_ext, op)(*args, RPN_CODER["weights"],
                                                                  RPN_CODER["bbox_xform_clip"])
    assert counts.tolist() == [len(b) for b in theirs[0]]
    assert_same_proposals((boxes.split(counts.tolist()), scores.split(counts.tolist())), theirs)
    # The clamp matters on these inputs: the same weights with torchvision's clamp select other boxes.
    unclamped = reference_proposals(objectness, deltas, anchors, per_level, sizes,
                                    coder=BoxCoder(RPN_CODER["weights"]))
    with pytest.raises(AssertionError):
        assert_same_proposals((boxes.split(counts.tolist()), scores.split(counts.tolist())), unclamped)
    # The wrapper takes them by name (without them: torchvision's RPN coder, test_rpn_proposals_match_torchvision).
    wrapped = ops.rpn_proposals(objectness, deltas, anchors, per_level, sizes, 1000, 1000, 0.7, **RPN_CODER)
    assert_same_proposals(wrapped, theirs)


def test_the_decoding_defaults_are_torchvisions():
    """The schemas' defaults of the decoding arguments are ops/constants.py's clamp and the RPN's unit weights."""
    names = [name for public in ("rpn_proposals", "rpn_proposals_padded", "detection_postprocess",
                                 "detection_postprocess_padded") for name in ops_and_twins(public)]
    assert len(names) == 8
    for name in names:
        schema = getattr(torch.ops.fasterrcnn_ext, name).default._schema
        defaults = {a.name: a.default_value for a in schema.arguments}
        assert defaults["bbox_xform_clip"] == BBOX_XFORM_CLIP, name
        assert schema.arguments[-1].name == "bbox_xform_clip", name
        if "rpn" in name:
            assert defaults["weights"] == [1.0, 1.0, 1.0, 1.0], name


def test_rpn_proposals_training_sizes_and_score_thresh():
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(2)
    kw = dict(pre_nms_top_n=2000, post_nms_top_n=300, nms_thresh=0.6, score_thresh=0.6)
    theirs = reference_proposals(objectness, deltas, anchors, per_level, sizes, **kw)
    ours = ops.rpn_proposals(objectness, deltas, anchors, per_level, sizes, 2000, 300, 0.6, 0.6)
    assert_same_proposals(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_rpn_proposals_dtypes(dtype):
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(1, dtype=dtype)
    boxes, scores = ops.rpn_proposals(objectness, deltas, anchors, per_level, sizes, 500, 300, 0.7)
    assert boxes[0].dtype == dtype and scores[0].dtype == dtype
    assert 0 < len(boxes[0]) <= 300
    if dtype == torch.float64:
        theirs = reference_proposals(objectness, deltas, anchors, per_level, sizes, pre_nms_top_n=500,
                                     post_nms_top_n=300)
        assert_same_proposals((boxes, scores), theirs)


def test_rpn_proposals_nan_inputs_are_dropped():
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(1)
    objectness[0, ::3] = float("nan")
    deltas[0, 1::7, 2] = float("nan")
    deltas[0, 2::11, 0] = float("inf")
    boxes, scores = ops.rpn_proposals(objectness, deltas, anchors, per_level, sizes, 1000, 1000, 0.7)
    assert len(boxes[0]) > 0
    assert torch.isfinite(boxes[0]).all() and torch.isfinite(scores[0]).all()
    generic = torch.ops.fasterrcnn_ext._rpn_proposals_generic(objectness, deltas, anchors, per_level,
                                                              [v for hw in sizes for v in hw], 1000, 1000, 0.7, 0.0,
                                                              1e-3)
    torch.testing.assert_close(canonical(generic[0], generic[1])[0], canonical(boxes[0], scores[0])[0],
                               rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1234, 2000, 4500])  # the k-th value: among the 1.5s, the zeros, the -inf and NaNs
def test_rpn_top_k_ties_nan_and_signed_zeros(dtype, k):
    """The per-level top-k (a radix select on CPU) takes the k largest logits, NaN ranked as -inf, ties at the k-th
    value to the lower index; -0 ties with +0. With no NMS (threshold 1) and zero deltas, the proposals are exactly
    the selected anchors, minus those whose score fails (NaN)."""
    g = torch.Generator().manual_seed(0)
    n = 5000
    values = torch.tensor([float("-inf"), float("nan"), -0.0, 0.0, 1.5, -2.0, 3.0], dtype=dtype)
    objectness = values[torch.randint(0, len(values), (1, n), generator=g)]
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 900
    anchors = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g, dtype=dtype) * 80], 1)
    deltas = torch.zeros(1, n, 4, dtype=dtype)
    boxes, scores = ops.rpn_proposals(objectness, deltas, anchors, [n], [(1000, 1000)], k, k, 1.0)

    rank_value = torch.where(objectness[0].isnan(), float("-inf"), objectness[0]).double()
    order = torch.sort(rank_value, descending=True, stable=True).indices  # stable: ties by lower index
    chosen = order[:k]
    chosen = chosen[~objectness[0, chosen].isnan()]  # NaN scores fail the score test
    # Each proposal is its anchor up to the decode's rounding: name it by its nearest anchor.
    distance, nearest = torch.cdist(boxes[0].double(), anchors.double()).min(1)
    assert distance.max() < 1e-2
    assert torch.equal(torch.sort(nearest).values, torch.sort(chosen).values)


def test_rpn_proposals_bad_input():
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(1)
    with pytest.raises(RuntimeError, match=r"deltas must be \[N, A, 4\]"):
        ops.rpn_proposals(objectness, deltas[:, :-1], anchors, per_level, sizes, 10, 10, 0.7)
    with pytest.raises(RuntimeError, match=r"num_anchors_per_level .* sums to"):
        ops.rpn_proposals(objectness, deltas, anchors, per_level[:-1], sizes, 10, 10, 0.7)
    with pytest.raises(ValueError, match=r"rpn_proposals: image_sizes must hold one \(height, width\) per image, "
                                         r"1 images, got 2 entries"):
        ops.rpn_proposals(objectness, deltas, anchors, per_level, sizes * 2, 10, 10, 0.7)
    with pytest.raises(ValueError, match=r"image_sizes\[0\] must be a \(height, width\) pair, got \(750, 1333, 3\)"):
        ops.rpn_proposals(objectness, deltas, anchors, per_level, [(750, 1333, 3)], 10, 10, 0.7)
    with pytest.raises(RuntimeError, match=r"image_sizes must hold \(height, width\) for each of the 1 images"):
        torch.ops.fasterrcnn_ext.rpn_proposals(objectness, deltas, anchors, per_level, [750, 1333] * 2, 10, 10, 0.7,
                                               0.0, 1e-3)
    for name in (*ops_and_twins("rpn_proposals"), *ops_and_twins("rpn_proposals_padded")):
        with pytest.raises(RuntimeError, match=r"rpn_proposals: weights must have 4 values \(wx, wy, ww, wh\), got 3"):
            getattr(torch.ops.fasterrcnn_ext, name)(objectness, deltas, anchors, per_level, [750, 1333], 10, 10, 0.7,
                                                    0.0, 1e-3, [1.0, 1.0, 1.0])


def detection_inputs(boxes_per_image=(1000, 700), classes=91, dtype=torch.float32):
    k = sum(boxes_per_image)
    xy = torch.rand(k, 2) * torch.tensor([1200.0, 700.0])
    proposals = torch.cat([xy, xy + torch.rand(k, 2) * 300 + 4], 1)
    class_logits = torch.randn(k, classes) * 3
    box_regression = torch.randn(k, 4 * classes)
    return class_logits.to(dtype), box_regression.to(dtype), list(proposals.to(dtype).split(list(boxes_per_image)))


def torchvision_postprocess(class_logits, box_regression, proposals, image_sizes, score_thresh=0.05, nms_thresh=0.5,
                            detections_per_img=100, coder=None):
    """torchvision's RoIHeads.postprocess_detections, decoding with ``coder`` (a BoxCoder; the heads' own by
    default)."""
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh, nms_thresh, detections_per_img)
    heads.box_coder = coder or heads.box_coder
    return heads.postprocess_detections(class_logits, box_regression, proposals, image_sizes)


def assert_same_detections(ours, theirs, **tolerance):
    for b, s, lab, tb, ts, tl in zip(*ours, *theirs):
        b, s, lab = canonical(b, s, lab)
        tb, ts, tl = canonical(tb, ts, tl)
        torch.testing.assert_close(lab, tl)
        torch.testing.assert_close(s, ts, **tolerance)
        torch.testing.assert_close(b, tb, **tolerance)


@pytest.mark.parametrize("op", ops_and_twins("detection_postprocess"))
@pytest.mark.parametrize("score_thresh, detections", [(0.05, 100), (0.3, 20), (0.0, 300)])
def test_detection_postprocess_matches_torchvision(op, score_thresh, detections):
    class_logits, box_regression, proposals = detection_inputs()
    sizes = IMAGE_SIZES
    theirs = torchvision_postprocess(class_logits, box_regression, proposals, sizes, score_thresh, 0.5, detections)
    boxes, scores, labels, counts = getattr(torch.ops.fasterrcnn_ext, op)(
        class_logits, box_regression, torch.cat(proposals), [len(p) for p in proposals],
        [v for hw in sizes for v in hw], [10.0, 10.0, 5.0, 5.0], score_thresh, 0.5, detections, 0.01)
    assert counts.tolist() == [len(b) for b in theirs[0]]
    sizes_ = counts.tolist()
    assert_same_detections((boxes.split(sizes_), scores.split(sizes_), labels.split(sizes_)), theirs, rtol=1e-5,
                           atol=1e-3)


@pytest.mark.parametrize("op", ops_and_twins("detection_postprocess"))
def test_detection_postprocess_decodes_with_the_given_clamp(op):
    """Against torchvision's RoIHeads with a box coder of other weights and clamp, all in float64."""
    class_logits, box_regression, proposals = detection_inputs(dtype=torch.float64)
    theirs = torchvision_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES, 0.0, 0.5, 300,
                                     coder=BoxCoder(**HEADS_CODER))
    boxes, scores, labels, counts = getattr(torch.ops.fasterrcnn_ext, op)(
        class_logits, box_regression, torch.cat(proposals), [len(p) for p in proposals],
        [v for hw in IMAGE_SIZES for v in hw], HEADS_CODER["weights"], 0.0, 0.5, 300, 0.01,
        HEADS_CODER["bbox_xform_clip"])
    assert counts.tolist() == [len(b) for b in theirs[0]]
    sizes = counts.tolist()
    ours = (boxes.split(sizes), scores.split(sizes), labels.split(sizes))
    assert_same_detections(ours, theirs, rtol=1e-10, atol=1e-8)
    assert_same_detections(ops.detection_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES,
                                                     score_thresh=0.0, detections_per_img=300, **HEADS_CODER),
                           theirs, rtol=1e-10, atol=1e-8)
    # The clamp matters on these inputs: the same weights with torchvision's clamp give other boxes.
    unclamped = torchvision_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES, 0.0, 0.5, 300,
                                        coder=BoxCoder(HEADS_CODER["weights"]))
    with pytest.raises(AssertionError):
        assert_same_detections(ours, unclamped, rtol=1e-10, atol=1e-8)


def test_detection_postprocess_empty_image_and_nan():
    class_logits, box_regression, proposals = detection_inputs((300, 0))
    class_logits[::5] = float("nan")
    box_regression[1::5] = float("nan")
    boxes, scores, labels = ops.detection_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES)
    assert len(boxes[1]) == 0 and boxes[1].shape == (0, 4)
    assert torch.isfinite(boxes[0]).all() and torch.isfinite(scores[0]).all()
    assert (labels[0] >= 1).all()


def test_detection_postprocess_bad_input():
    class_logits, box_regression, proposals = detection_inputs((10, 5))
    with pytest.raises(RuntimeError, match=r"box_regression must be \[K, 4 \* C\]"):
        ops.detection_postprocess(class_logits, box_regression[:, :-4], proposals, IMAGE_SIZES)
    with pytest.raises(RuntimeError, match=r"weights must have 4 values"):
        ops.detection_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES, weights=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"detection_postprocess: image_sizes must hold one \(height, width\) per "
                                         r"image, 2 images, got 3 entries"):
        ops.detection_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES + [(10, 10)])
    with pytest.raises(ValueError, match=r"image_sizes must hold one \(height, width\) per image, 2 images, got 1"):
        ops.detection_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES[:1])


def test_opcheck():
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(1)
    flat = [v for hw in sizes for v in hw]
    small = objectness[:, :4000], deltas[:, :4000], anchors[:4000]
    class_logits, box_regression, proposals = detection_inputs((50, 30), classes=5)
    for name in ops_and_twins("rpn_proposals"):
        op = getattr(torch.ops.fasterrcnn_ext, name).default
        torch.library.opcheck(op, (*small, [4000], flat, 300, 100, 0.7, 0.0, 1e-3))
        torch.library.opcheck(op, (*small, [4000], flat, 300, 100, 0.7, 0.0, 1e-3), RPN_CODER)
    for name in ops_and_twins("detection_postprocess"):
        op = getattr(torch.ops.fasterrcnn_ext, name).default
        args = (class_logits, box_regression, torch.cat(proposals), [50, 30], [v for hw in IMAGE_SIZES for v in hw])
        torch.library.opcheck(op, (*args, [10.0, 10.0, 5.0, 5.0], 0.05, 0.5, 100, 0.01))
        torch.library.opcheck(op, (*args, HEADS_CODER["weights"], 0.05, 0.5, 100),
                              dict(bbox_xform_clip=HEADS_CODER["bbox_xform_clip"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_detection_postprocess_dtypes(dtype):
    class_logits, box_regression, proposals = detection_inputs((400, 300), dtype=dtype)
    boxes, scores, labels = ops.detection_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES)
    assert boxes[0].dtype == dtype and scores[0].dtype == dtype and labels[0].dtype == torch.int64
    if dtype == torch.float64:
        theirs = torchvision_postprocess(class_logits, box_regression, proposals, IMAGE_SIZES)
        for b, s, lab, tb, ts, tl in zip(boxes, scores, labels, *theirs):
            b, s, lab = canonical(b, s, lab)
            tb, ts, tl = canonical(tb, ts, tl)
            torch.testing.assert_close((b, s, lab), (tb, ts, tl))
    else:  # half types compute in float32: the float32 result of the same (rounded) inputs, rounded
        ref = ops.detection_postprocess(class_logits.float(), box_regression.float(), [p.float() for p in proposals],
                                        IMAGE_SIZES)
        for b, rb in zip(boxes, ref[0]):
            assert b.shape == rb.shape


def test_split_per_image():
    counts = torch.tensor([3, 0, 2])
    boxes, scores = torch.rand(5, 4), torch.rand(5)
    parts = torch.ops.fasterrcnn_ext.split_per_image([boxes, scores], counts)
    assert [p.shape for p in parts] == [(3, 4), (0, 4), (2, 4), (3,), (0,), (2,)]
    torch.testing.assert_close(torch.cat(parts[:3]), boxes)
    torch.testing.assert_close(torch.cat(parts[3:]), scores)
    assert parts[0].data_ptr() != boxes.data_ptr()  # copies, not views (the schema promises no aliasing)
    torch.library.opcheck(torch.ops.fasterrcnn_ext.split_per_image.default, ([boxes, scores], counts))
    with pytest.raises(RuntimeError, match=r"values\[1\] must have sum\(counts\) = 5 rows, got shape \[4\]"):
        torch.ops.fasterrcnn_ext.split_per_image([boxes, scores[:4]], counts)
    with pytest.raises(RuntimeError, match=r"counts\[1\] = -1 is negative"):
        torch.ops.fasterrcnn_ext.split_per_image([boxes], torch.tensor([3, -1, 3]))
    with pytest.raises(RuntimeError, match="counts must be a 1-D int64 tensor"):
        torch.ops.fasterrcnn_ext.split_per_image([boxes], counts.float())


def test_post_processing_compiles_without_a_graph_break():
    """torch.compile(fullgraph=True): the per-image split is one op whose fake kernel gives unbacked sizes."""
    objectness, deltas, anchors, per_level, sizes = rpn_inputs(2)
    args = (objectness, deltas, anchors, per_level, sizes, 1000, 300, 0.7)
    compiled = torch.compile(ops.rpn_proposals, fullgraph=True, backend="eager")
    for got, expected in zip(compiled(*args), ops.rpn_proposals(*args)):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
    class_logits, box_regression, proposals = detection_inputs()
    args = (class_logits, box_regression, proposals, IMAGE_SIZES)
    compiled = torch.compile(ops.detection_postprocess, fullgraph=True, backend="eager")
    for got, expected in zip(compiled(*args), ops.detection_postprocess(*args)):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
