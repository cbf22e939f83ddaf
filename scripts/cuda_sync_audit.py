"""Where the CUDA ops and the detector's eval forward wait for the device: each case runs under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every synchronising call (a device-to-host copy, ``.item()``,
``nonzero``, a copy from pageable memory, ...); the warnings of each case are counted and their first Python frames
printed.

    python scripts/cuda_sync_audit.py [--json FILE]
    python scripts/cuda_sync_audit.py --cpu-dry-run      # the cases on the CPU, to check the script itself

Expected: none in the box ops, anchors, RoI ops, batched_nms_keep_mask and the padded post-processing
(rpn_proposals_padded, detection_postprocess_padded, FasterRCNN.detect_padded); one in nms and batched_nms (their
output's size); in rpn_proposals and detection_postprocess the final selection and the per-image split (see
csrc/ops/composite/postprocess.cpp); one in the detector's eval forward (detect_padded's per-image counts, read to
split the outputs). Anything more is a hidden sync to remove.
Exits 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings

import torch


def _boxes(n, device, seed=0, size=200.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * size / 4 + 1], 1).to(device)


def cases(device: str):
    from fasterrcnn_ext import ops
    from fasterrcnn_ext.models import detection

    b = _boxes(500, device)
    s = torch.rand(500, device=device)
    idx = torch.randint(0, 5, (500,), device=device)
    x = torch.randn(2, 64, 50, 60, device=device)
    boxes = [_boxes(100, device, 1, 100.0), _boxes(80, device, 2, 100.0)]
    rois = torch.cat([torch.cat([torch.full((len(v), 1), float(i), device=device), v], 1) for i, v in enumerate(boxes)])
    feats = [torch.randn(2, 64, 50, 60, device=device), torch.randn(2, 64, 25, 30, device=device)]
    a = 2000
    anchors = _boxes(a, device, 3)
    # Every input is on the device before the audited calls: a copy from pageable host memory (torch.tensor(...,
    # device="cuda"), .cuda()) synchronises, and inside a case it would be counted against the op.
    box_deltas = torch.randn(500, 4, device=device) * 0.1
    objectness, deltas = torch.randn(2, a, device=device), torch.randn(2, a, 4, device=device) * 0.1
    logits, regression = torch.randn(180, 5, device=device) * 3, torch.randn(180, 20, device=device) * 0.1
    padded_logits, padded_regression = torch.randn(200, 5, device=device) * 3, torch.randn(200, 20, device=device) * 0.1
    padded_boxes, proposal_counts = torch.cat([boxes[0], boxes[0]]), torch.tensor([100, 80], device=device)
    yield "box_iou", lambda: ops.box_iou(b, b)
    yield "decode_boxes", lambda: ops.decode_boxes(box_deltas, b, (1.0, 1.0, 1.0, 1.0))
    yield "batched_nms_keep_mask", lambda: ops.batched_nms_keep_mask(b, s, idx, 0.5)
    yield "nms", lambda: ops.nms(b, s, 0.5)
    yield "batched_nms", lambda: ops.batched_nms(b, s, idx, 0.5)
    yield "roi_align (rois)", lambda: ops.roi_align(x, rois, 7, 0.5, 2, True)
    yield "roi_align (list of boxes)", lambda: ops.roi_align(x, boxes, 7, 0.5, 2, True)
    yield "roi_pool", lambda: ops.roi_pool(x, rois, 7, 0.5)
    yield "multi_scale_roi_align", lambda: ops.multi_scale_roi_align(feats, rois, 7, [0.5, 0.25], 2)
    yield "rpn_proposals", lambda: ops.rpn_proposals(
        objectness, deltas, anchors, [1500, 500], [(200, 220), (210, 200)], 300, 100, 0.7)
    yield "detection_postprocess", lambda: ops.detection_postprocess(
        logits, regression, boxes, [(100, 120), (110, 100)])
    yield "rpn_proposals_padded", lambda: ops.rpn_proposals_padded(
        objectness, deltas, anchors, [1500, 500], [(200, 220), (210, 200)], 300, 100, 0.7)
    yield "detection_postprocess_padded", lambda: ops.detection_postprocess_padded(
        padded_logits, padded_regression, padded_boxes, proposal_counts, [(100, 120), (110, 100)])
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                            num_classes=5).eval().to(device)
    images = [torch.rand(3, 320, 416, device=device)]
    with torch.no_grad():
        model(images)  # warm-up: the inference copies are built once

    def forward():
        with torch.no_grad():
            return model(images)

    yield "detector eval forward (mobilenet_v3_large_320_fpn)", forward
    model.detect_padded(images)  # warm-up: the normalisation constants move to the device once
    yield "detector detect_padded (mobilenet_v3_large_320_fpn)", lambda: model.detect_padded(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the counts and locations here")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the cases on the CPU, without the audit")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        for name, fn in cases("cpu"):
            fn()
            print(f"{name}: ran")
        return 0
    if not torch.cuda.is_available():
        print("cuda_sync_audit: no CUDA device")
        return 2
    results = {}
    for name, fn in cases("cuda"):
        fn()  # warm-up outside the audit (lazy initialisation syncs once)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where = sorted({f"{w.filename}:{w.lineno}" for w in syncs})
        results[name] = {"syncs": len(syncs), "where": where}
        print(f"{name:55s} {len(syncs):3d} sync(s)  {' '.join(where[:4])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
