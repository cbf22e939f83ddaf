import pytest
import torch
import torchvision

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext.benchmark.inputs import distinct_scores, random_boxes, rpn_like_boxes
from tests import reference

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("iou_threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("make_boxes", [random_boxes, rpn_like_boxes])
def test_nms_matches_torchvision(device, dtype, iou_threshold, make_boxes):
    boxes = make_boxes(1500, dtype=dtype, device=device)
    scores = distinct_scores(1500, dtype=dtype, device=device)
    ours = ops.nms(boxes, scores, iou_threshold)
    theirs = torchvision.ops.nms(boxes, scores, iou_threshold)
    assert ours.dtype == torch.int64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_nms_boundary_iou(device):
    # Integer boxes whose IoU lands exactly on common thresholds: 1/3, 1/2, 2/3, ...
    base = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    shifts = torch.arange(0, 11, dtype=torch.float32)
    others = torch.stack([shifts, torch.zeros(11), shifts + 10, torch.full((11,), 10.0)], dim=1)
    boxes = torch.cat([base, others]).to(device)
    scores = torch.linspace(1.0, 0.0, len(boxes), device=device)
    for thr in [0.0, 1 / 3, 0.5, 2 / 3, 0.7, 0.8181818181818182, 1.0]:
        # IoU > threshold compared exactly on every device, as torchvision's CPU kernel does (its CUDA kernel rounds
        # the threshold to float first, which differs only for IoUs that land on the threshold).
        expected = torchvision.ops.nms(boxes.cpu(), scores.cpu(), thr)
        torch.testing.assert_close(ops.nms(boxes, scores, thr).cpu(), expected)
        # IoU exactly at the threshold is not suppressed: suppression needs IoU > threshold.
        assert 1 in ops.nms(boxes[:2], scores[:2], 1.0).tolist()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nms_every_dtype_matches_float32_iou(device, dtype):
    """Half types compute the IoU in float32: same result as float32 NMS on the up-cast values."""
    boxes = rpn_like_boxes(800, dtype=dtype, device=device)
    scores = torch.rand(800, device=device).to(dtype)  # half types have ties: the documented tie order applies
    ours = ops.nms(boxes, scores, 0.6)
    expected = reference.nms(boxes.cpu(), scores.cpu(), 0.6)
    torch.testing.assert_close(ours.cpu(), expected, rtol=0, atol=0)


def test_nms_ties_keep_lower_index_first(device):
    boxes = random_boxes(300, device=device)
    scores = torch.full((300,), 0.5, device=device)
    scores[::7] = 0.9
    keep = ops.nms(boxes, scores, 0.5)
    torch.testing.assert_close(keep.cpu(), reference.nms(boxes.cpu(), scores.cpu(), 0.5))
    # Within a score level the kept indices increase.
    s = scores[keep].cpu()
    k = keep.cpu()
    for level in (0.9, 0.5):
        sel = k[s == level]
        assert torch.all(sel[1:] > sel[:-1])


@pytest.mark.parametrize("max_keep", [0, 1, 5, 100, 10_000])
def test_nms_max_keep_is_prefix(device, max_keep):
    boxes = rpn_like_boxes(3000, device=device)
    scores = distinct_scores(3000, device=device)
    full = ops.nms(boxes, scores, 0.7)
    torch.testing.assert_close(ops.nms(boxes, scores, 0.7, max_keep=max_keep), full[:max_keep])


def test_nms_empty(device):
    for dtype in FLOAT_DTYPES:
        keep = ops.nms(torch.empty(0, 4, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device), 0.5)
        assert keep.shape == (0,) and keep.dtype == torch.int64 and keep.device.type == device


def test_nms_non_contiguous(device):
    boxes = rpn_like_boxes(1000, device=device)
    column_major = boxes.t().contiguous().t()
    scores = distinct_scores(2000, device=device)[::2]
    assert not column_major.is_contiguous() and not scores.is_contiguous()
    torch.testing.assert_close(ops.nms(column_major, scores, 0.5), torchvision.ops.nms(boxes, scores.contiguous(), 0.5))


def test_nms_nan_and_inf_give_valid_result(device):
    boxes = rpn_like_boxes(500, device=device)
    scores = distinct_scores(500, device=device)
    boxes[3, 0] = float("nan")
    boxes[10] = float("inf")
    boxes[11, 2:] = float("-inf")
    scores[[5, 20, 40]] = float("nan")
    scores[7] = float("inf")
    scores[8] = float("-inf")
    keep = ops.nms(boxes, scores, 0.5).cpu()
    assert keep.unique().numel() == keep.numel()
    assert keep.min() >= 0 and keep.max() < 500
    # Documented: NaN scores rank last; a NaN box never suppresses and is never suppressed.
    nan_positions = [i for i, k in enumerate(keep.tolist()) if k in (5, 20, 40)]
    assert nan_positions == list(range(len(keep) - len(nan_positions), len(keep)))
    assert 3 in keep.tolist()
    assert keep[0] == 7
    torch.testing.assert_close(keep, reference.nms(boxes.cpu(), scores.cpu(), 0.5))


def test_nms_large_coordinates_and_many_boxes():
    """1,000,000 boxes: int64 sizes throughout; the early exit keeps it quick."""
    n = 1_000_000
    boxes = rpn_like_boxes(n, num_clusters=2000, image_size=1e5)
    scores = distinct_scores(n)
    keep = ops.nms(boxes, scores, 0.5, max_keep=50)
    torch.testing.assert_close(keep, reference.nms(boxes, scores, 0.5, max_keep=50))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes", [1, 5, 80])
def test_batched_nms_matches_torchvision(device, dtype, num_classes):
    boxes = rpn_like_boxes(2000, dtype=dtype, device=device)
    scores = distinct_scores(2000, dtype=dtype, device=device)
    idxs = torch.randint(0, num_classes, (2000,), device=device)
    torch.testing.assert_close(ops.batched_nms(boxes, scores, idxs, 0.5),
                               torchvision.ops.batched_nms(boxes, scores, idxs, 0.5), rtol=0, atol=0)


def test_batched_nms_is_class_aware_without_offsets(device):
    """Huge coordinates: torchvision's offset trick loses precision here; ours compares classes exactly."""
    boxes = rpn_like_boxes(600, device=device, dtype=torch.float64) + 1e7
    scores = distinct_scores(600, dtype=torch.float64, device=device)
    idxs = torch.randint(-3, 3, (600,), device=device)  # negative class ids are fine
    keep = ops.batched_nms(boxes, scores, idxs, 0.5)
    torch.testing.assert_close(keep.cpu(), reference.nms(boxes.cpu(), scores.cpu(), 0.5, idxs=idxs.cpu()))


@pytest.mark.parametrize("class_values", [[0, 1, 2], [-2**63, -5, 0, 2**63 - 1], [10**6, 3 * 10**6, 7]])
def test_batched_nms_any_class_values(device, class_values):
    """Class ids are grouped by a counting sort when they span a small range, else by a stable comparison sort
    (CPU); ids spanning all of int64 and sparse ids must group exactly like dense ones. Half the scores are tied."""
    boxes = rpn_like_boxes(900, dtype=torch.float64, device=device)
    scores = (torch.randint(0, 400, (900,)).to(torch.float64) / 400).to(device)
    values = torch.tensor(class_values, dtype=torch.long)
    idxs = values[torch.randint(0, len(class_values), (900,))].to(device)
    keep = ops.batched_nms(boxes, scores, idxs, 0.5)
    dense = torch.unique(idxs, return_inverse=True)[1]
    torch.testing.assert_close(keep, ops.batched_nms(boxes, scores, dense, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(keep.cpu(), reference.nms(boxes.cpu(), scores.cpu(), 0.5, idxs=idxs.cpu()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_batched_nms_every_dtype(device, dtype):
    boxes = rpn_like_boxes(700, dtype=dtype, device=device)
    scores = torch.rand(700, device=device).to(dtype)
    idxs = torch.randint(0, 4, (700,), device=device, dtype=torch.int32)
    keep = ops.batched_nms(boxes, scores, idxs, 0.6)
    torch.testing.assert_close(keep.cpu(), reference.nms(boxes.cpu(), scores.cpu(), 0.6, idxs=idxs.cpu().long()))


@pytest.mark.parametrize("max_keep", [0, 1, 7, 300])
def test_batched_nms_max_keep_is_prefix(device, max_keep):
    boxes = rpn_like_boxes(2000, device=device)
    scores = distinct_scores(2000, device=device)
    idxs = torch.randint(0, 5, (2000,), device=device)
    full = ops.batched_nms(boxes, scores, idxs, 0.7)
    torch.testing.assert_close(ops.batched_nms(boxes, scores, idxs, 0.7, max_keep=max_keep), full[:max_keep])


def test_batched_nms_empty(device):
    keep = ops.batched_nms(torch.empty(0, 4, device=device), torch.empty(0, device=device),
                           torch.empty(0, dtype=torch.long, device=device), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.int64


@pytest.mark.parametrize(
    "boxes, scores, idxs, message",
    [
        (torch.rand(5, 3), torch.rand(5), None, r"boxes must be a \[N, 4\] tensor, got shape \[5, 3\]"),
        (torch.rand(5, 4), torch.rand(5, 1), None, r"scores must be a \[N\] tensor, got shape \[5, 1\]"),
        (torch.rand(5, 4), torch.rand(6), None, r"same length, got 5 boxes and 6 scores"),
        (torch.rand(5, 4), torch.rand(5).double(), None, r"same dtype, got Float and Double"),
        (torch.randint(0, 9, (5, 4)), torch.rand(5), None, r"boxes must be a floating-point tensor"),
        (torch.rand(5, 4), torch.rand(5), torch.zeros(4, dtype=torch.long), r"same length, got 4 idxs and 5 boxes"),
        (torch.rand(5, 4), torch.rand(5), torch.zeros(5), r"idxs must be an integer tensor"),
    ],
)
def test_bad_input_names_the_argument(device, boxes, scores, idxs, message):
    # On CUDA this also checks that a failed check raises (its message is built without iostreams: checks.h).
    boxes, scores = boxes.to(device), scores.to(device)
    idxs = idxs.to(device) if idxs is not None else None
    with pytest.raises(RuntimeError, match=message):
        if idxs is None:
            ops.nms(boxes, scores, 0.5)
        else:
            ops.batched_nms(boxes, scores, idxs, 0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cpu_and_cuda_agree():
    boxes = rpn_like_boxes(20_000)
    scores = torch.rand(20_000)
    idxs = torch.randint(0, 80, (20_000,))
    torch.testing.assert_close(ops.nms(boxes.cuda(), scores.cuda(), 0.7).cpu(), ops.nms(boxes, scores, 0.7))
    torch.testing.assert_close(ops.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu(),
                               ops.batched_nms(boxes, scores, idxs, 0.5))


def test_opcheck(device):
    boxes = rpn_like_boxes(300, device=device)
    scores = distinct_scores(300, device=device)
    idxs = torch.randint(0, 3, (300,), device=device)
    torch.library.opcheck(torch.ops.fasterrcnn_ext.nms.default, (boxes, scores, 0.5))
    torch.library.opcheck(torch.ops.fasterrcnn_ext.nms.default, (boxes, scores, 0.5), {"max_keep": 10})
    torch.library.opcheck(torch.ops.fasterrcnn_ext.batched_nms.default, (boxes, scores, idxs, 0.5))
    torch.library.opcheck(torch.ops.fasterrcnn_ext.batched_nms_keep_mask.default, (boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_batched_nms_keep_mask_is_batched_nms_in_input_order(device, dtype):
    n = 2000
    boxes = rpn_like_boxes(n, dtype=dtype, device=device)
    scores = torch.rand(n, device=device).to(dtype)  # ties among half-precision scores too
    scores[::97] = float("nan")
    idxs = torch.randint(0, 7, (n,), device=device)
    mask = ops.batched_nms_keep_mask(boxes, scores, idxs, 0.6)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    expected = torch.zeros(n, dtype=torch.bool, device=device)
    expected[ops.batched_nms(boxes, scores, idxs, 0.6)] = True
    assert torch.equal(mask, expected)
    assert 0 < int(mask.sum()) < n
    empty = ops.batched_nms_keep_mask(boxes[:0], scores[:0], idxs[:0], 0.6)
    assert empty.shape == (0,) and empty.dtype == torch.bool
    with pytest.raises(RuntimeError, match="idxs"):
        ops.batched_nms_keep_mask(boxes, scores, idxs[:-1], 0.6)


def test_interchangeable_with_torchvision_schema():
    """Positional arguments in torchvision's order work for both ops."""
    boxes, scores = rpn_like_boxes(200), distinct_scores(200)
    torch.testing.assert_close(torch.ops.fasterrcnn_ext.nms(boxes, scores, 0.5),
                               torch.ops.torchvision.nms(boxes, scores, 0.5))


# _nms_bitmask: the CUDA NMS algorithm (csrc/ops/common/nms_bitmask.h); on the CPU its steps run serially, so these
# tests check the CUDA kernel's order keys, mask layout, chunking, class skipping and early exit on any machine.
def bitmask_nms(boxes, scores, iou_threshold, idxs=None, max_keep=-1, chunk_rows=0, valid=None):
    return torch.ops.fasterrcnn_ext._nms_bitmask(boxes, scores, idxs, iou_threshold, max_keep, chunk_rows, valid)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200, 1500])
@pytest.mark.parametrize("chunk_rows", [0, 64, 128])
@pytest.mark.parametrize("make_boxes", [random_boxes, rpn_like_boxes])
def test_nms_bitmask_matches_nms(device, n, chunk_rows, make_boxes):
    boxes = make_boxes(n)
    scores = torch.rand(n)
    for threshold in (0.0, 0.5, 0.7):
        expected = ops.nms(boxes, scores, threshold)
        got = bitmask_nms(boxes.to(device), scores.to(device), threshold, chunk_rows=chunk_rows)
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_classes", [1, 3, 80])
@pytest.mark.parametrize("chunk_rows", [0, 64])
def test_nms_bitmask_batched_matches_batched_nms(device, dtype, num_classes, chunk_rows):
    n = 900
    boxes = rpn_like_boxes(n, dtype=dtype)
    scores = torch.rand(n).to(dtype)  # half types: many ties
    idxs = torch.randint(-2, num_classes - 2, (n,))  # negative class ids too
    expected = ops.batched_nms(boxes, scores, idxs, 0.6)
    got = bitmask_nms(boxes.to(device), scores.to(device), 0.6, idxs=idxs.to(device), chunk_rows=chunk_rows)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    for max_keep in (0, 1, 33, 10_000):
        got = bitmask_nms(boxes.to(device), scores.to(device), 0.6, idxs=idxs.to(device), max_keep=max_keep,
                          chunk_rows=chunk_rows)
        torch.testing.assert_close(got.cpu(), expected[:max_keep], rtol=0, atol=0)


@pytest.mark.parametrize("max_keep", [0, 1, 63, 64, 65, 129, 10_000])
@pytest.mark.parametrize("chunk_rows", [0, 64])
def test_nms_bitmask_early_exit_is_prefix(device, max_keep, chunk_rows):
    boxes = random_boxes(700, image_size=2000.0)  # sparse: most boxes kept, so max_keep cuts mid-block and mid-chunk
    scores = torch.rand(700)
    expected = ops.nms(boxes, scores, 0.5)
    got = bitmask_nms(boxes.to(device), scores.to(device), 0.5, max_keep=max_keep, chunk_rows=chunk_rows)
    torch.testing.assert_close(got.cpu(), expected[:max_keep], rtol=0, atol=0)


def test_nms_bitmask_score_order_keys(device):
    """Every score the order keys must place: ties, -0 and +0, infinities, NaN, subnormals, in all dtypes."""
    special = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 0.5, 0.5, 3e38, -3e38]
    n = 400
    boxes = random_boxes(n, image_size=600.0)
    base = torch.tensor(special, dtype=torch.float64)
    for dtype in FLOAT_DTYPES:
        scores = base[torch.randint(0, len(special), (n,))].to(dtype)
        expected = ops.nms(boxes.to(dtype), scores, 0.4)
        got = bitmask_nms(boxes.to(dtype=dtype, device=device), scores.to(device), 0.4, chunk_rows=64)
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
        # With no overlaps at all, the result is the order itself: the keys give nms's full sort order.
        apart = torch.arange(n, dtype=torch.float64)[:, None] * 10 + torch.tensor([0.0, 0.0, 1.0, 1.0])
        got = bitmask_nms(apart.to(dtype=dtype, device=device), scores.to(device), 0.5)
        torch.testing.assert_close(got.cpu(), ops.nms(apart.to(dtype), scores, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_bitmask_batched_class_key_buckets(device, dtype):
    """batched NMS sorts once by a 64-bit (class, score) key whose class half is clamped to int32 (float scores; double
    scores take two sorts): classes past int32 share a bucket yet are still told apart, and the skip of column blocks
    past a block's last class stays right (here with classes far apart, clustered and interleaved)."""
    n = 700
    boxes = rpn_like_boxes(n, dtype=dtype)
    scores = torch.rand(n, dtype=dtype)
    big = 2**40
    for idxs in (torch.randint(-3, 3, (n,)) * big,  # every class outside int32 but 0
                 torch.randint(0, 5, (n,)) + 2**31 - 3,  # straddling INT32_MAX
                 torch.randint(0, 7, (n,)) - 2**31 - 2,  # straddling INT32_MIN
                 torch.full((n,), -big)):
        # torchvision's per-class loop: its coordinate trick would lose precision with such class ids.
        expected = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, idxs, 0.5)
        for chunk_rows, max_keep in ((0, -1), (64, -1), (64, 40)):
            got = bitmask_nms(boxes.to(device), scores.to(device), 0.5, idxs=idxs.to(device), max_keep=max_keep,
                              chunk_rows=chunk_rows)
            want = expected if max_keep < 0 else expected[:max_keep]
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_nms_bitmask_stops_building_masks_once_enough_are_kept(device):
    """max_keep reached in the first chunk: the later chunks' masks are skipped on the device and the result is the
    prefix (sparse boxes, so nearly every box is kept)."""
    boxes = random_boxes(2000, image_size=20000.0)
    scores = torch.rand(2000)
    expected = ops.nms(boxes, scores, 0.5)
    for max_keep in (10, 64, 65):
        got = bitmask_nms(boxes.to(device), scores.to(device), 0.5, max_keep=max_keep, chunk_rows=64)
        torch.testing.assert_close(got.cpu(), expected[:max_keep], rtol=0, atol=0)


def test_nms_bitmask_nan_inf_and_degenerate_boxes(device):
    boxes = rpn_like_boxes(300)
    boxes[3, 0] = float("nan")
    boxes[10] = float("inf")
    boxes[11, 2:] = float("-inf")
    boxes[20:30] = boxes[20:21]  # identical boxes: IoU exactly 1
    boxes[40, 2:] = boxes[40, :2]  # zero area
    boxes[50] = 1e30 * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    scores = torch.rand(300)
    for threshold in (0.5, 1.0):
        torch.testing.assert_close(bitmask_nms(boxes.to(device), scores.to(device), threshold, chunk_rows=64).cpu(),
                                   ops.nms(boxes, scores, threshold), rtol=0, atol=0)


def test_nms_bitmask_bad_chunk_rows(device):
    boxes, scores = random_boxes(10, device=device), torch.rand(10, device=device)
    for chunk_rows in (-64, 32, 100):
        with pytest.raises(RuntimeError, match=f"chunk_rows must be 0 or a positive multiple of 64, got {chunk_rows}"):
            bitmask_nms(boxes, scores, 0.5, chunk_rows=chunk_rows)
    with pytest.raises(RuntimeError, match=r"_nms_bitmask: boxes must be a \[N, 4\] tensor"):
        bitmask_nms(boxes[:, :3], scores, 0.5)
    assert bitmask_nms(boxes[:0], scores[:0], 0.5).shape == (0,)


def _valid_only(boxes, scores, idxs, valid, threshold):
    """The reference: NMS over the valid boxes alone, as indices of all boxes."""
    rows = valid.nonzero().squeeze(1)
    if idxs is None:
        return rows[ops.nms(boxes[rows], scores[rows], threshold)]
    return rows[ops.batched_nms(boxes[rows], scores[rows], idxs[rows], threshold)]


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("chunk_rows", [0, 64])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9, 1.0])
def test_nms_bitmask_valid_boxes_alone_are_walked(device, batched, chunk_rows, fraction):
    """Boxes outside `valid` are sorted last and past the device-side bound: never kept, never suppressing."""
    n = 700
    boxes = rpn_like_boxes(n)
    scores = torch.rand(n)
    scores[::53] = float("nan")  # NaN scores among the valid boxes still rank after every number
    idxs = torch.randint(0, 5, (n,)) if batched else None
    valid = torch.rand(n) < fraction
    expected = _valid_only(boxes, scores, idxs, valid, 0.5)
    got = bitmask_nms(boxes.to(device), scores.to(device), 0.5, idxs=None if idxs is None else idxs.to(device),
                      chunk_rows=chunk_rows, valid=valid.to(device))
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    if 0 < fraction < 1:
        assert 0 < expected.numel() < int(valid.sum())


def test_batched_nms_keep_mask_valid(device):
    n = 900
    boxes, scores = rpn_like_boxes(n, device=device), torch.rand(n, device=device)
    idxs = torch.randint(0, 4, (n,), device=device)
    valid = torch.rand(n, device=device) < 0.5
    mask = torch.ops.fasterrcnn_ext._batched_nms_keep_mask_valid(boxes, scores, idxs, valid, 0.6)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[_valid_only(boxes.cpu(), scores.cpu(), idxs.cpu(), valid.cpu(), 0.6)] = True
    assert torch.equal(mask.cpu(), expected) and not mask[~valid].any()
    none = torch.ops.fasterrcnn_ext._batched_nms_keep_mask_valid(boxes, scores, idxs, torch.zeros_like(valid), 0.6)
    assert not none.any()
    with pytest.raises(RuntimeError, match=r"_batched_nms_keep_mask_valid: valid must be a bool \[N\] tensor"):
        torch.ops.fasterrcnn_ext._batched_nms_keep_mask_valid(boxes, scores, idxs, valid[:-1], 0.6)
    with pytest.raises(RuntimeError, match="valid must be a bool"):
        torch.ops.fasterrcnn_ext._batched_nms_keep_mask_valid(boxes, scores, idxs, valid.long(), 0.6)
    torch.library.opcheck(torch.ops.fasterrcnn_ext._batched_nms_keep_mask_valid.default,
                          (boxes[:200], scores[:200], idxs[:200], valid[:200], 0.6))


def test_nms_bitmask_opcheck(device):
    boxes = rpn_like_boxes(300, device=device)
    scores = distinct_scores(300, device=device)
    idxs = torch.randint(0, 3, (300,), device=device)
    torch.library.opcheck(torch.ops.fasterrcnn_ext._nms_bitmask.default, (boxes, scores, None, 0.5, -1, 64))
    torch.library.opcheck(torch.ops.fasterrcnn_ext._nms_bitmask.default, (boxes, scores, idxs, 0.5, 10, 0))
    valid = torch.rand(300, device=device) < 0.5
    torch.library.opcheck(torch.ops.fasterrcnn_ext._nms_bitmask.default, (boxes, scores, idxs, 0.5, -1, 64, valid))


def test_batched_nms_of_no_boxes_is_empty_whatever_the_rest():
    """torchvision returns at once for empty boxes; code that relies on it passes None for the rest."""
    for args in ((None, None, None), (torch.empty(0), torch.empty(0, dtype=torch.long), 0.5)):
        got = ops.batched_nms(torch.empty(0, 4), *args)
        expected = torchvision.ops.batched_nms(torch.empty(0, 4), *args)
        assert got.dtype == expected.dtype == torch.int64 and got.shape == expected.shape == (0,)
