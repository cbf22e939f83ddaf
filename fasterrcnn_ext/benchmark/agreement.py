"""How much the inference speed-ups change a trained detector's detections: bfloat16 against float32, and the float32
fast path (folded batch norms, Winograd convolutions) against the plain forward (``fast_inference = False``).

    python -m fasterrcnn_ext.benchmark.agreement --weights runs/demo/model.pt [--images 200] [--json out.json]

A float32 detection (score >= --score-thresh) has a twin when the bfloat16 run has a detection of the same label with
IoU >= --iou and a score within --score-tol; each bfloat16 detection is a twin at most once. Also reports the COCO
mAP of both runs on the held-out synthetic images (or --data DIR).
"""

from __future__ import annotations

import argparse
import json

import torch

from .. import ops
from ..files import write_json


def detection_agreement(reference: list[dict], other: list[dict], *, iou: float = 0.9, score_tol: float = 0.05,
                        score_thresh: float = 0.5) -> dict:
    """Greedy twin matching per image, highest reference score first. Returns counts and the twin fraction."""
    total = twins = extra = 0
    for ref, oth in zip(reference, other, strict=True):
        keep_r = ref["scores"] >= score_thresh
        keep_o = oth["scores"] >= score_thresh - score_tol  # a twin may sit just under the threshold
        rb, rl, rs = ref["boxes"][keep_r], ref["labels"][keep_r], ref["scores"][keep_r]
        ob, ol, os_ = oth["boxes"][keep_o], oth["labels"][keep_o], oth["scores"][keep_o]
        total += len(rb)
        used = torch.zeros(len(ob), dtype=torch.bool)
        if len(rb) and len(ob):
            overlap = ops.box_iou(rb.float(), ob.float())
            for i in torch.argsort(rs, descending=True).tolist():
                ok = (~used) & (ol == rl[i]) & (overlap[i] >= iou) & ((os_ - rs[i]).abs() <= score_tol)
                if ok.any():
                    j = int(torch.where(ok, overlap[i], -1.0).argmax())
                    used[j] = True
                    twins += 1
        extra += int(((os_ >= score_thresh) & ~used).sum())
    return {"reference_detections": total, "twins": twins, "twin_fraction": twins / total if total else 1.0,
            "unmatched_other_detections": extra, "iou": iou, "score_tol": score_tol, "score_thresh": score_thresh}


def main(argv=None) -> dict:
    from ..data import build_dataset
    from ..engine.checkpoint import load_checkpoint, model_from_checkpoint
    from ..engine.evaluate import coco_metrics, detections_to_coco

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a fasterrcnn_ext checkpoint (e.g. the demo's model.pt)")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=200, help="held-out synthetic images")
    p.add_argument("--iou", type=float, default=0.9)
    p.add_argument("--score-tol", type=float, default=0.05)
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)

    checkpoint = load_checkpoint(args.weights)
    model = model_from_checkpoint(checkpoint, args.weights).eval()
    dataset = build_dataset(args.data, train=False, split=args.split, synthetic_images=args.images)
    runs = {"float32": [], "bfloat16": [], "float32_plain": []}
    image_ids = []
    with torch.inference_mode():
        for index in range(len(dataset)):
            image, target = dataset[index]
            image_ids.append(target["image_id"])
            for name, dtype, fast in (("float32", None, True), ("bfloat16", torch.bfloat16, True),
                                      ("float32_plain", None, False)):
                model.inference_dtype, model.fast_inference = dtype, fast
                runs[name].append(model([image])[0])
    result = {"weights": args.weights, "images": len(dataset),
              "agreement": detection_agreement(runs["float32"], runs["bfloat16"], iou=args.iou,
                                               score_tol=args.score_tol, score_thresh=args.score_thresh),
              "fast_path_agreement": detection_agreement(runs["float32_plain"], runs["float32"], iou=args.iou,
                                                         score_tol=args.score_tol, score_thresh=args.score_thresh)}
    gt = dataset.coco_ground_truth()
    for name, detections in runs.items():
        coco = [r for d, i in zip(detections, image_ids, strict=True)
                for r in detections_to_coco(d, i, dataset.category_ids)]
        metrics = coco_metrics(gt, coco)
        result[name] = {k: metrics[k] for k in ("map", "map_50", "map_75")}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)  # atomically: a crash mid-write leaves the previous file whole
    return result


if __name__ == "__main__":
    main()
